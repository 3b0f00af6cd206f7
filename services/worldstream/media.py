"""Images in and JPEG frames out for the services (host-side work after a block's `to_host` stage)."""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 40_000_000  # uploads larger than this are refused before decoding


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


def load_image(source: str | os.PathLike | bytes | bytearray | memoryview,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image file or encoded bytes to an RGB PIL image. Undecodable, truncated or oversized
    (> max_pixels) input raises ValueError."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        what, opened = f"image bytes ({len(source)} B)", io.BytesIO(bytes(source))
    else:
        what, opened = f"image file {os.fspath(source)!r}", source
    try:
        with Image.open(opened) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"{what}: {image.width}x{image.height} exceeds the limit of {max_pixels} pixels")
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{what}: not a decodable image ({e})") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{what}: not a decodable image ({e})") from None
