"""Build the models of a config: real checkpoints (full size) or seeded random weights (tiny configs)."""
from __future__ import annotations

import contextlib
import logging

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..models.causal_wan import ActionConfig, CausalWanModel, DiTConfig
from ..models.checkpoints import CheckpointError, init_random_, load_strict, read_state_dict

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config asks for device {name!r} but no CUDA device is available; "
                           "use a *_tiny config or the override device=cpu")
    return device


@contextlib.contextmanager
def building(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on `device` in `dtype` (buffers that must stay float32 say so explicitly)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def dit_config(cfg: DictConfig) -> DiTConfig:
    d = OmegaConf.to_container(cfg.dit, resolve=True)
    action = d.pop("action", None)
    return DiTConfig(**d, action=ActionConfig(**action) if action else None)


def load_weights(module: nn.Module, cfg: DictConfig, checkpoint: str | None, prefix: str = "",
                 select=None, seed_offset: int = 0) -> nn.Module:
    """Fill `module` from `checkpoint` (strict) or, when the config sets `init_seed`, with seeded random weights.

    `prefix` is stripped from the file's keys (the DiT files prefix every key with `model.`); `select`
    filters a shared file (the VAE file holds encoder and decoder).
    """
    if cfg.init_seed is not None:
        init_random_(module, int(cfg.init_seed) + seed_offset)
        return module
    if checkpoint is None:
        raise CheckpointError(f"{type(module).__name__}: no checkpoint path configured and no init_seed")
    sd = read_state_dict(checkpoint, prefix)
    if prefix and not sd:
        raise CheckpointError(f"{checkpoint}: no key starts with {prefix!r}; is this a Matrix-Game-2 DiT file?")
    if select is not None:
        sd = select(sd)
    log.info("loading %s from %s (%d tensors)", type(module).__name__, checkpoint, len(sd))
    load_strict(module, sd, str(checkpoint))
    return module


def build_dit(cfg: DictConfig) -> CausalWanModel:
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    with building(device, dtype):
        model = CausalWanModel(dit_config(cfg))
    model = load_weights(model, cfg, cfg.checkpoints.dit, prefix="model.", seed_offset=1).eval()
    if cfg.compile:
        # Per layer, in place (state-dict keys unchanged). All layers share one compiled code object; static
        # shapes give one graph per (action module or not) x ring phase: six in a session, all made at warm-up.
        for block in model.blocks:
            block.compile(dynamic=False)
    return model
