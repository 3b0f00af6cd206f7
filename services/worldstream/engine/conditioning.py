"""Image-to-video conditioning of Matrix-Game-2 (encoder-service side): the first image -> `cond_concat`.

The reference VAE-encodes [image, 4·(T−1) zero frames] for the whole session up front. The Wan encoder is
causal and chunked (1 frame, then 4), so encoding the same frames block by block through one persistent
`VAEEncodeStream` yields exactly the same latents — only ever one block ahead.

The encoder has no recurrence: each causal conv sees the last 3 frames of its input, so a latent depends on a
bounded window of input frames. At the Wan 2.1 config the image (frame 0), and with it the zero padding at the
start of every conv, reaches latents 0..28 only (9 convs at full rate, +18 frames; 4 at half rate after the
first temporal downsample; 9 at quarter rate after the second). From latent 29 on every latent is the same
function of zero frames alone, computed by the same kernels on the same shapes: block 10 and every later block
equal each other bit for bit, whatever the image. `SteadyCondConcat` computes that block once per process.
The same holds earlier for the encoder's full-rate layers (frame 0 reaches their frame 18): from chunk 6
(block 2) on their output is shared too (`SteadyFullRate`), which leaves a quarter of the work for blocks 2-9.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..models.wan_vae import SteadyFullRate, VAEEncodeStream, WanVAEEncoder, probe_encoder

MASK_CHANNELS = 4  # cond_concat = [mask (1 on the image's latent frame), normalised latent]


def preprocess_image(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image -> [1, 3, height, width] float32 in [-1, 1], as the reference `inference.py` prepares it.

    Center crop to the aspect width:height without scaling (float box, rounded by PIL), bilinear resize with
    PIL (what torchvision's Resize(antialias=True) does on a PIL image), ToTensor, Normalize(0.5, 0.5).
    """
    image = image.convert("RGB")
    w, h = image.size
    if h / w > height / width:
        crop_w, crop_h = w, int(w * height / width)
    else:
        crop_w, crop_h = int(h * width / height), h
    image = image.crop(((w - crop_w) / 2, (h - crop_h) / 2, (w + crop_w) / 2, (h + crop_h) / 2))
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return ((pixels - 0.5) / 0.5)[None]


def image_free_block(vae: dict, frames_per_block: int, limit: int = 256) -> int:
    """Index of the first block whose `cond_concat` does not depend on the image, for a Wan VAE encoder of
    config `vae` (the keyword arguments of `WanVAEEncoder`).

    Found by running a NaN image through a probe copy of the encoder (`probe_encoder`): the first NaN-free
    block is exact for this code. Frame 0's reach is a run of latents from latent 0, so every later block is
    image-free too.
    """
    stream = CondConcatStream(probe_encoder(vae), torch.full((1, 3, 8, 8), float("nan")), frames_per_block)
    for block in range(limit):
        if not stream.next_block().isnan().any():
            return block
    raise ValueError(f"the image still reaches block {limit - 1} of cond_concat: not a causal encoder")


class SteadyCondConcat:
    """The `cond_concat` of every block from `block` on (the encoding of zero frames only, see above), shared by
    all sessions of a process: filled by the first stream that gets there (the encoder's warm-up), then handed
    out without encoding. Read-only for its users. `full_rate` is the same for the full-rate layers' output."""

    def __init__(self, block: int, full_rate: SteadyFullRate | None = None):
        self.block = block
        self.full_rate = full_rate
        self.value: torch.Tensor | None = None

    @classmethod
    def of_config(cls, vae: dict, frames_per_block: int) -> "SteadyCondConcat":
        return cls(image_free_block(vae, frames_per_block), SteadyFullRate.of_config(vae))


class CondConcatStream:
    """One session's `cond_concat`, block after block: [1, 20, frames_per_block, H/8, W/8].

    Block 0 encodes [image, 4·(frames_per_block−1) zero frames]; every later block the next
    4·frames_per_block zero frames (zeros = mid-grey in [-1, 1]), continuing the same causal encode. From the
    `steady` block on, the shared steady block is returned once known and the causal caches are dropped.
    """

    def __init__(self, encoder: WanVAEEncoder, image: torch.Tensor, frames_per_block: int = 3,
                 steady: SteadyCondConcat | None = None):
        if image.dim() != 4 or image.shape[:2] != (1, 3):
            raise ValueError(f"expected an image [1, 3, H, W], got {list(image.shape)}")
        self._stream: VAEEncodeStream | None = VAEEncodeStream(encoder, steady.full_rate if steady else None)
        self._image: torch.Tensor | None = image
        self._zero_frames = image.new_zeros(1, 3, 4 * frames_per_block, *image.shape[2:])
        self._block_index = 0
        self._steady = steady

    @property
    def block_index(self) -> int:
        """Index of the block the next `next_block` call returns."""
        return self._block_index

    @torch.inference_mode()
    def next_block(self) -> torch.Tensor:
        steady = self._steady
        if steady is not None and self._block_index >= steady.block:
            if steady.value is not None:
                self._stream = None  # the causal caches are never needed again
                self._block_index += 1
                return steady.value
            steady.value = self._encode_next()
            return steady.value
        return self._encode_next()

    def _encode_next(self) -> torch.Tensor:
        if self._image is not None:
            video = torch.cat([self._image[:, :, None], self._zero_frames[:, :, 4:]], 2)
            self._image = None  # only block 0 sees the image; the causal caches carry it afterwards
        else:
            video = self._zero_frames
        latents = self._stream.encode(video)
        mask = torch.zeros_like(latents[:, :MASK_CHANNELS])
        if self._block_index == 0:
            mask[:, :, 0] = 1.0
        self._block_index += 1
        return torch.cat([mask, latents], 1)
