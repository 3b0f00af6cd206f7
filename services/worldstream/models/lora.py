"""LoRA adapters in the layout PEFT saves them, merged into the base weights at load.

LongLive v1.0 publishes its LoRA as `lora.pt`, entry `generator_lora`: `get_peft_model_state_dict` names
(`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r]) over every Linear of every
transformer block (self_attn.{q,k,v,o}, cross_attn.{q,k,v,o}, ffn.0, ffn.2: 300 at full size), with r = alpha =
256; alpha is not in the file. The reference keeps PEFT's wrapper at inference, y = W·x + b + (alpha/r)·B·(A·x),
which costs two more GEMMs per Linear. Merging W <- W + (alpha/r)·B·A once at load gives the same model to
float32 rounding (2.6e-6 on the golden vectors) and serves it with the plain Linears.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoints import CheckpointError, read_state_dict

PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the model, in every saved key
LORA_ENTRY = "generator_lora"  # LongLive's trainer saves {generator_lora, critic_lora, step}


def lora_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linears an adapter of the published layout covers, by state-dict name: every one inside a
    transformer block (`blocks.{i}.…`), as LongLive's `configure_lora_for_model` targets them."""
    return {f"blocks.{i}.{name}": module for i, block in enumerate(model.blocks)
            for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def read_lora_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a LoRA file: its `generator_lora` entry, or the whole file when it has none (as
    the reference loads it)."""
    sd = read_state_dict(path)
    if LORA_ENTRY in sd:
        sd = sd[LORA_ENTRY]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: entry {LORA_ENTRY!r} is a {type(sd).__name__}, not a state dict")
    return sd


def check_lora(lora: dict[str, torch.Tensor], targets: dict[str, nn.Linear], rank: int, source: str) -> None:
    """The adapter holds exactly lora_A [rank, in] and lora_B [out, rank] of every target (CheckpointError
    naming `source` and the first offending key)."""
    expected = {}
    for name, linear in targets.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (rank, linear.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, rank)
    for key, shape in expected.items():
        if key not in lora:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {list(shape)}; the file has "
                                  f"{len(lora)} tensors, a rank-{rank} adapter of this model {len(expected)})")
        got = tuple(lora[key].shape)
        if got != shape:
            file_rank = got[0] if key.endswith("lora_A.weight") else got[-1]
            hint = f" (a rank-{file_rank} adapter? the config's lora.rank is {rank})" if file_rank != rank else ""
            raise CheckpointError(f"{source}: key {key!r} has shape {list(got)}, expected {list(shape)}{hint}")
    unexpected = [k for k in lora if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              "is this the adapter of another model?")


@torch.no_grad()
def merge_lora(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], targets: dict[str, nn.Linear],
               scale: float, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """`weights` (the base state dict, by model key) with every target's weight replaced by W + scale·B·A,
    summed in float32 on `device` and rounded once, to `dtype` (call `check_lora` first)."""
    merged = dict(weights)
    for name in targets:
        key = f"{name}.weight"
        if key not in weights:
            raise CheckpointError(f"the base weights have no {key!r} for the adapter's target {name!r}")
        a = lora[f"{PEFT_PREFIX}{name}.lora_A.weight"].to(device, torch.float32)
        b = lora[f"{PEFT_PREFIX}{name}.lora_B.weight"].to(device, torch.float32)
        merged[key] = torch.addmm(weights[key].to(device, torch.float32), b, a, alpha=scale).to(dtype)
    return merged
