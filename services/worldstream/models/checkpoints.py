"""Reading the published checkpoint files and loading them strictly; seeded random weights for tiny configs.

Local checkpoint files only: `.safetensors` through safetensors, `.pth`/`.pt` through
`torch.load(weights_only=True)`. Nothing received over a network is ever deserialised here.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or does not match the model; the message names the file and the first bad key."""


def read_state_dict(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Load the tensors of a local checkpoint file, keeping those under `prefix` (stripped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # a corrupt file or one that needs pickle beyond tensors
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch checkpoint ({exc})") from exc
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(sd).__name__}")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state_dict` into `module`; every key must be present with its exact shape, and no other key.

    Raises CheckpointError naming `source` and the first offending key. Tensors are cast to the module's dtype
    (the distilled DiT files are fp32 on disk and run in bf16 on GPU).
    """
    expected = module.state_dict()
    for key, param in expected.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {list(param.shape)}; "
                                  f"the file has {len(state_dict)} tensors, the model {len(expected)})")
        got = state_dict[key]
        if tuple(got.shape) != tuple(param.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {list(got.shape)}, "
                                  f"the model expects {list(param.shape)}")
        if not got.is_floating_point() and param.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {got.dtype}, expected a floating tensor")
    unexpected = [k for k in state_dict if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              "is this the checkpoint of another model or mode?")
    module.load_state_dict(state_dict, strict=True, assign=False)


@torch.no_grad()
def init_random_(module: nn.Module, seed: int) -> None:
    """Seeded random weights for tiny configs (the scheme of the golden vectors).

    Reference initialisers zero the DiT head and the action outputs, which would make a tiny model blind to
    those paths, so: >=2-D weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2), norm scales ~ 1 + N(0, 0.1^2),
    modulation tables and embeddings ~ N(0, 1)/sqrt(width).
    """
    generators: dict[torch.device, torch.Generator] = {}  # drawn where the weights live (fast at full size)
    for name, p in module.named_parameters():
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        noise = torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("modulation", "cls_embedding", "pos_embedding", "head") and p.dim() >= 2:
            p.copy_(noise / math.sqrt(p.shape[-1]))
        elif leaf == "gamma" or (p.dim() == 1 and leaf == "weight"):
            p.copy_(1 + 0.1 * noise)
        elif p.dim() == 1:
            p.copy_(0.05 * noise)
        else:
            p.copy_(noise / math.sqrt(p[0].numel()))
