"""EDEN frame-pair interpolation (`bbldCVer/EDEN`, CVPR 2025): two frames in, the middle frame out.

Parameter names follow the published `eden.pt` (its `eden` entry: 157,882,400 fp32 parameters at full size).
One pair goes through four stages; the first two may run in another process than the last two:

1. `encode_pairs` (no parameters): replicate-pad the frames to a multiple of 32, the normalised cosine
   `difference` of the unpadded frames, and each padded frame's mean and std -> `FramePairs`.
2. `EdenPatchify.patchify` (1,184,256 parameters): normalise each frame by its own stats, patchify and add the
   positional embedding -> the cond tokens of the DiT and of the decoder, `PairTokens`.
3. `Eden.sample`: two Euler steps of the velocity DiT on the fixed grid t = [0, 0.75, 1], from noise (t = 0) to
   the query latents (t = 1), on a grid of half the token resolution.
4. `Eden.decode`: a transformer decoder from the un-scaled latents to pixels, de-normalised by the pair's stats.

Everything a request owns (geometry, stats, difference, cond tokens) lives in its `FramePairs` / `PairTokens`
object and is passed through the calls; the modules hold only weights, so concurrent requests cannot mix
(the reference keeps ph, pw, stats and the decoder's tokens on the module between `denoise` and `decode`).
Every stage takes K pairs of one size at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

POS_BASE_GRID = (16, 28)  # the positional embedding is resolution-normalised to a 16 x 28 token grid
TIME_FREQUENCIES = 256


@dataclass(frozen=True)
class EdenConfig:
    # architecture (`model_args` of configs/eval_eden.yaml)
    in_dim: int = 3
    out_dim: int = 3
    patch_size: int = 16
    latent_dim: int = 16
    hidden_dim: int = 768
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dit_depth: int = 12
    decoder_depth: int = 4
    qkv_bias: bool = False
    eps: float = 1e-6
    # inference constants of the same file
    cos_sim_mean: float = 0.990539
    cos_sim_std: float = 0.0608093
    vae_scaler: float = 0.179437
    vae_shift: float = 0.770202
    time_grid: tuple[float, ...] = (0.0, 0.75, 1.0)  # the reference ignores `num_steps` and uses this grid


# ---- per-request state --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PairGeometry:
    """Unpadded frame size and its replicate padding to a multiple of 2 x patch (the query grid is half the token
    grid): `pad = (-n) mod multiple`, half of it before (rounded down), the rest after."""
    height: int
    width: int
    patch_size: int = 16

    @property
    def multiple(self) -> int:
        return 2 * self.patch_size

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right)."""
        pad_h, pad_w = -self.height % self.multiple, -self.width % self.multiple
        return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2

    @property
    def padded_size(self) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        return self.height + top + bottom, self.width + left + right

    @property
    def token_grid(self) -> tuple[int, int]:
        """(ph, pw): rows and columns of cond tokens of a padded frame."""
        h, w = self.padded_size
        return h // self.patch_size, w // self.patch_size

    def pad(self, frames: torch.Tensor) -> torch.Tensor:
        """Replicate-pad the last two dims; an index gather, so it works for uint8 as for float."""
        top, bottom, left, right = self.padding
        rows = torch.arange(-top, self.height + bottom, device=frames.device).clamp(0, self.height - 1)
        cols = torch.arange(-left, self.width + right, device=frames.device).clamp(0, self.width - 1)
        return frames.index_select(-2, rows).index_select(-1, cols)

    def unpad(self, frames: torch.Tensor) -> torch.Tensor:
        top, _, left, _ = self.padding
        return frames[..., top:top + self.height, left:left + self.width]


@dataclass(frozen=True)
class FramePairs:
    """The encoder half of K frame pairs of one size (what `patchify` needs; the compact payload)."""
    frames: torch.Tensor      # [K, 2, C, H', W'] padded; uint8 (0..255) or float in [0, 1]
    difference: torch.Tensor  # [K, 1] float32: (mean cosine similarity of the unpadded frames - mean) / std
    frame_mean: torch.Tensor  # [K, 2] float32: each padded frame's mean over C, H', W'
    frame_std: torch.Tensor   # [K, 2] float32: its std (unbiased) + 1e-8
    geometry: PairGeometry


@dataclass(frozen=True)
class PairTokens:
    """K frame pairs as the DiT and the decoder consume them (the fork's "encoder output")."""
    cond_dit: torch.Tensor    # [K, 2, N, D] tokens of frame 0 and frame 1 for the DiT, N = ph * pw
    cond_dec: torch.Tensor    # [K, 2, N, D] the same for the decoder
    difference: torch.Tensor  # [K, 1]
    stats_mean: torch.Tensor  # [K] output de-normalisation: the mean of the two frame means
    stats_std: torch.Tensor   # [K] and of the two frame std's
    geometry: PairGeometry

    @property
    def batch(self) -> int:
        return self.cond_dit.shape[0]

    @cached_property
    def pos(self) -> torch.Tensor:
        """[N, D] positions of the cond and decoder tokens (derived, so never sent)."""
        return pos_embedding(*self.geometry.token_grid, 1, self.cond_dit.shape[-1]).to(self.cond_dit)

    @cached_property
    def query_pos(self) -> torch.Tensor:
        """[N/4, D] positions of the query (latent) tokens."""
        return pos_embedding(*self.geometry.token_grid, 2, self.cond_dit.shape[-1]).to(self.cond_dit)


def to_unit_range(frames: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float in [0, 1] -> float32 in [0, 1]."""
    return frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()


def encode_pairs(frame0: torch.Tensor, frame1: torch.Tensor, cfg: EdenConfig) -> FramePairs:
    """Frames [K, C, H, W] (uint8, or float in [0, 1]) -> padding, difference and per-frame stats."""
    if frame0.shape != frame1.shape or frame0.dim() != 4:
        raise ValueError(f"frame pairs must be two [K, C, H, W] tensors of one shape, got {list(frame0.shape)} "
                         f"and {list(frame1.shape)}")
    similarity = F.cosine_similarity(to_unit_range(frame0), to_unit_range(frame1), dim=1).mean(dim=(1, 2))
    difference = ((similarity - cfg.cos_sim_mean) / cfg.cos_sim_std)[:, None]
    geometry = PairGeometry(frame0.shape[-2], frame0.shape[-1], cfg.patch_size)
    frames = geometry.pad(torch.stack([frame0, frame1], dim=1))
    pixels = to_unit_range(frames).flatten(2)
    return FramePairs(frames, difference, pixels.mean(dim=2), pixels.std(dim=2) + 1e-8, geometry)


def pos_embedding(ph: int, pw: int, scale: int, dim: int) -> torch.Tensor:
    """2-D sin-cos embedding [(ph/scale) * (pw/scale), dim] of a row-major token grid, float32.

    Coordinates are normalised to the 16 x 28 base grid (row i -> i * 16 / ph, column j -> j * 28 / pw, the same
    for both scales); the first half of the channels encodes the column, the second the row, each [sin | cos]
    with frequencies 10000^(-k / (dim/4)). As in the reference, the coordinates are float32 and the angles float64.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = (torch.arange(ph // scale, dtype=torch.float32) / (ph / POS_BASE_GRID[0])).double()
    cols = (torch.arange(pw // scale, dtype=torch.float32) / (pw / POS_BASE_GRID[1])).double()
    row, col = torch.meshgrid(rows, cols, indexing="ij")

    def sincos(coord: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(coord.flatten(), omega)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([sincos(col), sincos(row)], dim=1).float()


# ---- building blocks ------------------------------------------------------------------------------------------------

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention with a packed `qkv` projection: queries from `x`, keys and values from `context`
    (the caller puts x's own tokens in it). Softmax scale (dim / heads)^-0.5."""

    def __init__(self, dim: int, num_heads: int, bias: bool):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, Lq, D], context [B, Lk, D] -> [B, Lq, D]. Only the queries that are kept are projected."""
        (w_q, w_kv), bias = self.qkv.weight.split([self.dim, 2 * self.dim]), self.qkv.bias
        b_q, b_kv = bias.split([self.dim, 2 * self.dim]) if bias is not None else (None, None)
        heads = (self.num_heads, self.dim // self.num_heads)
        q = F.linear(x, w_q, b_q).unflatten(-1, heads).transpose(1, 2)
        k, v = F.linear(context, w_kv, b_kv).unflatten(-1, (2, *heads)).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class TemporalAttention(Attention):
    """Each token attends to itself and to the tokens of frame 0 and frame 1 at its place; its own output is kept."""

    def forward(self, x: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; neighbours [B, L, 2c, D]: the c tokens of frame 0 under each token, then the c of frame 1."""
        b, length, dim = x.shape
        c = neighbours.shape[2] // 2
        sequence = torch.cat([neighbours[:, :, :c], x[:, :, None], neighbours[:, :, c:]], dim=2)
        out = super().forward(x.reshape(b * length, 1, dim), sequence.flatten(0, 1))
        return out.view(b, length, dim)


class Mlp(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """The parameters shared by DiT and decoder blocks: self-attention, temporal attention, MLP, pre-norms."""

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        dim = cfg.hidden_dim
        self.norm_self_attn = nn.LayerNorm(dim, eps=cfg.eps)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm_temp_attn = nn.LayerNorm(dim, eps=cfg.eps)
        self.temp_attn = TemporalAttention(dim, cfg.num_heads, cfg.qkv_bias)
        self.norm_mlp = nn.LayerNorm(dim, eps=cfg.eps)
        self.mlp = Mlp(dim, cfg.mlp_ratio)


class DiTBlock(Block):
    def forward(self, x: torch.Tensor, neighbours: torch.Tensor, mod: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """x [K, N/4, D] query tokens; neighbours [K, N/4, 8, D] the 2 x 2 cond tokens of each frame under each
        query; mod: six [K, D] (shift, scale, gate for the self-attention, then for the MLP). The temporal
        attention is not modulated."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        y = modulate(self.norm_self_attn(x), shift_msa, scale_msa)
        x = x + gate_msa[:, None] * self.self_attn(y, y)
        x = x + self.temp_attn(self.norm_temp_attn(x), neighbours)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm_mlp(x), shift_mlp, scale_mlp))


class DecoderBlock(Block):
    def forward(self, recon: torch.Tensor, query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """recon [K, N, D] pixel tokens (updated); query [K, N/4, D] latent tokens (fed unchanged to every block,
        keys and values only); neighbours [K, N, 2, D] the decoder cond tokens of frame 0 and 1."""
        tokens = self.norm_self_attn(torch.cat([recon, query], dim=1))
        recon = recon + self.self_attn(tokens[:, :recon.shape[1]], tokens)
        recon = recon + self.temp_attn(self.norm_temp_attn(recon), neighbours)
        return recon + self.mlp(self.norm_mlp(recon))


class TimestepEmbedder(nn.Module):
    """DiT-style: [cos | sin] of t * 10000^(-k / 128) for 256 frequencies, then an MLP. t in [0, 1], not x1000."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQUENCIES // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1).to(self.mlp[0].weight.dtype))


# ---- the model ------------------------------------------------------------------------------------------------------

class EdenPatchify(nn.Module):
    """The cond-token layers, all an encoder process needs (1,184,256 parameters at full size).

    `Eden` extends it, so these keep their top-level names of `eden.pt` and come first in parameter order (a
    seeded random init gives both processes the same weights).
    """

    def __init__(self, cfg: EdenConfig):
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.hidden_dim, cfg.patch_size
        self.patch_cond_dit = nn.Conv2d(cfg.in_dim, dim, kernel_size=p, stride=p)
        self.norm_cond_dit = nn.LayerNorm(dim, eps=cfg.eps)
        self.patch_cond_dec = nn.Conv2d(cfg.in_dim, dim, kernel_size=p, stride=p)
        self.norm_cond_dec = nn.LayerNorm(dim, eps=cfg.eps)

    def patchify(self, pairs: FramePairs) -> PairTokens:
        k = pairs.frames.shape[0]
        mean, std = pairs.frame_mean, pairs.frame_std
        pixels = (to_unit_range(pairs.frames) - mean[..., None, None, None]) / std[..., None, None, None]
        pixels = pixels.flatten(0, 1).to(self.patch_cond_dit.weight.dtype)  # [2K, C, H', W'], frame-minor
        pos = pos_embedding(*pairs.geometry.token_grid, 1, self.cfg.hidden_dim).to(pixels)

        def tokens(patch: nn.Conv2d, norm: nn.LayerNorm) -> torch.Tensor:
            return norm(patch(pixels).flatten(2).transpose(1, 2) + pos).unflatten(0, (k, 2))

        return PairTokens(tokens(self.patch_cond_dit, self.norm_cond_dit),
                          tokens(self.patch_cond_dec, self.norm_cond_dec),
                          pairs.difference, mean.mean(dim=1), std.mean(dim=1), pairs.geometry)


class Eden(EdenPatchify):
    def __init__(self, cfg: EdenConfig):
        super().__init__(cfg)
        dim, p = cfg.hidden_dim, cfg.patch_size
        # DiT
        self.proj_in = nn.Linear(cfg.latent_dim, dim)
        self.denoise_timestep_embedder = TimestepEmbedder(dim)
        self.difference_embedder = nn.Linear(1, dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # one, shared by every block
        self.dit_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.dit_depth))
        self.norm_out = nn.LayerNorm(dim, eps=cfg.eps)
        self.proj_out = nn.Linear(dim, 2 * cfg.latent_dim)  # the second half of the channels is unused
        # decoder
        self.proj_token = nn.Linear(cfg.latent_dim, dim)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_depth))
        pixels = p * p * cfg.out_dim
        self.unpatchify = nn.Sequential(nn.LayerNorm(dim, eps=cfg.eps), nn.Linear(dim, pixels), nn.GELU(),
                                        nn.Linear(pixels, pixels))

    def noise_shape(self, tokens: PairTokens) -> tuple[int, int, int]:
        """[K, N/4, latent_dim]: the initial ODE state of each pair."""
        ph, pw = tokens.geometry.token_grid
        return tokens.batch, (ph // 2) * (pw // 2), self.cfg.latent_dim

    def velocity(self, x: torch.Tensor, t: torch.Tensor, tokens: PairTokens) -> torch.Tensor:
        """The reference's `denoise`: latents x [K, N/4, latent_dim] at times t [K] -> velocity, same shape."""
        ph, pw = tokens.geometry.token_grid
        k, _, n, dim = tokens.cond_dit.shape
        # the 2 x 2 cond tokens of each frame under each query token: [K, N/4, 2 frames x 4, D]
        neighbours = tokens.cond_dit.view(k, 2, ph // 2, 2, pw // 2, 2, dim).permute(0, 2, 4, 1, 3, 5, 6)
        neighbours = neighbours.reshape(k, n // 4, 8, dim)
        condition = self.denoise_timestep_embedder(t) + self.difference_embedder(tokens.difference.to(x.dtype))
        mod = self.adaLN_modulation(condition).chunk(6, dim=1)
        q = self.proj_in(x) + tokens.query_pos
        for block in self.dit_blocks:
            q = block(q, neighbours, mod)
        return self.proj_out(self.norm_out(q))[..., :self.cfg.latent_dim]

    def sample(self, tokens: PairTokens, noise: torch.Tensor, on_step=None) -> torch.Tensor:
        """Euler on the fixed time grid from `noise` (t = 0) to the latents (t = 1); one velocity per interval.
        `on_step(x, t, v)` sees every evaluation (used by the golden check)."""
        x = noise.to(tokens.cond_dit.dtype)
        grid = self.cfg.time_grid
        for t0, t1 in zip(grid[:-1], grid[1:]):
            t = torch.full((x.shape[0],), t0, dtype=torch.float32, device=x.device)
            v = self.velocity(x, t, tokens)
            if on_step is not None:
                on_step(x, t, v)
            x = x + (t1 - t0) * v
        return x

    def unscale(self, samples: torch.Tensor) -> torch.Tensor:
        """ODE result -> decoder latents."""
        return samples / self.cfg.vae_scaler + self.cfg.vae_shift

    def decode(self, latents: torch.Tensor, tokens: PairTokens) -> torch.Tensor:
        """Latents [K, N/4, latent_dim] -> padded frames [K, C, H', W'], de-normalised, not clamped."""
        ph, pw = tokens.geometry.token_grid
        k, p, c = latents.shape[0], self.cfg.patch_size, self.cfg.out_dim
        query = self.proj_token(latents)
        grid = query.transpose(1, 2).unflatten(2, (ph // 2, pw // 2))
        recon = F.interpolate(grid, scale_factor=2.0, mode="bicubic", align_corners=False)
        recon = recon.flatten(2).transpose(1, 2) + tokens.pos
        query = query + tokens.query_pos
        neighbours = tokens.cond_dec.transpose(1, 2)  # [K, N, 2, D]
        for block in self.decoder_blocks:
            recon = block(recon, query, neighbours)
        pixels = self.unpatchify(recon).view(k, ph, pw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(k, c, ph * p, pw * p)
        return pixels * tokens.stats_std.view(k, 1, 1, 1) + tokens.stats_mean.view(k, 1, 1, 1)

    def interpolate(self, tokens: PairTokens, noise: torch.Tensor) -> torch.Tensor:
        """The middle frames [K, C, H, W] in [0, 1] (float, unpadded)."""
        frames = self.decode(self.unscale(self.sample(tokens, noise)), tokens)
        return tokens.geometry.unpad(frames.clamp(0, 1))
