"""Clip interpolation with EDEN, split into the encoder service's half and the decoder service's half.

One core for every front-end: the services (encoder/pairs.py, decoder/interpolation.py), the in-process batch
CLI (`worldstream interpolate`) and benchmarks/transfer.py all cut a clip into batches of K consecutive pairs
and run these functions on them, so they give the same frames bit for bit.

* `encode_payload` (encoder half): a run of n + 1 consecutive uint8 frames -> the tensors that travel for its
  n pairs, in one of the `PAYLOADS`.
* `payload_tokens` (decoder half): those tensors -> the `PairTokens` the model consumes.
* `ClipInterpolation.new_frames`: tokens -> the F - 1 new frames of each pair, uint8; for factor 4 by recursion
  on the middle frame (EDEN makes one middle frame per forward), which the decoder does locally: the new pairs
  (frame, middle) and (middle, next frame) are encoded where the middle frame is.

Frames are quantised to uint8 at every level, so the recursion and every front-end see the frames the client
gets. The frame at output position j starts from the noise of seed + j: a clip's frames do not depend on K.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..media import encode_jpeg, load_image, probe_image
from ..models.eden import EdenConfig, EdenPatchify, FramePairs, PairGeometry, PairTokens, encode_pairs
from .eden import EdenInterpolator, check_frame_size, pair_noise

PAYLOADS = ("tokens_fp32", "tokens_bf16", "frames", "frames_jpeg")
FACTORS = (2, 4)
FRAME_FORMATS = ("image", "raw_rgb")  # PNG/JPEG files, or height x width x 3 bytes
DEFAULT_PAYLOAD_JPEG_QUALITY = 95
JPEG_SLACK_BYTES = 1 << 16  # a JPEG file may exceed its raw pixels (noise at quality 100) by its headers and more

_TOKEN_DTYPES = {"tokens_fp32": torch.float32, "tokens_bf16": torch.bfloat16}


# ---- input frames -----------------------------------------------------------------------------------------------

def check_frame_bytes(data: bytes, frame_format: str, height: int, width: int, index: int) -> None:
    """The cheap checks of one input frame, without decoding its pixels: its size must be the clip's."""
    if frame_format == "raw_rgb":
        if len(data) != height * width * 3:
            raise ValueError(f"frame {index} has {len(data)} bytes; a RAW_RGB frame of {height}x{width} has "
                             f"{height * width * 3} (height x width x 3): all frames of a clip must have the size "
                             "given in start")
        return
    # The header alone, through the PNG and JPEG readers only: another format (ICO decodes its pixels on open)
    # or a pixel count beyond the limit is refused before any pixel is decoded.
    try:
        header = probe_image(data)
    except ValueError as e:
        raise ValueError(f"frame {index} ({len(data)} bytes) is not a PNG or JPEG file ({e})") from None
    size = (header.width, header.height)
    if size != (width, height):
        raise ValueError(f"frame {index} is {size[1]}x{size[0]}, but the clip's frames are {height}x{width} "
                         "(start.height x start.width): all frames of a clip must have one size")


def decode_frame(data: bytes, frame_format: str, height: int, width: int, index: int) -> torch.Tensor:
    """One input frame -> uint8 [3, height, width]; ValueError with what to fix."""
    check_frame_bytes(data, frame_format, height, width, index)
    if frame_format == "raw_rgb":
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    else:
        try:
            pixels = np.asarray(load_image(data))
        except ValueError as e:
            raise ValueError(f"frame {index}: {e}") from None
        if pixels.shape[:2] != (height, width):  # a header that lies about the size
            raise ValueError(f"frame {index} decodes to {pixels.shape[0]}x{pixels.shape[1]}, not {height}x{width}")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def jpeg_pixels(data: bytes) -> torch.Tensor:
    """A JPEG file of the FRAMES_JPEG payload -> uint8 [3, H, W]."""
    return torch.from_numpy(np.array(load_image(data))).permute(2, 0, 1)


# ---- the payload between the two halves --------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a payload as a receiver expects it; `shape` None: 1-D with at most `max_elements`."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] | None
    max_elements: int = 0

    def check(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if self.shape is not None:
            if (dtype, tuple(shape)) != (self.dtype, self.shape):
                raise ValueError(f"tensor {self.name!r}: {dtype} of shape {list(shape)[:8]}, expected {self.dtype} "
                                 f"of shape {list(self.shape)}")
        elif dtype != self.dtype or len(shape) != 1 or not 0 < shape[0] <= self.max_elements:
            raise ValueError(f"tensor {self.name!r}: {dtype} of shape {list(shape)[:8]}, expected {self.dtype} "
                             f"of 1 to {self.max_elements} elements")


def payload_spec(payload: str, pairs: int, geometry: PairGeometry, cfg: EdenConfig) -> list[TensorSpec]:
    """The tensors of a batch of `pairs` pairs in `payload`, in the order they are sent."""
    n, f32 = pairs, torch.float32
    if payload in _TOKEN_DTYPES:
        ph, pw = geometry.token_grid
        tokens = (n, 2, ph * pw, cfg.hidden_dim)
        return [TensorSpec("cond_dit", _TOKEN_DTYPES[payload], tokens),
                TensorSpec("cond_dec", _TOKEN_DTYPES[payload], tokens), TensorSpec("difference", f32, (n, 1)),
                TensorSpec("stats_mean", f32, (n,)), TensorSpec("stats_std", f32, (n,))]
    stats = [TensorSpec("difference", f32, (n, 1)), TensorSpec("frame_mean", f32, (n + 1,)),
             TensorSpec("frame_std", f32, (n + 1,))]
    if payload == "frames":
        return [TensorSpec("frames", torch.uint8, (n + 1, cfg.in_dim, *geometry.padded_size)), *stats]
    if payload == "frames_jpeg":
        most = (n + 1) * (geometry.height * geometry.width * cfg.in_dim + JPEG_SLACK_BYTES)
        return [TensorSpec("jpeg", torch.uint8, None, most), TensorSpec("jpeg_bytes", torch.int64, (n + 1,)),
                *stats]
    raise ValueError(f"unknown payload {payload!r}; use one of {PAYLOADS}")


def _frame_stats(pairs: FramePairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame mean and std [n + 1] of a run of consecutive pairs (frame t is frame 1 of pair t - 1 and frame
    0 of pair t)."""
    return (torch.cat([pairs.frame_mean[:, 0], pairs.frame_mean[-1:, 1]]),
            torch.cat([pairs.frame_std[:, 0], pairs.frame_std[-1:, 1]]))


@torch.inference_mode()
def encode_payload(frames: torch.Tensor, payload: str, patchify: EdenPatchify,
                   jpeg_quality: int = DEFAULT_PAYLOAD_JPEG_QUALITY) -> dict[str, torch.Tensor]:
    """Encoder half: n + 1 consecutive frames uint8 [n + 1, 3, H, W] -> the payload of their n pairs (see
    `payload_spec`), computed on the device of `patchify`."""
    cfg = patchify.cfg
    device = patchify.patch_cond_dit.weight.device
    if payload == "frames_jpeg":
        # The stats must be those of the pixels the decoder will see: the decoded JPEG files.
        files = [encode_jpeg(frame.permute(1, 2, 0), jpeg_quality) for frame in frames.cpu()]
        frames = torch.stack([jpeg_pixels(data) for data in files])
    frames = frames.to(device)
    pairs = encode_pairs(frames[:-1], frames[1:], cfg)
    if payload in _TOKEN_DTYPES:
        tokens = patchify.patchify(pairs)
        dtype = _TOKEN_DTYPES[payload]
        return {"cond_dit": tokens.cond_dit.to(dtype), "cond_dec": tokens.cond_dec.to(dtype),
                "difference": tokens.difference, "stats_mean": tokens.stats_mean, "stats_std": tokens.stats_std}
    mean, std = _frame_stats(pairs)
    if payload == "frames":
        padded = torch.cat([pairs.frames[:, 0], pairs.frames[-1:, 1]])
        head = {"frames": padded}
    elif payload == "frames_jpeg":
        head = {"jpeg": torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8),
                "jpeg_bytes": torch.tensor([len(data) for data in files], dtype=torch.int64)}
    else:
        raise ValueError(f"unknown payload {payload!r}; use one of {PAYLOADS}")
    return {**head, "difference": pairs.difference, "frame_mean": mean, "frame_std": std}


@torch.inference_mode()
def payload_tokens(payload: str, tensors: dict[str, torch.Tensor], model: EdenPatchify,
                   geometry: PairGeometry) -> PairTokens:
    """Decoder half: a batch's payload (checked against `payload_spec`) -> the model's tokens, on its device and
    in its dtype."""
    weight = model.patch_cond_dit.weight
    on_device = {name: tensor.to(weight.device) for name, tensor in tensors.items()}
    if payload in _TOKEN_DTYPES:
        return PairTokens(on_device["cond_dit"].to(weight.dtype), on_device["cond_dec"].to(weight.dtype),
                          on_device["difference"], on_device["stats_mean"], on_device["stats_std"], geometry)
    if payload == "frames":
        frames = on_device["frames"]
    elif payload == "frames_jpeg":
        lengths = tensors["jpeg_bytes"].tolist()
        if min(lengths) < 1 or sum(lengths) != tensors["jpeg"].numel():
            raise ValueError(f"jpeg_bytes {lengths[:8]} do not add up to the {tensors['jpeg'].numel()} bytes of jpeg")
        data = tensors["jpeg"].numpy().tobytes()
        offsets = np.cumsum([0, *lengths])
        decoded = [jpeg_pixels(data[start:stop]) for start, stop in zip(offsets[:-1], offsets[1:])]
        for frame in decoded:
            if tuple(frame.shape[1:]) != (geometry.height, geometry.width):
                raise ValueError(f"a JPEG frame of {frame.shape[1]}x{frame.shape[2]}, expected "
                                 f"{geometry.height}x{geometry.width}")
        frames = geometry.pad(torch.stack(decoded).to(weight.device))
    else:
        raise ValueError(f"unknown payload {payload!r}; use one of {PAYLOADS}")
    mean, std = on_device["frame_mean"], on_device["frame_std"]
    pairs = FramePairs(torch.stack([frames[:-1], frames[1:]], dim=1), on_device["difference"],
                       torch.stack([mean[:-1], mean[1:]], dim=1), torch.stack([std[:-1], std[1:]], dim=1), geometry)
    return model.patchify(pairs)


# ---- the decoder's model work ------------------------------------------------------------------------------------

def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """Float frames in [0, 1] -> uint8, rounded."""
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8)


class ClipInterpolation:
    """One clip's model work on the decoder side: factor F, at most `batch` pairs per forward, noise seed."""

    def __init__(self, interpolator: EdenInterpolator, factor: int, batch: int, seed: int):
        if factor not in FACTORS:
            raise ValueError(f"factor must be one of {FACTORS}, got {factor}")
        if not 1 <= batch <= interpolator.max_pairs:
            raise ValueError(f"batch of {batch} pairs; send 1 to {interpolator.max_pairs}")
        self.interpolator = interpolator
        self.factor, self.batch, self.seed = factor, batch, seed

    def seeds(self, first_pair: int, pairs: int, offset: int) -> list[int]:
        """Noise seeds of the frames at output positions (first_pair + i) * F + offset."""
        return [self.seed + (first_pair + i) * self.factor + offset for i in range(pairs)]

    @torch.inference_mode()
    def new_frames(self, tokens: PairTokens, first_pair: int, frames: torch.Tensor | None = None) -> torch.Tensor:
        """The new frames of a batch of pairs: uint8 [n, F - 1, H, W, 3] on the CPU, in output order. `frames`:
        the batch's n + 1 input frames uint8 [n + 1, 3, H, W], needed for factor 4 only."""
        model, device = self.interpolator.model, self.interpolator.device
        n, half = tokens.batch, self.factor // 2
        noise = pair_noise(model.noise_shape(tokens), self.seeds(first_pair, n, half)).to(device)
        middles = to_uint8(model.interpolate(tokens, noise))
        if self.factor == 2:
            return middles[:, None].permute(0, 1, 3, 4, 2).cpu()
        if frames is None or frames.shape[0] != n + 1:
            raise ValueError(f"factor 4 needs the batch's {n + 1} input frames")
        frames = frames.to(device)
        # The pairs (frame t, middle t) and (middle t, frame t + 1), in output order, K per forward.
        left = torch.stack([frames[:-1], middles], dim=1).flatten(0, 1)
        right = torch.stack([middles, frames[1:]], dim=1).flatten(0, 1)
        seeds = [seed for pair in zip(self.seeds(first_pair, n, 1), self.seeds(first_pair, n, 3)) for seed in pair]
        quarters = torch.cat([to_uint8(self.interpolator.interpolate(left[s:s + self.batch], right[s:s + self.batch],
                                                                     seeds[s:s + self.batch]))
                              for s in range(0, 2 * n, self.batch)]).unflatten(0, (n, 2))
        return torch.stack([quarters[:, 0], middles, quarters[:, 1]], dim=1).permute(0, 1, 3, 4, 2).cpu()


# ---- the whole clip in one process ---------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """The new frames of one batch of pairs and what it took."""
    first_pair: int
    frames: torch.Tensor  # uint8 [n, F - 1, H, W, 3]
    stage_seconds: dict[str, float] = field(default_factory=dict)  # encode, transfer, decode
    payload_bytes: int = 0


def consecutive_runs(frames: Iterable[torch.Tensor], batch: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first pair, n + 1 frames) for each run of at most `batch` consecutive pairs of a clip; ValueError for a
    clip of fewer than 2 frames."""
    run: list[torch.Tensor] = []
    first_pair = 0
    for frame in frames:
        run.append(frame)
        if len(run) == batch + 1:
            yield first_pair, torch.stack(run)
            first_pair, run = first_pair + batch, run[-1:]
    if first_pair == 0 and len(run) < 2:
        raise ValueError(f"a clip needs at least 2 frames to interpolate, got {len(run)}")
    if len(run) > 1:
        yield first_pair, torch.stack(run)


Transport = Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], int]]


def interpolate_frames(interpolator: EdenInterpolator, frames: Iterable[torch.Tensor], *, factor: int, batch: int,
                       seed: int = 0, payload: str = "frames", jpeg_quality: int = DEFAULT_PAYLOAD_JPEG_QUALITY,
                       transport: Transport | None = None,
                       timer: Callable[[], float] = time.perf_counter) -> Iterator[BatchResult]:
    """A clip's frames (uint8 [3, H, W] each, one size) -> the new frames, batch by batch, both halves in this
    process. `transport` carries each payload from one half to the other and returns it with its byte count
    (the benchmark's serialisations); None hands the tensors over as they are. The stage times come from `timer`
    (a benchmark's synchronises the device first)."""
    clip = ClipInterpolation(interpolator, factor, batch, seed)
    geometry = None
    for first_pair, run in consecutive_runs(frames, batch):
        if geometry is None:
            check_frame_size(run.shape[-2], run.shape[-1], interpolator.cfg, interpolator.max_pixels)
            geometry = PairGeometry(run.shape[-2], run.shape[-1], interpolator.cfg.patch_size)
        elif tuple(run.shape[-2:]) != (geometry.height, geometry.width):
            raise ValueError(f"frames of {run.shape[-2]}x{run.shape[-1]} in a clip of {geometry.height}x"
                             f"{geometry.width}: all frames of a clip must have one size")
        started = timer()
        tensors = encode_payload(run, payload, interpolator.model, jpeg_quality)
        encoded = timer()
        tensors, payload_bytes = transport(tensors) if transport is not None else (tensors, 0)
        transferred = timer()
        tokens = payload_tokens(payload, tensors, interpolator.model, geometry)
        new = clip.new_frames(tokens, first_pair, run if factor == 4 else None)
        stages = {"encode": encoded - started, "transfer": transferred - encoded, "decode": timer() - transferred}
        yield BatchResult(first_pair, new, stages, payload_bytes)
