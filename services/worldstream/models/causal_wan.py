"""Causal Wan2.1 DiT (`CausalWanModel`, KV-cached block-wise inference): one code path, several configurations.

* Matrix-Game-2: image cross-attention (CLIP tokens through `img_emb`), `cond_concat` channels concatenated to
  the latents (in_dim 36), the keyboard/mouse action module in the first layers, a rolling KV window.
* Self-Forcing (Wan2.1-T2V-1.3B): text cross-attention (UMT5 context through `text_embedding`), in_dim 16, no
  action module, a global KV cache of 21 latent frames.
* LongLive v1.0: Self-Forcing's model with a rolling window of 12 latent frames whose first 3 (the frame sink)
  never leave, and its LoRA merged into the weights at load (`lora.py`), so that it runs the same Linears.

What differs is configuration (`DiTConfig`): the context embedder, the extra input channels, the action layers
and the cache policy; everything else (blocks, RoPE, caches, head) is shared. Parameter names and module nesting
follow the published checkpoints (which prefix every key with `model.`). One call processes one block of latent
frames: input [B, 16, n, h, w] plus its conditioning, output the flow (velocity) prediction of the same shape.
State between calls lives in `DiTCaches`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .action_module import ActionModule
from .kv_cache import CachePolicy, DiTCaches, GlobalWindow, LayerCaches, RingKVCache, RingSlots, RollingWindow
from .rope import apply_rope, rope_angles

ROPE_MAX_FRAMES = 1024  # the reference's temporal RoPE table: latent frames 0..1023


@dataclass
class ActionConfig:
    blocks: list[int] = field(default_factory=lambda: list(range(15)))
    enable_keyboard: bool = True
    enable_mouse: bool = True
    heads_num: int = 16
    hidden_size: int = 128
    img_hidden_size: int = 1536
    keyboard_dim_in: int = 4
    keyboard_hidden_dim: int = 1024
    mouse_dim_in: int = 2
    mouse_hidden_dim: int = 1024
    mouse_qk_dim_list: list[int] = field(default_factory=lambda: [8, 28, 28])
    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    qk_norm: bool = True
    qkv_bias: bool = False
    rope_dim_list: list[int] = field(default_factory=lambda: [8, 28, 28])
    rope_theta: float = 256.0
    vae_time_compression_ratio: int = 4
    windows_size: int = 3


@dataclass
class DiTConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    in_dim: int = 16  # latent channels + conditioning channels (`cond_concat`) concatenated to them
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    # The cross-attention context, exactly one of: CLIP image tokens of width clip_dim through `img_emb`, or the
    # UMT5 text context of width text_dim through `text_embedding`, zero-padded to text_len rows.
    clip_dim: int | None = None
    text_dim: int | None = None
    text_len: int = 512
    local_attn_size: int = -1  # KV window in latent frames; -1: global attention over the session
    sink_size: int = 0
    global_cache_frames: int = 21  # the global KV cache's size (the reference's 32760 = 21 x 1560 tokens)
    action: ActionConfig | None = None  # the keyboard/mouse action module and the layers that have it

    def __post_init__(self):
        if (self.clip_dim is None) == (self.text_dim is None):
            raise ValueError("a DiT config sets exactly one of clip_dim (image cross-attention) and text_dim "
                             f"(text cross-attention); got clip_dim={self.clip_dim}, text_dim={self.text_dim}")
        if self.in_dim < self.out_dim:
            raise ValueError(f"in_dim ({self.in_dim}) holds the {self.out_dim} latent channels plus the conditioning "
                             "channels, so it cannot be smaller than out_dim")

    @property
    def cond_channels(self) -> int:
        """Channels of the per-block `cond_concat` input (0: the model takes none)."""
        return self.in_dim - self.out_dim

    def cache_policy(self) -> CachePolicy:
        if self.local_attn_size == -1:
            if self.sink_size != 0:
                raise ValueError(f"sink_size {self.sink_size}: a frame sink belongs to a rolling window; set "
                                 "local_attn_size (LongLive: 12) or sink_size 0")
            return GlobalWindow(self.global_cache_frames)
        if self.local_attn_size < 1:
            raise ValueError(f"local_attn_size must be -1 (global) or >= 1 latent frames, got {self.local_attn_size}")
        return RollingWindow(self.local_attn_size, self.sink_size)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] layout in and out; softmax scale 1/sqrt(D), no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class AttentionProjections(nn.Module):
    """q/k/v/o projections with RMS-normalised queries and keys (over the full width), as Wan names them."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)


class SelfAttention(AttentionProjections):
    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor, cache: RingKVCache,
                slots: RingSlots) -> torch.Tensor:
        heads = (self.num_heads, self.head_dim)
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, heads), rope_cos, rope_sin)
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, heads), rope_cos, rope_sin)
        v = self.v(x).unflatten(-1, heads)
        k_all, v_all = cache.update(k, v, slots)  # keys are cached after RoPE, at absolute positions
        return self.o(attention(q, k_all, v_all).flatten(2))


class CrossAttention(AttentionProjections):
    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.num_heads, self.head_dim)
        return self.norm_k(self.k(context)).unflatten(-1, heads), self.v(context).unflatten(-1, heads)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, self.head_dim))
        return self.o(attention(q, k, v).flatten(2))


class CausalWanBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, with_action: bool):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)
        self.action_model = ActionModule(**vars(cfg.action)) if with_action else None

    def forward(self, x: torch.Tensor, e: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                caches: LayerCaches, slots: RingSlots, frame_index: torch.Tensor, keyboard_rows: torch.Tensor | None,
                mouse_rows: torch.Tensor | None) -> torch.Tensor:
        # e: [B, n, 6, dim] per-frame modulation; each vector is broadcast over its frame's tokens.
        # Positions arrive as tensors (rope_*, frame_index) and `slots`, never as the absolute start frame, so
        # that a compiled block specialises on the three ring phases of a session only.
        frames = slots.frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.unsqueeze(1) + e).unbind(2)

        def per_frame(t: torch.Tensor, fn) -> torch.Tensor:
            return fn(t.unflatten(1, (frames, -1))).flatten(1, 2)

        y = per_frame(self.norm1(x), lambda t: t * (1 + scale_msa[:, :, None]) + shift_msa[:, :, None])
        y = self.self_attn(y, rope_cos, rope_sin, caches.self_attn, slots)
        x = x + per_frame(y, lambda t: t * gate_msa[:, :, None])
        x = x + self.cross_attn(self.norm3(x), caches.cross_k, caches.cross_v)
        if self.action_model is not None:
            x = self.action_model(x, x.shape[1] // frames, slots, frame_index, caches, keyboard_rows, mouse_rows)
        y = per_frame(self.norm2(x), lambda t: t * (1 + scale_mlp[:, :, None]) + shift_mlp[:, :, None])
        y = self.ffn(y)
        return x + per_frame(y, lambda t: t * gate_mlp[:, :, None])


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, int, int], eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, frames: int) -> torch.Tensor:
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).unbind(2)  # e: [B, n, dim]
        y = self.norm(x).unflatten(1, (frames, -1)) * (1 + scale[:, :, None]) + shift[:, :, None]
        return self.head(y.flatten(1, 2))


# -- context embedders: the cross-attention context of each configuration -------------------------------------------

class MLPProj(nn.Module):
    """CLIP image tokens [B, T, clip_dim] -> DiT width (`img_emb`, Wan i2v)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(in_dim, eps=1e-5), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), LayerNorm(out_dim, eps=1e-5))

    def context_tokens(self, given: int) -> int:
        return given

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TextEmbedding(nn.Sequential):
    """UMT5 context [B, L <= text_len, text_dim] -> [B, text_len, dim] (`text_embedding`, Wan t2v).

    Short contexts are zero-padded to text_len rows first, as the reference does; there is no padding mask, so
    every row (the MLP makes the zero rows non-zero) takes part in cross-attention.
    """

    def __init__(self, text_dim: int, dim: int, text_len: int):
        super().__init__(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.text_len = text_len

    def context_tokens(self, given: int) -> int:
        if given > self.text_len:
            raise ValueError(f"the text context has {given} rows; this model takes at most text_len={self.text_len}")
        return self.text_len

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        context = F.pad(context, (0, 0, 0, self.context_tokens(context.shape[1]) - context.shape[1]))
        return super().forward(context)


def build_context_embedder(cfg: DiTConfig) -> tuple[str, MLPProj | TextEmbedding]:
    """The configuration's context embedder and its checkpoint name."""
    if cfg.text_dim is not None:
        return "text_embedding", TextEmbedding(cfg.text_dim, cfg.dim, cfg.text_len)
    return "img_emb", MLPProj(cfg.clip_dim, cfg.dim)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    """[cos | sin] of position * 10000^(-i / (dim/2)), in float64 as the reference."""
    half = dim // 2
    p = position.to(torch.float64)
    angles = torch.outer(p, torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=p.device) / half))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class CausalWanModel(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.cache_policy = cfg.cache_policy()
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.context_name, embedder = build_context_embedder(cfg)
        self.add_module(self.context_name, embedder)
        action_layers = set(cfg.action.blocks) if cfg.action is not None else set()
        self.blocks = nn.ModuleList(CausalWanBlock(cfg, i in action_layers) for i in range(cfg.num_layers))
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)

        # RoPE split of each head: temporal gets d - 4*(d//6) dims, height and width 2*(d//6) each.
        d = dim // cfg.num_heads
        axis_dims = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
        angles = [rope_angles(ROPE_MAX_FRAMES, a, 10000.0) for a in axis_dims]
        for name, a in zip(("t", "h", "w"), angles):
            self.register_buffer(f"rope_cos_{name}", a.cos().float(), persistent=False)
            self.register_buffer(f"rope_sin_{name}", a.sin().float(), persistent=False)

    # -- session state -------------------------------------------------------------------------------------------
    @property
    def context_embedder(self) -> MLPProj | TextEmbedding:
        return getattr(self, self.context_name)

    def new_caches(self, batch: int, tokens_per_frame: int, context_tokens: int, device, dtype) -> DiTCaches:
        """Every cache of a session, preallocated (`set_context` fills the cross-attention ones in place);
        `context_tokens`: rows of the context the session will give `set_context`."""
        cfg = self.cfg
        window = self.cache_policy.frames
        head_dim = cfg.dim // cfg.num_heads
        cross_shape = (batch, self.context_embedder.context_tokens(context_tokens), cfg.num_heads, head_dim)
        caches = DiTCaches()
        for block in self.blocks:
            layer = LayerCaches(RingKVCache(batch, window, tokens_per_frame, cfg.num_heads, head_dim, device, dtype),
                                torch.empty(cross_shape, device=device, dtype=dtype),
                                torch.empty(cross_shape, device=device, dtype=dtype))
            if block.action_model is not None:
                for name, cache in block.action_model.new_caches(batch, tokens_per_frame, window, device, dtype).items():
                    setattr(layer, name, cache)
            caches.layers.append(layer)
        return caches

    def set_context(self, caches: DiTCaches, context: torch.Tensor) -> None:
        """Project the context (CLIP tokens or the prompt's text context) into every layer's cross-attention
        keys/values, once per context: per session, or per prompt where prompts switch (in place: captured CUDA
        graphs read these buffers)."""
        context = self.context_embedder(context)
        for block, layer in zip(self.blocks, caches.layers):
            k, v = block.cross_attn.context_kv(context)
            layer.cross_k.copy_(k)
            layer.cross_v.copy_(v)

    # -- one block --------------------------------------------------------------------------------------------------
    def ring_slots(self, start_frame: int, frames: int) -> RingSlots:
        """Where a call of `frames` latent frames starting at `start_frame` lands in the caches (checked)."""
        if start_frame + frames > ROPE_MAX_FRAMES:
            raise ValueError(f"latent frame {start_frame + frames - 1} is past the RoPE table ({ROPE_MAX_FRAMES})")
        return self.cache_policy.slots(start_frame, frames)

    def _rope(self, frame_index: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        frames = frame_index.shape[0]

        def grid(table_t, table_h, table_w):
            t = table_t[frame_index][:, None, None, :].expand(frames, h, w, -1)
            hh = table_h[None, :h, None, :].expand(frames, h, w, -1)
            ww = table_w[None, None, :w, :].expand(frames, h, w, -1)
            return torch.cat([t, hh, ww], dim=-1).reshape(frames * h * w, 1, -1)  # [L, 1 (heads), D/2]

        return (grid(self.rope_cos_t, self.rope_cos_h, self.rope_cos_w),
                grid(self.rope_sin_t, self.rope_sin_h, self.rope_sin_w))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond_concat: torch.Tensor | None, caches: DiTCaches,
                start_frame: int, keyboard_rows: torch.Tensor | None = None,
                mouse_rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 16, n, H, W] noisy latents, timestep [B, n] (float), cond_concat [B, in_dim - 16, n, H, W] (None
        when in_dim is 16); keyboard_rows/mouse_rows [B, 4n+8, K] the action rows this block's windows read (with
        an action module). Returns the flow."""
        frames = x.shape[2]
        slots = self.ring_slots(start_frame, frames)
        frame_index = torch.arange(start_frame, start_frame + frames, device=x.device)
        return self.forward_at(x, timestep, cond_concat, caches, slots, frame_index, keyboard_rows, mouse_rows)

    def forward_at(self, x: torch.Tensor, timestep: torch.Tensor, cond_concat: torch.Tensor | None, caches: DiTCaches,
                   slots: RingSlots, frame_index: torch.Tensor, keyboard_rows: torch.Tensor | None = None,
                   mouse_rows: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` with the positions given as the ring phase `slots` and the device tensor `frame_index` [n]
        (the block's absolute latent frames): nothing here depends on the absolute frame as a Python value, so
        one CUDA graph captured per ring phase replays for every block of that phase."""
        b, _, frames, height, width = x.shape
        pt, ph, pw = self.cfg.patch_size
        inputs = x if cond_concat is None else torch.cat([x, cond_concat], dim=1)
        tokens = self.patch_embedding(inputs.to(self.patch_embedding.weight.dtype))
        gh, gw = tokens.shape[3], tokens.shape[4]
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, n*gh*gw, dim], frame-major

        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, timestep.flatten()).to(tokens.dtype))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim)).unflatten(0, (b, frames))  # [B, n, 6, dim]
        rope_cos, rope_sin = self._rope(frame_index, gh, gw)

        for block, layer in zip(self.blocks, caches.layers):
            tokens = block(tokens, e0, rope_cos, rope_sin, layer, slots, frame_index, keyboard_rows, mouse_rows)

        out = self.head(tokens, e.unflatten(0, (b, frames)), frames)  # [B, L, pt*ph*pw*C]
        out = out.reshape(b, frames, gh, gw, pt, ph, pw, self.cfg.out_dim)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.cfg.out_dim, frames * pt, gh * ph, gw * pw)
