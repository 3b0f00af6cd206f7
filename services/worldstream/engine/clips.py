"""Conditioning clips of video-conditional generation (spec §4.4): clip -> pixels -> conditioning latents.

A clip is decoded with PyAV, resampled to the model's frame rate (the models are trained at 16 fps; the public
script takes the clip at its own rate), center-cropped to the model's aspect ratio and resized to its size (the
public script resizes without cropping, bilinear, no antialiasing: so does `resize_pixels`), scaled to [-1, 1]
and encoded by the Wan VAE encoder. The Wan encoder turns 1 + 4k frames into 1 + k latents and silently drops
frames past the last full chunk of 4, so exactly 1 + 4·(T - 1) frames are taken for T latents, T a multiple
of the block size: the conditioning fills whole blocks, and the caches take it one block per call.

Plain functions, no state: the batch CLI uses them, and the encoder service can.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction
from typing import BinaryIO

import av
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ..models.wan_vae import VAEEncodeStream, WanVAEEncoder, split_vae_state_dict
from .builders import building, load_weights, resolve_device, resolve_dtype

MAX_CLIP_PIXELS = 40_000_000  # per frame, checked from the stream's header before decoding (as for images)


def conditioning_pixel_frames(latents: int) -> int:
    """Pixel frames the Wan encoder turns into `latents` latent frames, none dropped."""
    return 1 + 4 * (latents - 1)


def conditioning_latents(pixel_frames: int, frames_per_block: int, max_latents: int) -> int:
    """Latent frames of conditioning a clip of `pixel_frames` frames gives: as many whole blocks as it has frames
    for, at most `max_latents` (ValueError when it is too short for one block)."""
    latents = min(1 + (pixel_frames - 1) // 4 if pixel_frames else 0, max_latents)
    latents -= latents % frames_per_block
    if latents == 0:
        need = conditioning_pixel_frames(frames_per_block)
        raise ValueError(f"the clip has {pixel_frames} frames at the model's frame rate; video conditioning needs "
                         f"at least {need} (one block of {frames_per_block} latent frames)")
    return latents


def resize_pixels(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[T, 3, H, W] -> [T, 3, height, width]: bilinear, align_corners False, no antialiasing (the public script's
    `F.interpolate`)."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    return F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)


def frames_to_pixels(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [T, 3, H, W] in [-1, 1] (x / 255 · 2 - 1, as the public script)."""
    return (frames.float() / 255.0 * 2.0 - 1.0).permute(0, 3, 1, 2)


def center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] cropped at the center to the aspect ratio width:height (integer sides)."""
    h, w = frames.shape[1:3]
    if h * width > w * height:  # taller than the target: crop rows
        crop = round(w * height / width)
        top = (h - crop) // 2
        return frames[:, top:top + crop]
    crop = round(h * width / height)
    left = (w - crop) // 2
    return frames[:, :, left:left + crop]


def decode_clip(source: str | os.PathLike | bytes | BinaryIO, fps: int, height: int, width: int,
                max_frames: int) -> torch.Tensor:
    """The first `max_frames` frames of a clip's first video stream at `fps`, center-cropped to width:height
    and resized: float32 [1, 3, T, height, width] in [-1, 1].

    Resampling keeps time: output frame k shows the source frame on screen at k / fps from the first frame (the
    last one that started by then), so faster clips drop frames and slower ones repeat them. ValueError when the
    data is not a decodable video (or the file is missing) or its frames exceed MAX_CLIP_PIXELS.
    """
    if isinstance(source, (bytes, bytearray)):
        what, opened = f"clip bytes ({len(source)} B)", io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        what, opened = f"clip file {os.fspath(source)!r}", os.fspath(source)
        if not os.path.isfile(opened):
            raise ValueError(f"{what}: not found")
    else:
        what, opened = "clip stream", source
    try:
        container = av.open(opened)
    except av.FFmpegError as e:
        raise ValueError(f"{what}: not a decodable video ({e})") from None
    pixels: list[torch.Tensor] = []
    with container:
        if not container.streams.video:
            raise ValueError(f"{what}: no video stream")
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height > MAX_CLIP_PIXELS:
            raise ValueError(f"{what}: {stream.codec_context.width}x{stream.codec_context.height} frames exceed "
                             f"the limit of {MAX_CLIP_PIXELS} pixels")
        step = Fraction(1, fps)
        frame_time = 1 / Fraction(stream.average_rate) if stream.average_rate else step  # the last frame's
        start = next_time = None
        shown = None  # the last decoded frame, shown until the next one starts

        def emit(until: Fraction) -> None:
            nonlocal next_time
            while next_time < until and len(pixels) < max_frames:
                pixels.append(shown)
                next_time += step

        try:
            for frame in container.decode(stream):
                time = Fraction(frame.pts) * stream.time_base if frame.pts is not None else None
                if time is None:
                    continue
                if start is None:
                    start = next_time = time
                if shown is not None:
                    emit(time)
                if len(pixels) >= max_frames:
                    break
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))[None]
                shown = resize_pixels(frames_to_pixels(center_crop(rgb, height, width)), height, width)[0]
                last_time = time
        except av.FFmpegError as e:
            raise ValueError(f"{what}: not a decodable video ({e})") from None
        if shown is None:
            raise ValueError(f"{what}: no decodable video frame")
        emit(last_time + frame_time)
    return torch.stack(pixels, dim=1)[None]


def build_vae_encoder(cfg: DictConfig) -> WanVAEEncoder:
    """The Wan VAE encoder of a config: the encoder half of its VAE file, or seeded random weights."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    with building(device, dtype):
        encoder = WanVAEEncoder(**cfg.vae)
    return load_weights(encoder, cfg, cfg.checkpoints.vae, select=lambda sd: split_vae_state_dict(sd)[0],
                        seed_offset=3).eval()


@torch.inference_mode()
def encode_clip(encoder: WanVAEEncoder, pixels: torch.Tensor, frames_per_block: int,
                max_latents: int) -> torch.Tensor:
    """Conditioning latents [1, 16, T, h, w] (float32, normalised) of a clip's pixels [1, 3, T_px, H, W] in
    [-1, 1]: its first 1 + 4·(T - 1) frames, T whole blocks of latents, at most `max_latents`."""
    latents = conditioning_latents(pixels.shape[2], frames_per_block, max_latents)
    frames = pixels[:, :, :conditioning_pixel_frames(latents)]
    param = encoder.conv1.weight
    return VAEEncodeStream(encoder).encode(frames.to(param.device, param.dtype))
