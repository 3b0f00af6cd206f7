"""Model/mode configurations: omegaconf YAML files under `configs/`.

A file may name parents with `inherit: <path>` or `inherit: [<path>, ...]` (relative to itself); they are
merged in order and the file itself last. Configs are
addressed by name (`mg2/universal_tiny`, resolved under the package's `configs/`: the repository's top-level folder,
shipped in the wheel as package data) or by path.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_ROOT / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml")
                   if not p.name.startswith("_"))
    raise FileNotFoundError(f"no config {name_or_path!r}: give a .yaml path or one of {known}")


def _load_file(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    parents = cfg.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    return OmegaConf.merge(*(_load_file((path.parent / p).resolve()) for p in parents), cfg)


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a config and apply dotlist overrides such as `device=cpu` or `limits.max_blocks=20`."""
    cfg = _load_file(config_path(name_or_path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    OmegaConf.resolve(cfg)
    return cfg
