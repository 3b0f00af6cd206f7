"""Preallocated KV caches for causal, block-wise generation, and the policies that say which frames they keep.

Every cache is a ring buffer of `frames` latent frames of keys/values: frame f lives in slot f % frames. Which
frames a session may write, and so whether the ring ever wraps, is the cache policy's business:

* `RollingWindow` (Matrix-Game-2's local attention): the last `frames` frames. The reference shifts its
  buffers left when a new block does not fit; because attention over the cache is unmasked, the order of the
  slots does not matter, so a ring gives the same result without copies. Sessions of any length.
* `GlobalWindow` (Self-Forcing's global attention): every frame of the session, up to `frames` (21). The ring
  never wraps; a call past the end is an error, so the cache bounds the session's length.
* LongLive's frame sink (window 12, sink 3) will be a third policy: its first `sink` frames never leave, the
  rest roll, i.e. a ring over slots [sink, frames).

Positions are plain Python ints owned by the caller: no index ever lives on the device, so updating a cache
never synchronises with the host. A call sees the ring only through its `RingSlots`, which take few values in a
whole session (three for blocks of 3 frames in a rolling window of 6, seven in a global cache of 21), so
compiled layers and captured CUDA graphs specialise on those and never on the ever-growing frame index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

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


class CachePolicy(Protocol):
    """Which latent frames the caches of a session keep (see the module docstring)."""

    frames: int  # slots of every cache, in latent frames

    @property
    def max_frames(self) -> int | None:
        """Latent frames a session can reach (None: the cache never ends a session)."""

    def slots(self, start_frame: int, frames: int) -> RingSlots:
        """Where a call of `frames` latent frames starting at `start_frame` lands (ValueError if it cannot)."""


@dataclass(frozen=True)
class RollingWindow:
    """The last `frames` latent frames: a new block overwrites the oldest."""

    frames: int

    @property
    def max_frames(self) -> None:
        return None

    def slots(self, start_frame: int, frames: int) -> RingSlots:
        return RingSlots.of(start_frame, frames, self.frames)


@dataclass(frozen=True)
class GlobalWindow:
    """Every latent frame of the session, up to `frames`: nothing is ever overwritten by another frame."""

    frames: int

    @property
    def max_frames(self) -> int:
        return self.frames

    def slots(self, start_frame: int, frames: int) -> RingSlots:
        if start_frame + frames > self.frames:
            raise ValueError(f"latent frames {start_frame}..{start_frame + frames - 1} do not fit the global KV "
                             f"cache of {self.frames} latent frames, which never rolls; a rolling window "
                             "(local_attn_size) allows longer sessions")
        return RingSlots.of(start_frame, frames, self.frames)


def session_phases(policy: CachePolicy, frames_per_block: int) -> list[RingSlots]:
    """The distinct `RingSlots` of a session's blocks, in order: every shape a compiled block loop takes."""
    phases: list[RingSlots] = []
    limit = policy.max_frames
    while limit is None or (len(phases) + 1) * frames_per_block <= limit:
        slots = policy.slots(len(phases) * frames_per_block, frames_per_block)
        if slots in phases:
            break
        phases.append(slots)
    return phases


class RingKVCache:
    """Keys/values of `window` frames in a ring, `tokens_per_frame` entries per frame along dim 1.

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

    self_attn: RingKVCache
    cross_k: torch.Tensor  # [B, context_tokens, heads, head_dim], written once per context (`set_context`)
    cross_v: torch.Tensor
    mouse: RingKVCache | None = None
    keyboard: RingKVCache | None = None


@dataclass
class DiTCaches:
    """All device state of one generation session's DiT: one object, freed at once by `release()`."""

    layers: list[LayerCaches] = field(default_factory=list)

    def release(self) -> None:
        self.layers.clear()
