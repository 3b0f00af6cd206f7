"""Preallocated KV caches for causal, block-wise generation, and the policies that say which frames they keep.

Every cache holds `frames` latent frames of keys/values in slots. Attention over a cache is unmasked and the keys
are cached after RoPE, so the order of the slots never matters: only which frames they hold. The cache policy
says that:

* `GlobalWindow` (Self-Forcing's global attention): every frame of the session, up to `frames` (21), frame f in
  slot f. A call past the end is an error, so the cache bounds the session's length.
* `RollingWindow` (Matrix-Game-2's local attention; LongLive's with a frame sink): the first `sink` frames of
  the session stay for good, the others roll: the most recent `frames - sink` of them live in a ring over the
  slots [sink, frames). The references shift their buffers left when a new block does not fit (never moving the
  sink); the ring keeps the same frames without copies.

LongLive adds the re-cache after a prompt switch (`RollingWindow.recache`): one call over the most recent frames
that rewrites their slots under the new prompt without moving the session on. Once the window has rolled it
leaves the sink as it is (`keep_sink`, LongLive's `global_sink: true`) or rewrites it with the oldest frames of
the window (`global_sink: false`).

Positions are plain Python ints owned by the caller: no index ever lives on the device, so updating a cache
never synchronises with the host. A call sees the cache only through its `RingSlots`, which take few values in
a whole session (three for blocks of 3 frames in a rolling window of 6, seven in a global cache of 21, six with
LongLive's sink of 3 in a window of 12), so compiled layers and captured CUDA graphs specialise on those and
never on the ever-growing frame index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class RingSlots:
    """Where a call of `frames` latent frames lands in a cache of `window` slots (`RingKVCache.update`).

    The call's frames go to consecutive slots from `first`, wrapping from the last slot back to `ring_start`
    (the slots before it hold the sink); its first `sink_frames` frames go to the sink slots [0, sink_frames)
    instead (a re-cache that rewrites the sink). Attention then reads slots [0, valid).
    """

    first: int  # slot of the call's first frame (after the `sink_frames` ones)
    frames: int
    valid: int  # slots that hold data once the call is written
    ring_start: int = 0
    sink_frames: int = 0

    @classmethod
    def of(cls, start_frame: int, frames: int, window: int) -> "RingSlots":
        """A ring over all `window` slots (no sink): frame f in slot f % window."""
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
    """The `sink` first latent frames and the most recent `frames - sink`: a new block overwrites the oldest
    frames after the sink, which never leaves (LongLive's frame sink; Matrix-Game-2 has none)."""

    frames: int
    sink: int = 0

    def __post_init__(self):
        if not 0 <= self.sink < self.frames:
            raise ValueError(f"a frame sink of {self.sink} latent frames does not leave a rolling part in a window "
                             f"of {self.frames}")

    @property
    def max_frames(self) -> None:
        return None

    def slots(self, start_frame: int, frames: int) -> RingSlots:
        if start_frame + frames <= self.frames:  # the window has not rolled yet: frame f in slot f
            return RingSlots(start_frame, frames, start_frame + frames, self.sink)
        ring = self.frames - self.sink
        if frames > ring or start_frame < self.sink:
            raise ValueError(f"latent frames {start_frame}..{start_frame + frames - 1} do not fit the rolling part "
                             f"({ring} frames after a sink of {self.sink}) of a window of {self.frames} frames")
        return RingSlots(self.sink + (start_frame - self.sink) % ring, frames, self.frames, self.sink)

    def recache(self, end_frame: int, keep_sink: bool) -> tuple[int, RingSlots]:
        """The re-cache call after a prompt switch when frames [0, end_frame) are cached: (its first frame, its
        slots). It rewrites the frames the window holds, under the new prompt, and leaves the session where it
        is (LongLive's `_recache_after_switch`, the reference's protected recompute):

        * before the window rolls, every cached frame, sink included (the reference's call starts at frame 0,
          which it never protects);
        * after, with `keep_sink`, the `frames - sink` most recent frames: the sink keeps the keys it has. The
          reference runs the `sink` frames before them too, but their keys land in the protected sink, which
          keeps its own, and their outputs are discarded: the same cache for a quarter less work (LongLive);
        * after, without `keep_sink`, the `frames` most recent frames, the oldest `sink` of them into the sink.
        """
        if end_frame <= self.frames:
            return 0, RingSlots(0, end_frame, end_frame, self.sink)
        ring = self.frames - self.sink
        if keep_sink or self.sink == 0:
            return end_frame - ring, self.slots(end_frame - ring, ring)
        first = self.slots(end_frame - ring, ring).first
        return end_frame - self.frames, RingSlots(first, self.frames, self.frames, self.sink, self.sink)


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
    """The distinct `RingSlots` of a session's blocks, in order: every shape a compiled block loop takes. (The
    next block's slots follow from the current one's, so the first repeat closes the cycle.)"""
    phases: list[RingSlots] = []
    limit = policy.max_frames
    while limit is None or (len(phases) + 1) * frames_per_block <= limit:
        slots = policy.slots(len(phases) * frames_per_block, frames_per_block)
        if slots in phases:
            break
        phases.append(slots)
    return phases


def recache_phases(policy: RollingWindow, frames_per_block: int, keep_sink: bool) -> dict[RingSlots, int]:
    """The distinct `RingSlots` of the re-cache calls of switches at block boundaries (every shape a compiled
    re-cache takes: one per block while the window fills, then one per ring rotation), each with the first
    block before which a switch has it."""
    phases: dict[RingSlots, int] = {}
    for block in range(1, 2 * policy.frames - policy.sink + 1):  # past the filling blocks and one rotation
        phases.setdefault(policy.recache(block * frames_per_block, keep_sink)[1], block)
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
        sink, first = slots.sink_frames, slots.first
        if sink:
            self.k[:, :sink * t] = k[:, :sink * t]
            self.v[:, :sink * t] = v[:, :sink * t]
        n = slots.frames - sink
        head = min(n, self.window - first)
        self.k[:, first * t:(first + head) * t] = k[:, sink * t:(sink + head) * t]
        self.v[:, first * t:(first + head) * t] = v[:, sink * t:(sink + head) * t]
        if head < n:  # wrap around to the start of the ring
            ring = slots.ring_start * t
            self.k[:, ring:ring + (n - head) * t] = k[:, (sink + head) * t:]
            self.v[:, ring:ring + (n - head) * t] = v[:, (sink + head) * t:]
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
