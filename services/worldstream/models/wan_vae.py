"""Wan 2.1 video VAE (causal 3-D conv encoder/decoder) with explicit, per-session streaming caches.

Module and parameter names follow `Wan2.1_VAE.pth` exactly, so the published file loads without renaming:
`WanVAEEncoder` holds `encoder.*` + `conv1.*` (86 tensors), `WanVAEDecoder` holds `decoder.*` + `conv2.*`
(108 tensors).

Time is causal: a clip of 1 + 4k frames maps to 1 + k latents. Both halves process video in chunks (encoder:
1 frame, then 4 frames; decoder: 1 latent at a time) and every temporal conv carries the last CACHE_T frames of
its input from one chunk to the next in a cache list owned by the caller (`VAEEncodeStream`,
`VAEDecodeStream`). Each cached conv owns a fixed slot of that list, assigned at construction in forward order.
"""
from __future__ import annotations

import itertools
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames of conv input kept between chunks (= temporal kernel 3 - 1)

WAN_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                   0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                  3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

Cache = list[torch.Tensor | None]  # one entry per cached conv, owned by a stream


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (all 2·p_t pad frames in front) and symmetrically in space.

    With `cache_slot` set, the frames in front come from `cache[cache_slot]` (the previous chunk's last
    CACHE_T input frames) instead of zeros, and the slot is updated with this chunk's last input frames.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 cache_slot: int | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pad_t, pad_h, pad_w = padding if isinstance(padding, tuple) else (padding,) * 3
        self.front_pad = 2 * pad_t
        self.spatial_pad = (pad_w, pad_w, pad_h, pad_h)
        self.cache_slot = cache_slot

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        front = self.front_pad
        if self.cache_slot is not None:
            previous = cache[self.cache_slot]
            if previous is None:
                cache[self.cache_slot] = x[:, :, -CACHE_T:].clone()
            else:
                tail = x[:, :, -CACHE_T:]
                # a 1-frame chunk keeps [previous chunk's last frame, this frame]
                cache[self.cache_slot] = (torch.cat([previous[:, :, -1:], tail], 2)
                                          if tail.shape[2] < CACHE_T else tail.clone())
                x = torch.cat([previous, x], 2)
                front -= previous.shape[2]
        # one F.pad for time and space, then an unpadded conv, as the reference does
        return super().forward(F.pad(x, (*self.spatial_pad, front, 0)))


class RMS_norm(nn.Module):
    """L2-normalise over channels (dim 1), times sqrt(C) and a per-channel `gamma` (no mean-square eps)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """RMS_norm, SiLU, conv3, RMS_norm, SiLU, (dropout), conv3 — plus a 1×1×1 shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, slots: Iterator[int]):
        super().__init__()
        # Sequential indices fix the checkpoint keys residual.{0,2,3,6}; SiLU/dropout slots hold no weights
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1, cache_slot=next(slots)),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(),  # inference: dropout is identity
            CausalConv3d(out_dim, out_dim, 3, padding=1, cache_slot=next(slots)))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), cache)
        h = conv2(F.silu(norm2(h)), cache)
        return h + self.shortcut(x)


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B·T, C, H, W] (frame-wise 2-D ops)."""
    b, c, t, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def _images_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B·T, C, H, W] -> [B, C, T, H, W]."""
    return x.reshape(batch, -1, *x.shape[1:]).permute(0, 2, 1, 3, 4)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame, with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:  # no cache: attention is per frame
        b, c, t, h, w = x.shape
        images = self.norm(_frames_to_images(x))
        # [BT, 3C, H, W] -> q, k, v each [BT, 1 head, HW, C]
        q, k, v = self.to_qkv(images).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous().chunk(3, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return _images_to_frames(out, b) + x


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """3 taps along `dim` -> [2 phases, 2 taps] there: phase 0 = [w0, w1 + w2], phase 1 = [w0 + w1, w2]."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)], dim)


class Upsample2xConv3x3(nn.Conv2d):
    """conv3×3(×2 nearest upsampling of x), padding 1, computed at x's resolution (sub-pixel form).

    Output pixel (2i+a, 2j+b) sees only input rows i-1+a..i+a and columns j-1+b..j+b, so it is a 2×2 conv of x
    whose kernel rows are the 3 rows folded for phase a ([w0, w1+w2] or [w0+w1, w2]), columns likewise for b.
    The four phases' kernels make one 2×2 conv with 4·C_out channels over x padded by 1; phase (a, b) is its
    channel group (a, b) at offset (a, b), and the phases interleave into the [N, C_out, 2H, 2W] output.
    Exact up to the rounding of the folded weights (summed in float32, then cast to the weight's dtype).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c_out = self.out_channels
        # folded from the live weight on every call (a few small kernels), so a later load_state_dict holds;
        # in float32 at least (half-precision weights are rounded once, after the sums)
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        folded = _fold_taps(_fold_taps(weight, 2), 4)  # [O, I, a, 2, b, 2]
        folded = folded.permute(2, 4, 0, 1, 3, 5).reshape(4 * c_out, -1, 2, 2)  # channels (a, b, o)
        # keep the weight's memory format (compiled VAE halves store conv weights channels-last)
        memory_format = (torch.channels_last if self.weight.is_contiguous(memory_format=torch.channels_last)
                         else torch.contiguous_format)
        folded = folded.to(self.weight.dtype, memory_format=memory_format)
        phases = F.conv2d(F.pad(x, (1, 1, 1, 1)), folded, self.bias.repeat(4)).unflatten(1, (2, 2, c_out))
        rows = [torch.stack([phases[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)], -1) for a in (0, 1)]
        return torch.stack(rows, 3).reshape(n, c_out, 2 * h, 2 * w)  # [N, O, H, a, W, b] -> [N, O, 2H, 2W]


class Resample(nn.Module):
    """Spatial ×2 up/down-sampling per frame, optionally with temporal ×2 up/down-sampling (`time_conv`).

    upsample3d: `time_conv` makes 2C channels that are interleaved into 2× frames, then ×2 nearest + conv3×3
    to C/2 (one sub-pixel conv, `Upsample2xConv3x3`). On the very first chunk of a stream (empty cache slot)
    the time conv is skipped — one latent gives one frame — and the slot is set to two zero frames, which is
    exactly how the reference's 'Rep' marker behaves on the next chunk (zero causal padding, cache [zeros, x]).
    downsample3d: zero-pad right/bottom + stride-2 conv3×3, then a stride-2 (3,1,1) `time_conv` over
    [previous chunk's last frame, chunk]; skipped on the first chunk, which only fills the slot.
    """

    def __init__(self, dim: int, mode: str, slots: Iterator[int]):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # index 0 is the reference's weightless ×2 upsample, folded into the conv here; it keeps the
            # checkpoint keys resample.1.*
            self.resample = nn.Sequential(nn.Identity(), Upsample2xConv3x3(dim, dim // 2))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0), cache_slot=next(slots))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
            self.time_slot = next(slots)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d":
            slot = self.time_conv.cache_slot
            if cache[slot] is None:
                cache[slot] = x.new_zeros(b, c, CACHE_T, h, w)
            else:
                x = self.time_conv(x, cache)
                # channels [half 0 | half 1] at frame i -> frames 2i, 2i+1
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = _images_to_frames(self.resample(_frames_to_images(x)), b)
        if self.mode == "downsample3d":
            previous = cache[self.time_slot]
            cache[self.time_slot] = x[:, :, -1:].clone()
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], 2))
        return x


# ---------------------------------------------------------------------------------------------------------
# Encoder / decoder trunks
# ---------------------------------------------------------------------------------------------------------

class Encoder3d(nn.Module):
    """conv1 → stages of ResidualBlocks with (temporal) downsampling → middle (res, attn, res) → head."""

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales, temperal_downsample):
        super().__init__()
        slots = itertools.count()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1, cache_slot=next(slots))
        downsamples = []
        scale = 1.0
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, slots))
                if scale in attn_scales:
                    downsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if stage != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[stage] else "downsample2d"
                downsamples.append(Resample(out_dim, mode, slots))
                scale /= 2.0
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = nn.Sequential(ResidualBlock(out_dim, out_dim, slots), AttentionBlock(out_dim),
                                    ResidualBlock(out_dim, out_dim, slots))
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, z_dim, 3, padding=1, cache_slot=next(slots)))
        self.num_cache_slots = next(slots)
        # The layers before the first temporal downsampling run at the input's frame rate (~3/4 of the FLOPs).
        self.full_rate_layers = next((i for i, m in enumerate(self.downsamples)
                                      if isinstance(m, Resample) and m.mode == "downsample3d"), len(self.downsamples))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return self.reduced_rate(self.full_rate(x, cache), cache)

    def full_rate(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in self.downsamples[:self.full_rate_layers]:
            x = layer(x, cache)
        return x

    def reduced_rate(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for layer in (*self.downsamples[self.full_rate_layers:], *self.middle):
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


class Decoder3d(nn.Module):
    """conv1 → middle (res, attn, res) → stages of ResidualBlocks with (temporal) upsampling → head (RGB).

    Every upsampling conv halves the channels, so the stage after it starts from out_dim // 2.
    """

    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, attn_scales, temperal_upsample):
        super().__init__()
        slots = itertools.count()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1, cache_slot=next(slots))
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], slots), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], slots))
        upsamples = []
        in_dim = dims[0]
        for stage, out_dim in enumerate(dims[1:]):
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, slots))
                if scale in attn_scales:
                    upsamples.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if stage != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[stage] else "upsample2d"
                upsamples.append(Resample(out_dim, mode, slots))
                in_dim = out_dim // 2
                scale *= 2.0
        self.upsamples = nn.Sequential(*upsamples)
        self.head = nn.Sequential(RMS_norm(out_dim, images=False), nn.SiLU(),
                                  CausalConv3d(out_dim, 3, 3, padding=1, cache_slot=next(slots)))
        self.num_cache_slots = next(slots)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for layer in (*self.middle, *self.upsamples):
            x = layer(x, cache)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), cache)


# ---------------------------------------------------------------------------------------------------------
# Checkpoint-shaped halves
# ---------------------------------------------------------------------------------------------------------

class _LatentStats(nn.Module):
    """Holds the Wan latent mean/std as non-persistent float32 buffers.

    The reference keeps these constants in float32 outside the module it casts to bf16/fp16, so they stay
    float32 here when the weights are cast (only their device follows the module).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("latent_mean", torch.tensor(WAN_LATENT_MEAN, dtype=torch.float32), persistent=False)
        self.register_buffer("latent_std", torch.tensor(WAN_LATENT_STD, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.latent_mean.device
        self.latent_mean = torch.tensor(WAN_LATENT_MEAN, dtype=torch.float32, device=device)
        self.latent_std = torch.tensor(WAN_LATENT_STD, dtype=torch.float32, device=device)
        return self


class WanVAEEncoder(_LatentStats):
    """Encoder half of Wan2.1_VAE.pth: video [B,3,T,H,W] in [-1,1] -> normalised latents [B,z,T',H/8,W/8]."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales, temperal_downsample)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)

    def forward(self, video: torch.Tensor, cache: Cache, starts_video: bool, first_chunk: int = 0,
                steady: "SteadyFullRate | None" = None) -> torch.Tensor:
        """Encode frames continuing the stream held in `cache`; chunks of 4 frames, led by a 1-frame chunk
        when `starts_video`; `first_chunk` is the stream's index of the first one (see `SteadyFullRate`).
        Returns (mu - mean) * (1/std) in float32 (log-variance discarded)."""
        video = video.to(self.conv1.weight.dtype)
        sizes = [1] * starts_video + [4] * ((video.shape[2] - starts_video) // 4)
        return torch.cat([self._encode_chunk(chunk, cache, first_chunk + i, steady)
                          for i, chunk in enumerate(video.split(sizes, dim=2))], 2)

    def _encode_chunk(self, chunk: torch.Tensor, cache: Cache, index: int,
                      steady: "SteadyFullRate | None") -> torch.Tensor:
        """One chunk (1 or 4 frames) -> its normalised latent frame.

        The reference runs `conv1` and the normalisation over all chunks at once; both are per-frame, and
        running them per chunk keeps the result independent of how a video is split over calls (a 1×1×1 conv
        over a different number of frames may round differently).
        """
        if steady is not None and index >= steady.chunk and steady.value is not None:
            x = steady.value  # the full-rate layers' caches are never read again
        else:
            x = self.encoder.full_rate(chunk, cache)
            if steady is not None and index >= steady.chunk:
                steady.value = x
        mu = self.conv1(self.encoder.reduced_rate(x, cache))[:, :self.z_dim].float()
        view = (1, self.z_dim, 1, 1, 1)
        return (mu - self.latent_mean.view(view)) * (1.0 / self.latent_std).view(view)


class WanVAEDecoder(_LatentStats):
    """Decoder half of Wan2.1_VAE.pth: normalised latents [B,z,T,h,w] -> video [B,3,T_px,8h,8w] in [-1,1]."""

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                 attn_scales=(), temperal_downsample=(False, True, True)):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample[::-1])
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Decode latents continuing the stream held in `cache`, one latent frame at a time (1 -> 1 frame on
        a fresh cache, 1 -> 4 after). Runs in the parameter dtype; returns float32 clamped to [-1, 1]."""
        dtype = self.conv2.weight.dtype
        z = z.to(dtype)
        view = (1, self.z_dim, 1, 1, 1)
        # the reference un-normalises as z / (1/std) + mean, with the constants cast to the latent dtype first
        inv_std = 1.0 / self.latent_std.to(dtype)
        x = self.conv2(z / inv_std.view(view) + self.latent_mean.to(dtype).view(view))
        frames = [self.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, 2).float().clamp_(-1, 1)


def split_vae_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a full Wan2.1_VAE.pth state dict into (encoder half, decoder half), keys unchanged."""
    encoder_sd, decoder_sd = {}, {}
    for key, value in sd.items():
        if key.startswith(("encoder.", "conv1.")):
            encoder_sd[key] = value
        elif key.startswith(("decoder.", "conv2.")):
            decoder_sd[key] = value
        else:
            raise ValueError(f"unexpected Wan VAE key {key!r}")
    return encoder_sd, decoder_sd


# ---------------------------------------------------------------------------------------------------------
# Per-session streams
# ---------------------------------------------------------------------------------------------------------

def probe_encoder(vae: dict) -> WanVAEEncoder:
    """A 1-channel-wide float32 CPU copy of an encoder of config `vae` (the keyword arguments of WanVAEEncoder),
    for NaN probes of its temporal receptive field: a NaN reaches every output that depends on it and nothing
    else, and width and picture size do not change which frames a temporal conv reads."""
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        return WanVAEEncoder(**{**vae, "dim": 1}).float().eval()


class SteadyFullRate:
    """The output of the encoder's full-rate layers (`Encoder3d.full_rate`) for a chunk of zero frames that the
    stream's first frame no longer reaches: chunk `chunk` and later (chunk 0 = the first frame, chunk k = frames
    4k-3..4k). Those layers are causal convs without recurrence, so such a chunk's output is a function of zero
    frames alone, computed by the same kernels on the same shapes: the same tensor, bit for bit, for every such
    chunk of every stream with these weights. Filled by the first stream that gets there; read-only."""

    def __init__(self, chunk: int):
        self.chunk = chunk
        self.value: torch.Tensor | None = None

    @classmethod
    @torch.inference_mode()
    def of_config(cls, vae: dict, limit: int = 256) -> "SteadyFullRate":
        """With `chunk` found by a NaN probe: 6 at the Wan 2.1 config (9 convs: frame 0 reaches frame 18)."""
        probe = probe_encoder(vae).encoder
        cache: Cache = [None] * probe.num_cache_slots
        probe.full_rate(torch.full((1, 3, 1, 8, 8), float("nan")), cache)
        for chunk in range(1, limit):
            if not probe.full_rate(torch.zeros(1, 3, 4, 8, 8), cache).isnan().any():
                return cls(chunk)
        raise ValueError(f"the first frame still reaches chunk {limit - 1}: not a causal encoder")


class VAEEncodeStream:
    """One session's causal encode: feed [B,3,T,H,W] in [-1,1] with T = 1 + 4k first, then T = 4k.

    Splitting a video over several `encode` calls gives the same latents as one call. With `steady`, chunks
    of zero frames past the first frame's reach skip the full-rate layers (exact, see `SteadyFullRate`): only
    feed zero frames after the first chunk then, as the image-to-video conditioning does.
    Drop the object (or call `close`) to free its caches.
    """

    def __init__(self, encoder: WanVAEEncoder, steady: SteadyFullRate | None = None):
        self.encoder = encoder
        self.steady = steady
        self.cache: Cache = [None] * encoder.encoder.num_cache_slots
        self.frames_encoded = 0

    @torch.inference_mode()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.shape[2]
        starts_video = self.frames_encoded == 0
        if frames % 4 != int(starts_video) or frames < 1:
            expected = "1 + 4k" if starts_video else "4k (k >= 1)"
            raise ValueError(f"expected {expected} frames in this call, got {frames}")
        first_chunk = 0 if starts_video else 1 + (self.frames_encoded - 1) // 4
        latents = self.encoder(video, self.cache, starts_video, first_chunk, self.steady)
        self.frames_encoded += frames
        return latents

    def close(self) -> None:
        self.cache = [None] * len(self.cache)
        self.frames_encoded = 0


class VAEDecodeStream:
    """One session's streaming decode: feed normalised latents [B,16,T,h,w] block after block.

    `cache` (32 entries at the Wan config) starts as all None: the first latent of the stream yields 1 frame,
    every later one 4, so a first block of 3 latents gives 9 frames and later blocks 12.
    Drop the object (or call `close`) to free its caches.
    """

    def __init__(self, decoder: WanVAEDecoder):
        self.decoder = decoder
        self.cache: Cache = [None] * decoder.decoder.num_cache_slots

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z, self.cache)

    def close(self) -> None:
        self.cache = [None] * len(self.cache)
