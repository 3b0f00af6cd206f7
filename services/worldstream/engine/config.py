"""Model/mode configurations: omegaconf YAML files under `configs/`, strict about their keys.

A file may name parents with `inherit: <path>` or `inherit: [<path>, ...]` (relative to itself); they are
merged in order and the file itself last. A file without parents is a schema (`configs/mg2/_base.yaml` holds
every key of the mg2 family): whatever is merged onto it, the later parents, the file itself and `--set`
overrides, may only set keys it already has, so a misspelt key is an error instead of a silently ignored value.
Configs are addressed by name (`mg2/universal_tiny`, resolved under the package's `configs/`: the repository's
top-level folder, shipped in the wheel as package data) or by path.
"""
from __future__ import annotations

import argparse
import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = "mg2/universal_tiny"


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key and the source."""


def config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = CONFIG_ROOT / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml")
                   if not p.name.startswith("_"))
    raise ConfigError(f"no config {name_or_path!r}: give a .yaml path or one of {known}")


def _unknown_key(schema: DictConfig, error: ConfigKeyError, source: str) -> ConfigError:
    """The error for a key `source` sets that `schema` lacks, with the closest existing key as a hint."""
    *parents, key = str(error.full_key).split(".")
    node = OmegaConf.select(schema, ".".join(parents)) if parents else schema
    siblings = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(key, siblings, n=1)
    hint = f" (did you mean {'.'.join([*parents, close[0]])!r}?)" if close else ""
    return ConfigError(f"{source}: unknown config key {error.full_key!r}{hint}")


def _merge_strict(schema: DictConfig, update: DictConfig, source: str) -> DictConfig:
    OmegaConf.set_struct(schema, True)  # keys are fixed; the merge result keeps the flag
    try:
        return OmegaConf.merge(schema, update)
    except ConfigKeyError as e:
        raise _unknown_key(schema, e, source) from None


def _load_file(path: Path) -> DictConfig:
    cfg = OmegaConf.load(path)
    parents = cfg.pop("inherit", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not parents:
        return cfg
    merged = _load_file((path.parent / parents[0]).resolve())
    for parent in parents[1:]:
        resolved = (path.parent / parent).resolve()
        merged = _merge_strict(merged, _load_file(resolved), str(resolved))
    return _merge_strict(merged, cfg, str(path))


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Load a config and apply dotlist overrides such as `device=cpu` or `limits.max_blocks=20`; raises
    ConfigError for a key the config's schema does not have."""
    cfg = _load_file(config_path(name_or_path))
    for override in overrides:
        cfg = _merge_strict(cfg, OmegaConf.from_dotlist([override]), f"--set {override}")
    OmegaConf.resolve(cfg)
    return cfg


# ---- the command-line flags every front-end shares ------------------------------------------------------------

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="config name under configs/ or a .yaml path "
                                                                 f"(default: {DEFAULT_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set limits.max_blocks=100 (repeatable; the key must exist)")
    parser.add_argument("--device", help="device override, e.g. cpu or cuda:1 (default: the config's)")


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The `--set` overrides plus `--device` as one."""
    return [*args.overrides, *([f"device={args.device}"] if args.device else [])]


def config_from_args(args: argparse.Namespace) -> DictConfig:
    return load_config(args.config, overrides_from_args(args))
