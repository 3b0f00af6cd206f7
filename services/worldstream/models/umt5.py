"""UMT5-XXL text encoder as Wan runs it (`umt5_xxl(encoder_only=True)`), the text path of Self-Forcing/LongLive.

A T5 encoder with UMT5's per-layer relative position bias: token ids [B, L] and their attention mask -> hidden
states [B, L, dim]. Parameter names are those of `models_t5_umt5-xxl-enc-bf16.pth` (no prefix, no biases).
The math follows Wan's `t5.py`, which differs from textbook attention in two ways that matter: the logits are
not scaled by 1/sqrt(head_dim), and each layer adds its own bucketed bias table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .causal_wan import RMSNorm  # T5's layer norm: RMS without mean subtraction, scale only

CHECKPOINT_FILE = "models_t5_umt5-xxl-enc-bf16.pth"


@dataclass
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional bucket of each offset `relative` = key index - query index.

    Half of the buckets per direction (keys before or at the query, then keys after it); within a half, offsets
    below a quarter of `num_buckets` get a bucket each, larger ones share log-spaced buckets up to
    `max_distance`, beyond which all offsets share the last bucket.
    """
    half = num_buckets // 2
    exact = half // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    # in float32, as the reference computes it
    log_ratio = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One learned bias per (bucket, head); key `pos_embedding.embedding.weight` [num_buckets, heads]."""

    def __init__(self, num_buckets: int, num_heads: int):
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        """Buckets [L (query), L (key)] -> bias [1, heads, L, L]."""
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads != 0:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; `bias` [B, heads, L, L] added to the logits (padding keys already set to -max)."""
        q, k, v = (proj(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # T5: no 1/sqrt(head_dim)
        return self.o(out.transpose(1, 2).flatten(2))


class GatedGeluFFN(nn.Module):
    """fc2(fc1(x) * gelu_tanh(gate(x))); `gate` is a Sequential so its weight is the checkpoint's `gate.0.weight`."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class UMT5Block(nn.Module):
    """Pre-norm attention + gated FFN, with the layer's own relative position bias (UMT5, no sharing)."""

    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = T5Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = GatedGeluFFN(cfg.dim, cfg.dim_ffn)
        self.pos_embedding = RelativePositionBias(cfg.num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, padding_keys: torch.Tensor) -> torch.Tensor:
        # The reference replaces (not adds to) the position bias at padding keys with the dtype's minimum.
        bias = self.pos_embedding(buckets).masked_fill(padding_keys, torch.finfo(x.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class UMT5Encoder(nn.Module):
    def __init__(self, cfg: UMT5Config | None = None):
        super().__init__()
        self.cfg = cfg = cfg or UMT5Config()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(UMT5Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [B, L] (mask 1 = token, 0 = padding) -> [B, L, dim] after the final norm.

        Padding rows are computed as in the reference (as queries only: they never reach the real rows);
        `encode` zeroes them.
        """
        positions = torch.arange(ids.shape[1], device=ids.device)
        buckets = relative_position_bucket(positions[None, :] - positions[:, None], self.cfg.num_buckets,
                                           self.cfg.max_distance)
        padding_keys = (mask == 0)[:, None, None, :]  # [B, 1, 1 (query), L (key)]
        x = self.token_embedding(ids)
        for block in self.blocks:
            x = block(x, buckets, padding_keys)
        return self.norm(x)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text context as Wan's `WanTextEncoder` returns it: [B, L, dim] with the padding rows zero.

        Padding keys get no attention weight, so running up to the longest prompt only gives the valid rows of
        the reference's full-length run (up to float rounding). The reference zeroes the rows from the count of
        mask ones on; the tokenizer's masks are prefixes, so zeroing where the mask is 0 is the same.
        """
        context = self.norm.weight.new_zeros(*ids.shape, self.cfg.dim)
        longest = int(mask.sum(dim=1).max())
        ids, mask = ids[:, :longest], mask[:, :longest]
        context[:, :longest] = self(ids, mask).masked_fill((mask == 0)[..., None], 0)
        return context
