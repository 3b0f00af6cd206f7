"""`worldstream golden FILE...`: run golden test vectors through the implementation and report the errors.

Each file's safetensors metadata names its `kind`; the matching check rebuilds the module from the file's
weights and configuration, runs the file's inputs through the production code path and returns
(output, actual, expected) triples. One line is printed per output, then `max_rel_err=<value>`; the exit
status is 0 when every output is within atol = rtol = 1e-4 (float32).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ATOL = RTOL = 1e-4

# kind -> module (under worldstream.golden) whose CHECKS dict handles it
CHECK_MODULES = {
    "mg2_dit_blocks": "dit", "mg2_gta_drive": "dit", "mg2_templerun": "dit",
    "wan_vae_encode": "vae", "wan_vae_stream_decode": "vae",
    "clip_visual": "clip",
    "umt5_encoder": "umt5",
    "eden_pair": "eden",
    "selfforcing_t2v_blocks": "selfforcing",
    "longlive_switch": "longlive",
    "video_conditional": "longlive",
}


def read_golden(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    with safe_open(str(path), "pt") as f:
        raw = f.metadata() or {}
    meta: dict[str, object] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return load_file(str(path)), meta


def compare(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float, bool]:
    """(max abs error, max abs error / max |expected|, within atol + rtol * |expected| everywhere)."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise ValueError(f"shape {list(actual.shape)} != expected {list(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.double()
    diff = (a - e).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(e.abs().max()) if e.numel() else 0.0
    ok = bool(torch.all(diff <= ATOL + RTOL * e.abs())) and not bool(torch.isnan(a).any())
    return max_abs, (max_abs / scale if scale > 0 else max_abs), ok


def run_file(path: Path) -> tuple[float, bool, bool]:
    """Check one file; returns (max relative error, passed, supported)."""
    tensors, meta = read_golden(path)
    kind = str(meta.get("kind", ""))
    if kind not in CHECK_MODULES:
        print(f"{path.name}: kind {kind!r} is not supported: no check for it  FAIL")
        return 0.0, False, False
    checks = importlib.import_module(f"worldstream.golden.{CHECK_MODULES[kind]}").CHECKS
    worst, passed = 0.0, True
    with torch.no_grad():
        results = checks[kind](tensors, meta)
    for name, actual, expected in results:
        max_abs, rel, ok = compare(actual, expected)
        worst, passed = max(worst, rel), passed and ok
        print(f"{path.name} {name}: max_abs_err={max_abs:.3e} max_rel_err={rel:.3e}{'' if ok else '  FAIL'}")
    return worst, passed, True


def check_files(paths: list[Path]) -> int:
    """Check every file; prints the errors and returns the exit status (0: all within tolerance)."""
    worst, passed = 0.0, True
    for path in paths:
        rel, ok, _ = run_file(path)
        worst, passed = max(worst, rel), passed and ok
    print(f"max_rel_err={worst:.3e}")
    return 0 if passed else 1
