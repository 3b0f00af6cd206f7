"""Matrix-Game-2 keyboard/mouse action module (the `action_model` of DiT layers 0-14).

Per block of `n` latent frames the module reads the 4n + 8 pixel-rate action rows that its windows cover
(latent frame i sees raw rows 4i-12 .. 4i-1, rows before 0 replaced by row 0; see `ActionTrack`).

* mouse branch: each patch position attends over time to its own history. Its input is the hidden state with
  the frame's 12-row mouse window (flattened time-major) appended after it; `mouse_mlp` -> `t_qkv` -> q, k, v.
* keyboard branch: the embedded 12-row keyboard window of each frame gives one key/value per frame, shared by
  every patch; the query comes from the (mouse-updated) hidden state.
Both branches normalise q and k by their RMS *without* the learned weights the checkpoint carries (the
reference never applies them), rotate the first 8 of 64 channels by the absolute latent-frame index (theta
256) and keep a rolling cache of `window` latent frames. The mouse branch attends 3 queries to at most 6 keys
per patch and head, which `few_key_attention` computes as plain broadcast products.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import LayerCaches, RingSlots, RingKVCache
from .rope import apply_rope, rope_angles

ROPE_MAX_FRAMES = 7500


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def few_key_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention over a handful of keys, [N, L, H, D] layout in and out, in float32.

    Flash kernels tile 64 or more queries per (batch, head): with the mouse branch's 3 queries per patch that
    is >95% padding over 14k (patch, head) pairs (3.3 ms of a 30 ms compiled DiT forward, H100); broadcast products
    fuse into a couple of small kernels under torch.compile.
    """
    scores = (q[:, :, None].float() * k[:, None].float()).sum(-1) * q.shape[-1] ** -0.5  # [N, Lq, Lk, H]
    return (scores.softmax(dim=2)[..., None] * v[:, None].float()).sum(2).to(q.dtype)


class UnappliedNorm(nn.Module):
    """Holds a norm weight that the checkpoint carries but the reference never multiplies by."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class ActionModule(nn.Module):
    def __init__(self, img_hidden_size: int, heads_num: int, keyboard_dim_in: int, hidden_size: int,
                 keyboard_hidden_dim: int, mouse_dim_in: int = 2, mouse_hidden_dim: int = 1024,
                 enable_mouse: bool = True, windows_size: int = 3, vae_time_compression_ratio: int = 4,
                 rope_dim_list: tuple[int, ...] = (8, 28, 28), rope_theta: float = 256.0, **_unused):
        super().__init__()
        self.heads = heads_num
        self.head_dim = sum(rope_dim_list)
        self.window_rows = windows_size * vae_time_compression_ratio  # 12 pixel-rate rows per latent frame
        self.stride_rows = vae_time_compression_ratio
        self.enable_mouse = enable_mouse
        if keyboard_hidden_dim != heads_num * self.head_dim:
            raise ValueError("keyboard_hidden_dim must equal heads_num * sum(rope_dim_list)")

        if enable_mouse:
            if mouse_hidden_dim != heads_num * self.head_dim:
                raise ValueError("mouse_hidden_dim must equal heads_num * sum(rope_dim_list)")
            self.mouse_mlp = nn.Sequential(
                nn.Linear(img_hidden_size + mouse_dim_in * self.window_rows, mouse_hidden_dim),
                nn.GELU(approximate="tanh"),
                nn.Linear(mouse_hidden_dim, mouse_hidden_dim),
                nn.LayerNorm(mouse_hidden_dim, eps=1e-5),
            )
            self.t_qkv = nn.Linear(mouse_hidden_dim, 3 * mouse_hidden_dim, bias=False)
            self.img_attn_q_norm = UnappliedNorm(self.head_dim)
            self.img_attn_k_norm = UnappliedNorm(self.head_dim)
            self.proj_mouse = nn.Linear(mouse_hidden_dim, img_hidden_size, bias=False)

        self.keyboard_embed = nn.Sequential(
            nn.Linear(keyboard_dim_in, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.mouse_attn_q = nn.Linear(img_hidden_size, keyboard_hidden_dim, bias=False)  # the keyboard query
        self.keyboard_attn_kv = nn.Linear(hidden_size * self.window_rows, 2 * keyboard_hidden_dim, bias=False)
        self.key_attn_q_norm = UnappliedNorm(self.head_dim)
        self.key_attn_k_norm = UnappliedNorm(self.head_dim)
        self.proj_keyboard = nn.Linear(keyboard_hidden_dim, img_hidden_size, bias=False)

        # Only the temporal axis has non-zero positions, so only its first rope_dim_list[0] channels rotate.
        angles = torch.zeros(ROPE_MAX_FRAMES, self.head_dim // 2, dtype=torch.float64)
        angles[:, :rope_dim_list[0] // 2] = rope_angles(ROPE_MAX_FRAMES, rope_dim_list[0], rope_theta)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    def new_caches(self, batch: int, tokens_per_frame: int, window: int, device, dtype) -> dict[str, RingKVCache]:
        caches = {"keyboard": RingKVCache(batch, window, 1, self.heads, self.head_dim, device, dtype)}
        if self.enable_mouse:
            caches["mouse"] = RingKVCache(batch * tokens_per_frame, window, 1, self.heads, self.head_dim,
                                             device, dtype)
        return caches

    def _windows(self, rows: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, 4n+8, C] action rows -> [B, n, 12 * C]: each latent frame's 12-row window, flattened time-major."""
        windows = rows.unfold(1, self.window_rows, self.stride_rows)[:, :frames]  # [B, n, C, 12]
        return windows.transpose(2, 3).flatten(2)

    def forward(self, x: torch.Tensor, tokens_per_frame: int, slots: RingSlots, frame_index: torch.Tensor,
                caches: LayerCaches, keyboard_rows: torch.Tensor, mouse_rows: torch.Tensor | None) -> torch.Tensor:
        """`frame_index` [n]: the block's absolute latent frames, on the device (the RoPE positions)."""
        b = x.shape[0]
        s = tokens_per_frame
        frames = slots.frames
        cos = self.rope_cos[frame_index][:, None, :]
        sin = self.rope_sin[frame_index][:, None, :]

        if self.enable_mouse:
            hidden = x.unflatten(1, (frames, s)).transpose(1, 2).reshape(b * s, frames, -1)  # per patch, over time
            mouse = self._windows(mouse_rows.to(x.dtype), frames)  # [B, n, 24]
            mouse = mouse[:, None].expand(b, s, frames, mouse.shape[-1]).reshape(b * s, frames, -1)
            qkv = self.t_qkv(self.mouse_mlp(torch.cat([hidden, mouse], dim=-1)))
            q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # [B*S, n, H, D]
            q = apply_rope(rms_normalize(q), cos, sin)
            k = apply_rope(rms_normalize(k), cos, sin)
            k_all, v_all = caches.mouse.update(k, v, slots)
            attn = few_key_attention(q, k_all, v_all)
            attn = attn.reshape(b, s, frames, -1).transpose(1, 2).reshape(b, frames * s, -1)
            x = x + self.proj_mouse(attn)

        keys = self._windows(self.keyboard_embed(keyboard_rows.to(x.dtype)), frames)  # [B, n, 12 * hidden]
        k, v = self.keyboard_attn_kv(keys).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)  # [B, n, H, D]
        q = self.mouse_attn_q(x).unflatten(-1, (self.heads, self.head_dim)).unflatten(1, (frames, s))  # [B,n,S,H,D]
        q = apply_rope(rms_normalize(q), cos[:, None], sin[:, None])
        k = apply_rope(rms_normalize(k), cos, sin)
        k_all, v_all = caches.keyboard.update(k, v, slots)
        # Keys are shared by all patches of a sample, so every query of the block attends to the same window.
        attn = F.scaled_dot_product_attention(q.flatten(1, 2).transpose(1, 2), k_all.transpose(1, 2),
                                              v_all.transpose(1, 2))
        return x + self.proj_keyboard(attn.transpose(1, 2).flatten(2))
