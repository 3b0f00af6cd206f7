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


def read_state_dict(path: str | Path, prefix: str = "", entry: str | None = None) -> dict[str, torch.Tensor]:
    """Load the tensors of a local checkpoint file, keeping those under `prefix` (stripped).

    `entry`: the file is a dict of state dicts (a training checkpoint such as Self-Forcing's, with `generator`,
    `generator_ema`, `critic`) and this one is wanted.
    """
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
    if entry is not None:
        if entry not in sd:
            raise CheckpointError(f"{path}: no entry {entry!r}; the file holds {sorted(map(str, sd))}")
        sd = sd[entry]
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: entry {entry!r} is a {type(sd).__name__}, not a state dict")
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# name -> (shape, floating point): what strict loading checks of each tensor
Layout = dict[str, tuple[tuple[int, ...], bool]]


def safetensors_layout(path: str | Path) -> Layout:
    """The tensors' shapes and kinds from a .safetensors header, without reading any tensor data."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    with safe_open(str(path), "pt") as f:
        return {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype().startswith(("F", "BF")))
                for key in f.keys()}


def check_strict(module: nn.Module, layout: Layout, source: str) -> None:
    """Every key of `module` must be in `layout` with its exact shape, and no other key (CheckpointError naming
    `source` and the first offending key)."""
    expected = module.state_dict()
    for key, param in expected.items():
        if key not in layout:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {list(param.shape)}; "
                                  f"the file has {len(layout)} tensors, the model {len(expected)})")
        shape, floating = layout[key]
        if shape != tuple(param.shape):
            raise CheckpointError(f"{source}: key {key!r} has shape {list(shape)}, "
                                  f"the model expects {list(param.shape)}")
        if not floating and param.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} is not a floating tensor")
    unexpected = [k for k in layout if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all); "
                              "is this the checkpoint of another model or mode?")


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state_dict` into `module` after `check_strict`. Tensors are cast to the module's dtype (the
    distilled DiT files are fp32 on disk and run in bf16 on GPU)."""
    check_strict(module, {k: (tuple(v.shape), v.is_floating_point()) for k, v in state_dict.items()}, source)
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
