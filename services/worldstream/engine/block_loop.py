"""The few-step causal block loop: one block of latent frames = S denoising calls + one cache-update call.

This is the single core that every front-end (batch, streaming service, golden checker) runs. Positions are
Python ints; timesteps and sigmas are host floats computed once; every device tensor the loop needs per step
is prepared before the first block, so the loop itself never waits on the device.

Besides blocks, the caches take clean latents at t = context_noise: a video's conditioning latents before the
first block (`condition`), and after a prompt switch the re-cache of the frames the window holds under the new
prompt (`switch_context`, LongLive).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from ..models.causal_wan import CausalWanModel
from ..models.kv_cache import DiTCaches, RingSlots, RollingWindow
from .scheduler import FlowMatchSchedule, flow_to_x0, renoise

Observer = Callable[[str, torch.Tensor], None]


class NoiseSource(Protocol):
    def __call__(self, like: torch.Tensor) -> torch.Tensor: ...


class GaussianNoise:
    """Per-session seeded N(0, 1) draws on the session's device (reproducible, independent of other sessions)."""

    def __init__(self, seed: int, device: torch.device | str):
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, device=like.device, dtype=like.dtype)


class SessionDiT:
    """One session's DiT caches and the DiT call on them (eager or compiled layer by layer)."""

    def __init__(self, model: CausalWanModel, caches: DiTCaches):
        self.model = model
        self.caches = caches

    @classmethod
    def create(cls, model: CausalWanModel, batch: int, latent_shape: tuple[int, int, int], context_tokens: int,
               **kwargs) -> "SessionDiT":
        param = next(model.parameters())
        _, ph, pw = model.cfg.patch_size
        tokens_per_frame = (latent_shape[1] // ph) * (latent_shape[2] // pw)
        return cls(model, model.new_caches(batch, tokens_per_frame, context_tokens, param.device, param.dtype),
                   **kwargs)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, start_frame: int,
                 keyboard_rows: torch.Tensor | None, mouse_rows: torch.Tensor | None) -> torch.Tensor:
        return self.model(x, t, cond, self.caches, start_frame, keyboard_rows, mouse_rows)

    def call_at(self, x: torch.Tensor, t: torch.Tensor, start_frame: int, slots: RingSlots) -> torch.Tensor:
        """A call of a text-to-video model with slots the cache policy gave for it (a re-cache; never graphed)."""
        frame_index = torch.arange(start_frame, start_frame + x.shape[2], device=x.device)
        return self.model.forward_at(x, t, None, self.caches, slots, frame_index)

    def release(self) -> None:
        self.caches.release()


class RecentLatents:
    """The most recent clean latents of a session (conditioning and generated), at least `frames` of them:
    what a re-cache runs over. Whole blocks, as they came; device memory of a few blocks."""

    def __init__(self, frames: int):
        self.frames = frames
        self.blocks: deque[torch.Tensor] = deque()
        self.held = 0

    def append(self, latents: torch.Tensor) -> None:
        self.blocks.append(latents)
        self.held += latents.shape[2]
        while self.held - self.blocks[0].shape[2] >= self.frames:
            self.held -= self.blocks.popleft().shape[2]

    def last(self, frames: int) -> torch.Tensor:
        """[B, C, frames, h, w]: the `frames` most recent latent frames."""
        if frames > self.held:
            raise ValueError(f"{frames} latent frames asked for, {self.held} held")
        return torch.cat(list(self.blocks), dim=2)[:, :, self.held - frames:]


class BlockDenoiser:
    """Runs blocks of one session through the DiT, on the session's DiT caches (`dit`; new caches if None).

    `context` is the session's cross-attention context: CLIP tokens (Matrix-Game-2) or the prompt's text context
    (Self-Forcing), embedded into the cross-attention caches once, here.
    """

    def __init__(self, model: CausalWanModel, context: torch.Tensor, latent_shape: tuple[int, int, int],
                 timesteps: list[float], schedule: FlowMatchSchedule, context_noise: float, noise: NoiseSource,
                 frames_per_block: int = 3, dit: SessionDiT | None = None):
        param = next(model.parameters())
        self.model = model
        self.device, self.dtype = param.device, param.dtype
        self.frames_per_block = frames_per_block
        channels, height, width = latent_shape
        batch, context_tokens = context.shape[:2]
        self.block_shape = (batch, channels, frames_per_block, height, width)
        self.dit = dit if dit is not None else SessionDiT.create(model, batch, latent_shape, context_tokens)
        self.set_context(context)
        self.noise = noise
        self.timesteps = timesteps
        self.sigmas = [schedule.sigma(t) for t in timesteps]
        self.step_t = [torch.full((batch, frames_per_block), t, device=self.device, dtype=torch.float32)
                       for t in timesteps]
        self.context_noise = float(context_noise)
        self.context_t = torch.full((batch, frames_per_block), self.context_noise, device=self.device,
                                    dtype=torch.float32)
        self.context_sigma = schedule.sigma(self.context_noise) if context_noise else 0.0
        self.clean_sigma = schedule.sigma(self.context_noise)  # x0 of a pass over clean latents (observed only)
        self._template = torch.empty(self.block_shape, device=self.device, dtype=self.dtype)
        self.first_block_frame = 0  # latent frames of conditioning before block 0
        self.frames_cached = 0  # latent frames [0, frames_cached) are in the caches
        self.recent = RecentLatents(model.cache_policy.frames)

    @torch.no_grad()
    def set_context(self, context: torch.Tensor) -> None:
        """Attend to `context` from the next call on (the cross-attention caches only)."""
        self.model.set_context(self.dit.caches, context.to(self.device, self.dtype))

    @torch.no_grad()
    def condition(self, latents: torch.Tensor, observe: Observer | None = None) -> None:
        """Cache clean conditioning latents [B, 16, T, h, w] (a video's, T a multiple of the block size) under
        the current context before the first block: `frames_per_block` of them per call at t = context_noise, as
        Self-Forcing's `initial_latent` loop; blocks then follow them. Never one call over more frames: that
        would not fit the window (spec §4.4)."""
        n = self.frames_per_block
        frames = latents.shape[2]
        if self.frames_cached:
            raise RuntimeError("conditioning goes before the first block")
        if frames == 0 or frames % n:
            raise ValueError(f"{frames} conditioning latent frames: give a multiple of the block size ({n})")
        latents = latents.to(self.device, self.dtype)
        for chunk, start in enumerate(range(0, frames, n)):
            x = latents[:, :, start:start + n]
            with record_function(f"condition_{chunk}"):
                flow = self.dit(x, self.context_t, None, start, None, None)
            if observe is not None:
                observe(f"cond{chunk}.flow_pred", flow)
                observe(f"cond{chunk}.x0_pred", flow_to_x0(x, flow, self.clean_sigma))
            self.recent.append(x)
        self.first_block_frame = self.frames_cached = frames

    @torch.no_grad()
    def switch_context(self, context: torch.Tensor, keep_sink: bool, observe: Observer | None = None) -> None:
        """From the next block on, attend to `context` (a new prompt's text context): LongLive's
        `_recache_after_switch`. The cross-attention caches take the new context (the reference empties them
        before and after the re-cache, and the next call fills them from the prompt: the same values), then one
        call at t = context_noise over the frames the window holds rewrites their keys/values under it
        (`RollingWindow.recache`: the sink stays with `keep_sink`). Before the first block it only sets the
        context."""
        policy = self.model.cache_policy
        if not isinstance(policy, RollingWindow):
            raise ValueError("prompt switching re-caches a rolling window (LongLive); this model's KV cache is "
                             "global")
        self.set_context(context)
        if not self.frames_cached:
            return
        start, slots = policy.recache(self.frames_cached, keep_sink)
        x = self.recent.last(slots.frames)
        t = torch.full(x.shape[:1] + x.shape[2:3], self.context_noise, device=self.device, dtype=torch.float32)
        with record_function("recache"):
            flow = self.dit.call_at(x, t, start, slots)
        if observe is not None:
            observe("recache.input", x)
            observe("recache.flow_pred", flow)
            observe("recache.x0_pred", flow_to_x0(x, flow, self.clean_sigma))

    @torch.no_grad()
    def denoise(self, block_index: int, cond_concat: torch.Tensor | None = None,
                keyboard_rows: torch.Tensor | None = None, mouse_rows: torch.Tensor | None = None,
                observe: Observer | None = None, clock=None,
                before_cache_update: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Generate the latents [B, 16, n, h, w] of block `block_index` and update the caches with them.

        The per-block conditioning is whatever the model takes: `cond_concat` channels, action rows, or nothing.
        `observe(name, tensor)` sees every intermediate (golden checks); `clock.mark(stage)` times the stages.
        `before_cache_update(latents)` runs once the steps are queued, before the cache update's DiT call: what
        it queues (a session's VAE decode) goes ahead of it on the stream; it must draw no noise.
        """
        start = self.first_block_frame + block_index * self.frames_per_block
        cond = cond_concat.to(self.device, self.dtype) if cond_concat is not None else None
        kb = keyboard_rows.to(self.device) if keyboard_rows is not None else None
        mouse = mouse_rows.to(self.device) if mouse_rows is not None else None

        def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.dit(x, t, cond, start, kb, mouse)

        x = self.noise(self._template)
        x0 = x
        for step, (t, sigma) in enumerate(zip(self.timesteps, self.sigmas)):
            with record_function(f"denoise_step_{step}_t{t:.1f}"):
                flow = call(x, self.step_t[step])
                x0 = flow_to_x0(x, flow, sigma)
            if observe is not None:
                observe(f"step{step}.noisy_input", x)
                observe(f"step{step}.flow_pred", flow)
                observe(f"step{step}.x0_pred", x0)
            if step + 1 < len(self.timesteps):
                x = renoise(x0, self.noise(x0), self.sigmas[step + 1])

        if clock is not None:
            clock.mark("denoise")
        if before_cache_update is not None:
            before_cache_update(x0)
        with record_function("cache_update"):
            # Re-run the clean block at t = context_noise so that the caches hold clean keys/values.
            context_input = renoise(x0, self.noise(x0), self.context_sigma) if self.context_sigma else x0
            context_flow = call(context_input, self.context_t)
        if clock is not None:
            clock.mark("cache_update")
        if observe is not None:
            observe("context.flow_pred", context_flow)
            observe("denoised", x0)
        self.frames_cached = start + self.frames_per_block
        self.recent.append(x0)
        return x0

    def release(self) -> None:
        self.dit.release()
