"""Conditioning clips on the encoder service (video-conditional sessions, LongLive): the clip's bytes from its `video`
chunks, refused by their announced size before any is read, then decoded and VAE-encoded by `engine.clips` exactly
as the batch CLI does it, so that a session continues the clip as `worldstream batch --video` does."""
from __future__ import annotations

import asyncio

import grpc
import torch
from omegaconf import DictConfig

from ..engine.clips import build_vae_encoder, conditioning_latents, conditioning_pixel_frames, decode_clip, encode_clip
from ..serving.aio import Requests, within
from ..serving.errors import ServiceError
from ..serving.metrics import ServiceMetrics
from worldstream.v1 import encoder_pb2

# A clip arrives in a decoder's start message, which is at most 32 MiB.
MAX_CLIP_BYTES = 32 << 20
MAX_CLIP_CHUNK_BYTES = 1 << 20
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def receive_clip(first: encoder_pb2.VideoConditionChunk, requests: Requests, timeout: float,
                       metrics: ServiceMetrics) -> bytes:
    """The whole file of a clip from its chunks (`first` already read): INVALID_ARGUMENT for a size over the limit
    (from `total_bytes`, before anything is allocated), a chunk over 1 MiB, more or fewer bytes than announced, or
    another request among the chunks; DEADLINE_EXCEEDED when the next chunk does not come within `timeout`."""
    total = first.total_bytes
    if not 0 < total <= MAX_CLIP_BYTES:
        raise ServiceError(_INVALID, f"the clip's first chunk announces total_bytes={total}; a clip has 1 to "
                                     f"{MAX_CLIP_BYTES} bytes")
    clip, received, chunk = bytearray(total), 0, first
    while True:
        size = len(chunk.data)
        if size > MAX_CLIP_CHUNK_BYTES or received + size > total:
            raise ServiceError(_INVALID, f"a clip chunk of {size} bytes after {received} of {total}: chunks have at "
                                         f"most {MAX_CLIP_CHUNK_BYTES} bytes and add up to total_bytes")
        clip[received:received + size] = chunk.data
        received += size
        if chunk.last:
            break
        try:
            message = await within(anext(requests), timeout)
        except StopAsyncIteration:
            raise ServiceError(_INVALID, f"the stream ended after {received} of the clip's {total} bytes, before "
                                         "its `last` chunk") from None
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no clip chunk for {timeout:g} s (after {received} "
                                                                  f"of {total} bytes)") from None
        metrics.bytes_received.inc(message.ByteSize())
        if message.WhichOneof("request") != "video":
            raise ServiceError(_INVALID, f"`{message.WhichOneof('request')}` among a clip's `video` chunks")
        chunk = message.video
    if received != total:
        raise ServiceError(_INVALID, f"the clip's chunks hold {received} bytes; its first chunk announced {total}")
    return bytes(clip)


class ClipEncoder:
    """A config's Wan VAE encoder and clip limits: a clip's bytes -> its conditioning latents, one tensor per block."""

    def __init__(self, cfg: DictConfig):
        self.vae = build_vae_encoder(cfg)
        self.fps, self.height, self.width = int(cfg.video.fps), int(cfg.video.height), int(cfg.video.width)
        self.frames_per_block = int(cfg.pipeline.frames_per_block)
        self.max_latents = int(cfg.conditioning.max_latents)

    def decode(self, clip: bytes) -> tuple[torch.Tensor, int]:
        """The clip's pixels (`clips.decode_clip`) and the latent frames they give; ValueError for a clip that does
        not decode or is too short for one block (its message says how many frames are needed)."""
        pixels = decode_clip(clip, self.fps, self.height, self.width, conditioning_pixel_frames(self.max_latents))
        return pixels, conditioning_latents(pixels.shape[2], self.frames_per_block, self.max_latents)

    def encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Conditioning latents of decoded pixels, float32 [1, 16, frames_per_block, h, w] per block."""
        latents = encode_clip(self.vae, pixels, self.frames_per_block, self.max_latents)
        return [block.contiguous() for block in latents.split(self.frames_per_block, dim=2)]
