"""Every visible golden file runs through `worldstream golden` (fp32, atol = rtol = 1e-4)."""
import subprocess
import sys

import pytest

from conftest import golden_files
from worldstream.golden.cli import CHECK_MODULES, read_golden, run_file

FILES = golden_files()


@pytest.mark.skipif(not FILES, reason="no golden files beside the repository")
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_file(path, capsys):
    worst, passed, supported = run_file(path)
    if not supported:
        kind = read_golden(path)[1].get("kind")
        assert kind not in CHECK_MODULES
        pytest.skip(f"kind {kind} belongs to a later model family")
    out = capsys.readouterr().out
    assert passed, out
    assert worst <= 1e-4, out


@pytest.mark.skipif(not FILES, reason="no golden files beside the repository")
def test_golden_cli_contract():
    """`worldstream golden` prints one line per output and a final max_rel_err line; exit 0 when all pass."""
    small = [p for p in FILES if p.stem in ("mg2_gta_drive", "clip_visual")] or FILES[:1]
    proc = subprocess.run([sys.executable, "-m", "worldstream.cli", "golden", *map(str, small)],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("max_rel_err=")
    assert float(lines[-1].split("=")[1]) <= 1e-4
    assert any("max_abs_err=" in line for line in lines[:-1])
