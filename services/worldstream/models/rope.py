"""Rotary position embeddings with interleaved pairs (x[2i], x[2i+1]) rotated as one complex number."""
from __future__ import annotations

import torch


def rope_angles(max_positions: int, dim: int, theta: float) -> torch.Tensor:
    """Angles [max_positions, dim // 2] = position * theta^(-2j/dim), in float64 like the reference."""
    inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs of x[..., D] by angles whose cos/sin are [..., D // 2] (broadcastable).

    Computed in float32 and cast back to x's dtype (the reference rotates in float64 / float32 and casts back).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    even, odd = xf[..., 0], xf[..., 1]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
