import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get("WORLDSTREAM_GOLDEN_DIR", REPO.parent / "shared" / "golden"))
# CI sets this: missing golden files are then a failure, never a silent skip.
REQUIRE_GOLDEN = os.environ.get("WORLDSTREAM_REQUIRE_GOLDEN") == "1"

torch.set_num_threads(min(2, torch.get_num_threads()))


def golden_files() -> list[Path]:
    files = sorted(GOLDEN_DIR.glob("*.safetensors"))
    if not files and REQUIRE_GOLDEN:
        raise RuntimeError(f"WORLDSTREAM_REQUIRE_GOLDEN=1 but there are no golden files in {GOLDEN_DIR}")
    return files


def load_golden(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Tensors and decoded metadata of one golden file; skips the test when the shared goldens are absent."""
    from worldstream.golden.cli import read_golden

    path = GOLDEN_DIR / f"{kind}.safetensors"
    if not path.exists():
        if REQUIRE_GOLDEN:
            pytest.fail(f"WORLDSTREAM_REQUIRE_GOLDEN=1 but golden file {path} is missing")
        pytest.skip(f"golden file {path} not available")
    return read_golden(path)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_golden_outputs(kind: str, results) -> None:
    """Every (name, actual, expected) of a golden check within atol = rtol = 1e-4; prints the worst error."""
    from worldstream.golden.cli import compare

    worst = 0.0
    for name, actual, expected in results:
        _, rel, ok = compare(actual, expected)
        assert ok, (name, rel)
        worst = max(worst, rel)
    assert worst <= 1e-4
    print(f"{kind} max_rel_err={worst:.3e}")
