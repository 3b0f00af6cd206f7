"""EDEN frame-pair interpolation in one process, and the builders of its models from a config.

`build_eden` makes the whole model (DiT + decoder + cond layers), `build_eden_patchify` only the cond layers an
encoder process needs; both from seeded random weights (tiny configs) or strictly from the published `eden.pt`
(its `eden` entry). `EdenInterpolator` runs the whole path: K frame pairs -> K middle frames per forward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..models.checkpoints import CheckpointError
from ..models.eden import Eden, EdenConfig, EdenPatchify, encode_pairs
from .builders import building, load_weights, resolve_device, resolve_dtype

CHECKPOINT_ENTRY = "eden"  # eden.pt is {"eden": state_dict} (training artefacts use other entries)


def eden_config(cfg: DictConfig) -> EdenConfig:
    inference = OmegaConf.to_container(cfg.inference, resolve=True)
    return EdenConfig(**OmegaConf.to_container(cfg.model, resolve=True),
                      **{**inference, "time_grid": tuple(inference["time_grid"])})


def eden_entry(checkpoint: dict, source: str) -> dict[str, torch.Tensor]:
    """The model's state dict inside a published `eden.pt`."""
    entry = checkpoint.get(CHECKPOINT_ENTRY)
    if not isinstance(entry, dict):
        raise CheckpointError(f"{source}: no {CHECKPOINT_ENTRY!r} state dict (entries: {sorted(checkpoint)[:5]}); "
                              "is this eden.pt, or a training artefact such as eden_vae.pt / an eden_dit file?")
    return entry


def _build(module_type: type[EdenPatchify], cfg: DictConfig) -> EdenPatchify:
    with building(resolve_device(cfg.device), resolve_dtype(cfg.dtype)):
        module = module_type(eden_config(cfg))
    keys = set(module.state_dict())
    source = str(cfg.checkpoints.eden)

    def select(checkpoint: dict) -> dict[str, torch.Tensor]:
        entry = eden_entry(checkpoint, source)
        # The cond layers alone take their keys from the full file; the full model takes the file as it is.
        return entry if module_type is Eden else {k: v for k, v in entry.items() if k in keys}

    return load_weights(module, cfg, source, select=select).eval()


def build_eden(cfg: DictConfig) -> Eden:
    return _build(Eden, cfg)


def build_eden_patchify(cfg: DictConfig) -> EdenPatchify:
    """The 1.18 M cond-layer parameters only; the same values as in `build_eden` (random init included)."""
    return _build(EdenPatchify, cfg)


def check_frame_size(height: int, width: int, cfg: EdenConfig, max_pixels: int) -> None:
    """Both sides at least 2 x patch, at most `max_pixels` once padded; ValueError with what to fix."""
    multiple = 2 * cfg.patch_size
    if min(height, width) < multiple:
        raise ValueError(f"frames of {height}x{width} are too small: both sides must be at least {multiple}")
    padded = -(-height // multiple) * multiple * (-(-width // multiple) * multiple)
    if padded > max_pixels:
        raise ValueError(f"frames of {height}x{width} ({padded} pixels once padded to a multiple of {multiple}) "
                         f"exceed this server's limit of {max_pixels} pixels per frame; send smaller frames")


def pair_noise(shape: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
    """[K, *shape[1:]] standard normal, pair i drawn from its own seed on the CPU (so a pair's result depends
    neither on the batch it is in nor on the device)."""
    if len(seeds) != shape[0]:
        raise ValueError(f"{shape[0]} pairs but {len(seeds)} seeds")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(int(seed)))
                        for seed in seeds])


class EdenInterpolator:
    """Frame pairs -> middle frames, encoder half and DiT + decoder on one device."""

    def __init__(self, cfg: DictConfig):
        self.cfg = eden_config(cfg)
        self.device = resolve_device(cfg.device)
        self.model = build_eden(cfg)
        self.max_pairs = int(cfg.limits.max_pairs)
        self.max_pixels = int(cfg.limits.max_pixels)

    def check_pairs(self, frame0: torch.Tensor, frame1: torch.Tensor) -> None:
        """Shapes and sizes, before anything is allocated; ValueError with what to fix."""
        if frame0.shape != frame1.shape or frame0.dim() != 4:
            raise ValueError(f"frame pairs must be two [K, C, H, W] tensors of one shape, got {list(frame0.shape)} "
                             f"and {list(frame1.shape)}")
        k, channels, height, width = frame0.shape
        if not 1 <= k <= self.max_pairs:
            raise ValueError(f"{k} frame pairs in one forward; send 1 to {self.max_pairs}")
        if channels != self.cfg.in_dim:
            raise ValueError(f"frames have {channels} channels, the model takes {self.cfg.in_dim} (RGB)")
        check_frame_size(height, width, self.cfg, self.max_pixels)

    @torch.inference_mode()
    def interpolate(self, frame0: torch.Tensor, frame1: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """frame0, frame1 [K, 3, H, W] (uint8, or float in [0, 1]) -> the middle frames [K, 3, H, W], float in
        [0, 1] on the model's device; pair i starts from the noise of seeds[i]."""
        self.check_pairs(frame0, frame1)
        pairs = encode_pairs(frame0.to(self.device), frame1.to(self.device), self.cfg)
        tokens = self.model.patchify(pairs)
        noise = pair_noise(self.model.noise_shape(tokens), seeds).to(self.device)
        return self.model.interpolate(tokens, noise)

    def middle_frames(self, frames: torch.Tensor, seed: int) -> torch.Tensor:
        """A clip [T, 3, H, W] -> the T - 1 frames between its neighbours, `max_pairs` pairs per forward; the pair
        (t, t + 1) uses seed + t."""
        if frames.dim() != 4 or frames.shape[0] < 2:
            raise ValueError(f"a clip needs at least 2 frames as [T, C, H, W], got {list(frames.shape)}")
        middles = []
        for start in range(0, frames.shape[0] - 1, self.max_pairs):
            stop = min(start + self.max_pairs, frames.shape[0] - 1)
            middles.append(self.interpolate(frames[start:stop], frames[start + 1:stop + 1],
                                            [seed + t for t in range(start, stop)]))
        return torch.cat(middles)
