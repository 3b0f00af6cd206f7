"""Preallocated rolling KV caches for causal, block-wise generation.

Every cache keeps the last `window` latent frames of keys/values in a ring buffer: frame f lives in slot
f % window. The reference shifts its buffers left when a new block does not fit; because attention over the
cache is unmasked, the order of the slots does not matter, so a ring buffer gives the same result without
copies. Positions are plain Python ints owned by the caller: no index ever lives on the device, so updating
a cache never synchronises with the host. A call sees the ring only through its `RingSlots`, which take three
values in a whole session (blocks of 3 frames, window 6), so compiled layers specialise on those and never on
the ever-growing frame index.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RingSlots:
    """Where a call of `frames` latent frames lands in a ring of `window` frames."""

    first: int  # slot of the call's first frame
    frames: int
    valid: int  # frames of the ring that hold data once the call is written

    @classmethod
    def of(cls, start_frame: int, frames: int, window: int) -> "RingSlots":
        if frames > window:
            raise ValueError(f"a call of {frames} frames does not fit a cache window of {window} frames")
        return cls(start_frame % window, frames, min(start_frame + frames, window))


class RollingKVCache:
    """Keys/values of the last `window` frames, `tokens_per_frame` entries per frame along dim 1.

    Layout [batch, window * tokens_per_frame, heads, head_dim] serves the self-attention cache (tokens = the
    frame's patches), the mouse cache (batch = batch * patches, one entry per frame) and the keyboard cache.
    """

    def __init__(self, batch: int, window: int, tokens_per_frame: int, heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype):
        self.window = window
        self.tokens_per_frame = tokens_per_frame
        shape = (batch, window * tokens_per_frame, heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, slots: RingSlots) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the call's frames into their slots and return the valid part of the cache.

        Writing the same frames again (the denoising steps and the cache-update pass of one block) overwrites
        their slots in place, exactly as the reference does.
        """
        t = self.tokens_per_frame
        first, n = slots.first, slots.frames
        head = min(n, self.window - first)
        self.k[:, first * t:(first + head) * t] = k[:, :head * t]
        self.v[:, first * t:(first + head) * t] = v[:, :head * t]
        if head < n:  # wrap around to the start of the ring
            self.k[:, :(n - head) * t] = k[:, head * t:]
            self.v[:, :(n - head) * t] = v[:, head * t:]
        return self.k[:, :slots.valid * t], self.v[:, :slots.valid * t]


@dataclass
class LayerCaches:
    """Caches of one transformer layer."""

    self_attn: RollingKVCache
    cross_k: torch.Tensor  # [B, context_tokens, heads, head_dim], written once per session (`set_context`)
    cross_v: torch.Tensor
    mouse: RollingKVCache | None = None
    keyboard: RollingKVCache | None = None


@dataclass
class DiTCaches:
    """All device state of one generation session's DiT: one object, freed at once by `release()`."""

    layers: list[LayerCaches] = field(default_factory=list)

    def release(self) -> None:
        self.layers.clear()
