"""Images in and JPEG frames out for the services (host-side work after a block's `to_host` stage)."""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# Uploads are PNG or JPEG, checked from the header before any pixel is decoded: format, at most MAX_IMAGE_PIXELS
# pixels (a 40-megapixel image decodes to 120 MB of RGB) and at least MIN_IMAGE_SIDE on each side (a smaller one has
# no center crop to speak of: a 1x1 image crops to nothing, a black frame).
IMAGE_FORMATS = ("PNG", "JPEG")
MAX_IMAGE_PIXELS = 40_000_000
MIN_IMAGE_SIDE = 8
# Largest encoded upload; with the other fields of a start it fits the services' 32 MiB message limit.
MAX_IMAGE_BYTES = (32 << 20) - (4 << 10)


def encode_jpeg(frame: torch.Tensor | np.ndarray, quality: int = 85) -> bytes:
    """uint8 RGB frame [H, W, 3] -> JPEG bytes."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 frame [H, W, 3], got {array.dtype} {list(array.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class ImageHeader:
    format: str  # Pillow's name: PNG, JPEG (MPO for a multi-picture JPEG)
    width: int
    height: int


def probe_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> ImageHeader:
    """Format and size of encoded image bytes from the header alone, checked as `load_image` checks them (the
    pixels are not decoded, so a corrupt body still fails there); ValueError says what is wrong."""
    with _open_checked(data, max_pixels) as (image, _):
        return ImageHeader(image.format, image.width, image.height)


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode a PNG or JPEG file or encoded bytes to an RGB PIL image. Another format, undecodable or truncated
    input, more than `max_pixels` pixels or a side under MIN_IMAGE_SIDE raise ValueError; all but the truncation
    are found from the header, before decoding."""
    with _open_checked(source, max_pixels) as (image, what):
        try:
            image.load()
            return image.convert("RGB")
        except (SyntaxError, OSError) as e:  # Pillow's errors for corrupt or truncated data
            raise ValueError(f"{what}: not a decodable image ({e})") from None


@contextlib.contextmanager
def _open_checked(source: str | os.PathLike | bytes | bytearray | memoryview, max_pixels: int
                  ) -> Iterator[tuple[Image.Image, str]]:
    """The image opened (header read, pixels not decoded) after the format and size checks, and what it is."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, opened = f"image bytes ({len(source)} B)", io.BytesIO(source)
    else:
        what, opened = f"image file {os.fspath(source)!r}", source
    try:
        image = Image.open(opened, formats=IMAGE_FORMATS)  # only these plugins look at the bytes
    except UnidentifiedImageError:
        raise ValueError(f"{what}: not a decodable image; send a PNG or JPEG file") from None
    except (Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{what}: not a decodable image ({e})") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{what}: not a decodable image ({e})") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(f"{what}: {width}x{height} exceeds the limit of {max_pixels} pixels")
        if min(width, height) < MIN_IMAGE_SIDE:
            raise ValueError(f"{what}: {width}x{height} is too small; each side needs at least {MIN_IMAGE_SIDE} "
                             "pixels")
        yield image, what
