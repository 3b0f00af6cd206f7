"""Build the models of a config: real checkpoints (full size) or seeded random weights (tiny configs)."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..models.causal_wan import ActionConfig, CausalWanModel, DiTConfig
from ..models.checkpoints import (CheckpointError, check_strict, init_random_, load_strict, read_state_dict,
                                  safetensors_layout)
from ..models.kv_cache import recache_phases, session_phases
from ..models.lora import check_lora, lora_targets, merge_lora, read_lora_state_dict

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


def channels_last_convs(module: nn.Module) -> None:
    """Store the conv weights of a compiled VAE half channels-last: the compiled trunk then keeps its activations
    channels-last throughout; with NCDHW activations cuDNN transposes them in and out of every conv (15 of 108 ms
    a decoded block, H100)."""
    for conv in (m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))):
        conv.weight.data = conv.weight.data.contiguous(
            memory_format=torch.channels_last_3d if conv.weight.dim() == 5 else torch.channels_last)


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


# The Wan2.1-T2V base folder as published (Wan-AI/Wan2.1-T2V-1.3B, read by diffusers' ModelMixin loader)
WAN_CONFIG_FILE = "config.json"
WAN_WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# config.json fields that must match the model built from our config (the others are diffusers bookkeeping)
WAN_CONFIG_FIELDS = ("dim", "ffn_dim", "freq_dim", "in_dim", "out_dim", "num_heads", "num_layers", "eps",
                     "text_len", "text_dim", "patch_size")
GENERATOR_KEYS = ("generator", "generator_ema")  # what Self-Forcing's trainer saves the generator as


def check_wan_config(path: Path, cfg: DiTConfig) -> None:
    """The base folder's config.json describes the model our config builds (CheckpointError naming the field)."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the base folder holds the Wan2.1-T2V-1.3B download "
                              f"({WAN_CONFIG_FILE} + {WAN_WEIGHTS_FILE})")
    published = json.loads(path.read_text())
    if published.get("model_type") != "t2v":
        raise CheckpointError(f"{path}: model_type is {published.get('model_type')!r}, expected 't2v' "
                              "(Wan2.1-T2V-1.3B)")
    for field in WAN_CONFIG_FIELDS:
        ours = getattr(cfg, field)
        if field in published and published[field] != (list(ours) if field == "patch_size" else ours):
            raise CheckpointError(f"{path}: {field} is {published[field]}, the config builds {ours}")


def read_wan_t2v(model: CausalWanModel, checkpoints: DictConfig) -> tuple[dict[str, torch.Tensor], str]:
    """Wan2.1-T2V base folder (`checkpoints.base`), then the generator of a training checkpoint on top
    (`checkpoints.generator`, entry `checkpoints.generator_key`, keys prefixed `model.`): (the generator's
    state dict, where it came from), to be loaded strictly.

    The generator covers every parameter (strict), so no base value survives it: the base weights are checked
    key by key and shape by shape from the safetensors header, without reading their 5.7 GB.
    """
    base = Path(checkpoints.base)
    check_wan_config(base / WAN_CONFIG_FILE, model.cfg)
    weights = base / WAN_WEIGHTS_FILE
    check_strict(model, safetensors_layout(weights), str(weights))
    key = str(checkpoints.generator_key)
    if key not in GENERATOR_KEYS:
        raise CheckpointError(f"checkpoints.generator_key is {key!r}; the generator is saved as one of "
                              f"{list(GENERATOR_KEYS)}")
    source = f"{checkpoints.generator}[{key!r}]"
    sd = read_state_dict(checkpoints.generator, prefix="model.", entry=key)
    if not sd:
        raise CheckpointError(f"{source}: no key starts with 'model.'; is this a Self-Forcing or LongLive checkpoint?")
    return sd, source


def merged_lora_weights(model: CausalWanModel, sd: dict[str, torch.Tensor], path: str,
                        lora: DictConfig) -> dict[str, torch.Tensor]:
    """`sd` with the adapter of the LoRA file `path` (PEFT layout, rank `lora.rank`, scale `lora.alpha`/rank)
    merged into its target Linears, on the model's device, in its dtype (`models/lora.py`)."""
    adapter = read_lora_state_dict(path)
    targets = lora_targets(model)
    check_lora(adapter, targets, int(lora.rank), str(path))
    param = next(model.parameters())
    log.info("merging the LoRA of %s into %d Linears (rank %d, alpha %s)", path, len(targets), lora.rank, lora.alpha)
    return merge_lora(sd, adapter, targets, float(lora.alpha) / int(lora.rank), param.dtype, param.device)


def build_dit(cfg: DictConfig) -> CausalWanModel:
    """The DiT of a config with seeded random weights (`init_seed`) or its family's published checkpoints:
    Matrix-Game-2's single distilled file, Self-Forcing's Wan2.1-T2V base + generator, or LongLive's base +
    generator + LoRA (merged)."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    with building(device, dtype):
        model = CausalWanModel(dit_config(cfg))
    if cfg.init_seed is not None:  # (a LongLive config's LoRA too: random weights need no adapter)
        init_random_(model, int(cfg.init_seed) + 1)
    elif cfg.family in ("self_forcing", "longlive"):
        sd, source = read_wan_t2v(model, cfg.checkpoints)
        if cfg.family == "longlive":
            sd = merged_lora_weights(model, sd, str(cfg.checkpoints.lora), cfg.lora)
            source += f" + {cfg.checkpoints.lora} (LoRA merged)"
        log.info("loading %s from %s (%d tensors)", type(model).__name__, source, len(sd))
        load_strict(model, sd, source)
    else:
        load_weights(model, cfg, cfg.checkpoints.dit, prefix="model.")
    model.eval()
    if cfg.compile:
        # Per layer, in place (state-dict keys unchanged). All layers share one compiled code object; static
        # shapes give one graph per (action module or not) x cache phase, all made at warm-up (MG2: six), and
        # where prompts switch one per re-cache shape too (LongLive: six phases and seven re-cache shapes). Past
        # dynamo's limit of graphs per code object (8 by default) it would run the others eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, compiled_shapes(cfg, model))
        for block in model.blocks:
            block.compile(dynamic=False)
    return model


def compiled_shapes(cfg: DictConfig, model: CausalWanModel) -> int:
    """Graphs the compiled layers of a session take: per cache phase of the blocks (twice with an action module,
    whose layers differ), and per re-cache shape where prompts switch (configs with `pipeline.global_sink`)."""
    policy, frames_per_block = model.cache_policy, int(cfg.pipeline.frames_per_block)
    shapes = len(session_phases(policy, frames_per_block)) * (2 if model.cfg.action else 1)
    if "global_sink" in cfg.pipeline:
        shapes += len(recache_phases(policy, frames_per_block, bool(cfg.pipeline.global_sink)))
    return shapes
