"""benchmarks/transfer.py --quick (tiny configs, real service processes): every cell measured, sizes that add up."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "transfer.py"


def run_quick(tmp_path, *flags: str) -> dict:
    out = tmp_path / "transfer.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", *flags, "--json", str(out), "--log-dir",
                    str(tmp_path / "logs")], check=True, timeout=120, cwd=REPO)
    return json.loads(out.read_text())


def test_quick_eden_grid(tmp_path):
    record = run_quick(tmp_path, "--plot", str(tmp_path / "transfer.png"))
    cells = {(c["path"], c["payload"], c["batch"]): c for c in record["cells"]}
    assert set(cells) == {(path, payload, batch) for path in ("torch.save", "wire", "grpc")
                          for payload in ("tokens_fp32", "tokens_bf16", "frames", "frames_jpeg") for batch in (1, 4)}
    for cell in cells.values():
        for key in ("bytes_per_pair", "encode_ms", "transfer_ms", "decode_ms", "pairs_per_s", "first_frame_p50_ms"):
            assert math.isfinite(cell[key]) and cell[key] > 0, (cell["path"], cell["payload"], key)
        assert cell["first_frame_p99_ms"] >= cell["first_frame_p50_ms"]
        assert all(mib > 0 for mib in cell["rss_mib"].values())
    assert set(cells["grpc", "frames", 1]["rss_mib"]) == {"client", "encoder", "decoder"}
    for path in ("wire", "grpc"):
        for batch in (1, 4):
            fp32, bf16 = (cells[path, p, batch]["bytes_per_pair"] for p in ("tokens_fp32", "tokens_bf16"))
            assert bf16 == pytest.approx(fp32 / 2, rel=0.05)
            assert cells[path, "frames_jpeg", batch]["bytes_per_pair"] < cells[path, "frames", batch]["bytes_per_pair"]
        # K + 1 frames for K pairs: batching nearly halves the frames payload
        assert cells[path, "frames", 4]["bytes_per_pair"] < 0.7 * cells[path, "frames", 1]["bytes_per_pair"]
    for payload in ("tokens_fp32", "frames"):  # the same tensors in the same format, in one process or over gRPC
        assert cells["grpc", payload, 4]["bytes_per_pair"] == pytest.approx(cells["wire", payload, 4]["bytes_per_pair"],
                                                                            rel=0.01)
    assert (tmp_path / "transfer.png").stat().st_size > 10_000


def test_quick_mg2_cond_concat(tmp_path):
    result = run_quick(tmp_path, "--mg2")["mg2"]
    assert result["max_abs_difference"] == 0  # streamed per block == one batched encode
    for way in ("streamed", "batched", "streamed_grpc"):
        assert 0 < result[way]["first_block_ms"] <= result[way]["all_blocks_ms"]
        assert result[way]["bytes_per_block"] == pytest.approx(result["streamed"]["bytes_per_block"], rel=0.01)
    assert result["batched"]["first_block_ms"] == result["batched"]["all_blocks_ms"]  # nothing before the whole video
