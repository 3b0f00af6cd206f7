"""CLIP ViT-H/14 visual tower of the open-clip XLM-RoBERTa-large CLIP, as Wan / Matrix-Game-2 use it.

The image-conditioning path only needs `visual_context`: the hidden states after all but the last of the
transformer blocks (no `post_norm`, no `head`). The module still owns the last block, `post_norm` and `head`
so that the `visual.*` part of `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth` loads strictly.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_PREFIX = "visual."


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (the reference normalises in fp32 even under bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class PackedSelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; `to_qkv` output features are laid out as (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.to_qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).flatten(2))


class VisionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1 x), then x + mlp(norm2 x) with an exact-GELU MLP."""

    def __init__(self, dim: int, mlp_ratio: int, num_heads: int, eps: float):
        super().__init__()
        hidden = dim * mlp_ratio
        self.norm1 = FP32LayerNorm(dim, eps=eps)
        self.attn = PackedSelfAttention(dim, num_heads)
        self.norm2 = FP32LayerNorm(dim, eps=eps)
        # Indices 0 and 2 carry the checkpoint's `mlp.0.*` / `mlp.2.*` keys.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nn.Module):
    """ViT with a CLS token and pre-norm; state-dict keys are the checkpoint's `visual.*` keys minus `visual.`.

    `embed_dim` is the width of the (unused) CLIP projection `head` [dim, embed_dim]; 1024 for ViT-H/14.
    """

    def __init__(self, image_size: int = 224, patch_size: int = 14, dim: int = 1280, mlp_ratio: int = 4,
                 num_heads: int = 16, num_layers: int = 32, eps: float = 1e-5, embed_dim: int = 1024,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if num_layers < 2:
            raise ValueError("the tower returns the output of all but the last block: it needs >= 2 blocks")
        self.image_size = image_size
        self.num_tokens = 1 + (image_size // patch_size) ** 2
        gain = 1.0 / math.sqrt(dim)
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls_embedding = nn.Parameter(gain * torch.randn(1, 1, dim))
        self.pos_embedding = nn.Parameter(gain * torch.randn(1, self.num_tokens, dim))
        self.pre_norm = FP32LayerNorm(dim, eps=eps)
        self.transformer = nn.Sequential(*(VisionBlock(dim, mlp_ratio, num_heads, eps) for _ in range(num_layers)))
        self.post_norm = FP32LayerNorm(dim, eps=eps)
        self.head = nn.Parameter(gain * torch.randn(dim, embed_dim))
        # Not persistent: they are constants of the preprocessing, not checkpoint entries.
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> CLIP-normalised pixels [B*T, 3, image_size, image_size] (b-major).

        The frame is squashed to a square (no crop), bicubic without antialias, like the reference.
        """
        frames = video.transpose(1, 2).flatten(0, 1)
        frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bicubic",
                               align_corners=False)
        frames = frames * 0.5 + 0.5
        return (frames - self.pixel_mean.to(frames.dtype)) / self.pixel_std.to(frames.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [N, 3, S, S] -> hidden states after all but the last block [N, 1 + (S/p)^2, dim]."""
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding)
        for block in self.transformer[:-1]:
            x = block(x)
        return x

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [-1, 1] -> `visual_context` [B*T, 1 + (image_size/patch)^2, dim]."""
        return self(self.preprocess(video))


def clip_visual_state_dict(full_sd: Mapping[str, torch.Tensor], prefix: str = VISUAL_PREFIX) -> dict[str, torch.Tensor]:
    """The visual-tower entries of a full CLIP state dict, with `prefix` stripped (text tower dropped)."""
    visual = {key[len(prefix):]: value for key, value in full_sd.items() if key.startswith(prefix)}
    if not visual:
        raise KeyError(f"no key starting with {prefix!r} in the CLIP state dict")
    return visual
