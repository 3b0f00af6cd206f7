"""Flow-matching schedule of the few-step distilled models (shift 5, 1000 training steps, `extra_one_step`).

Everything here is computed once on the host: the block loop only needs a handful of Python floats
(the warped timesteps and their sigmas), so no lookup ever runs on the device.
"""
from __future__ import annotations

import torch


class FlowMatchSchedule:
    def __init__(self, shift: float = 5.0, num_train_timesteps: int = 1000):
        base = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift * base / (1 + (shift - 1) * base)
        self.timesteps = self.sigmas * num_train_timesteps
        self.num_train_timesteps = num_train_timesteps

    def warp(self, denoising_step_list: list[int]) -> list[float]:
        """Map the config's integer step list onto the shifted table (1000, 666, 333 -> 1000, 908.84, 713.98)."""
        table = torch.cat([self.timesteps, torch.zeros(1)])
        return [float(table[self.num_train_timesteps - step]) for step in denoising_step_list]

    def sigma(self, timestep: float) -> float:
        """Sigma of the nearest table entry, as the reference looks it up."""
        index = int(torch.argmin((self.timesteps.double() - timestep).abs()))
        return float(self.sigmas[index])


def flow_to_x0(x_t: torch.Tensor, flow: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 = x_t - sigma * v, in float64 as the reference (the model predicts v = noise - x0)."""
    return (x_t.double() - sigma * flow.double()).to(flow.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Move a clean prediction to noise level sigma with fresh Gaussian noise (float32 arithmetic)."""
    return ((1 - sigma) * x0.float() + sigma * noise.float()).to(noise.dtype)
