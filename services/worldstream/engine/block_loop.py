"""The few-step causal block loop: one block of latent frames = S denoising calls + one cache-update call.

This is the single core that every front-end (batch, streaming service, golden checker) runs. Positions are
Python ints; timesteps and sigmas are host floats computed once; every device tensor the loop needs per step
is prepared before the first block, so the loop itself never waits on the device.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from ..models.causal_wan import CausalWanModel
from ..models.kv_cache import DiTCaches
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

    def release(self) -> None:
        self.caches.release()


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
        model.set_context(self.dit.caches, context.to(self.device, self.dtype))
        self.noise = noise
        self.timesteps = timesteps
        self.sigmas = [schedule.sigma(t) for t in timesteps]
        self.step_t = [torch.full((batch, frames_per_block), t, device=self.device, dtype=torch.float32)
                       for t in timesteps]
        self.context_t = torch.full((batch, frames_per_block), float(context_noise), device=self.device,
                                    dtype=torch.float32)
        self.context_sigma = schedule.sigma(float(context_noise)) if context_noise else 0.0
        self._template = torch.empty(self.block_shape, device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def denoise(self, block_index: int, cond_concat: torch.Tensor | None = None,
                keyboard_rows: torch.Tensor | None = None, mouse_rows: torch.Tensor | None = None,
                observe: Observer | None = None, clock=None) -> torch.Tensor:
        """Generate the latents [B, 16, n, h, w] of block `block_index` and update the caches with them.

        The per-block conditioning is whatever the model takes: `cond_concat` channels, action rows, or nothing.
        `observe(name, tensor)` sees every intermediate (golden checks); `clock.mark(stage)` times the stages.
        """
        start = block_index * self.frames_per_block
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
        with record_function("cache_update"):
            # Re-run the clean block at t = context_noise so that the caches hold clean keys/values.
            context_input = renoise(x0, self.noise(x0), self.context_sigma) if self.context_sigma else x0
            context_flow = call(context_input, self.context_t)
        if clock is not None:
            clock.mark("cache_update")
        if observe is not None:
            observe("context.flow_pred", context_flow)
            observe("denoised", x0)
        return x0

    def release(self) -> None:
        self.dit.release()
