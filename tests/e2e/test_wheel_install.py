"""The two distributions as a user gets them: wheels built from this checkout, installed into fresh virtualenvs
outside the repository (nothing editable, nothing read from the source tree), then used from there."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import av
import pytest

from conftest import GOLDEN_DIR, REPO

INSTALL_TIMEOUT = 900
# The environment of a user's shell: nothing that points Python at this checkout.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(args: list[str | Path], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO / "client", REPO / "services"],
        cwd=out, timeout=INSTALL_TIMEOUT)
    return out


def fresh_venv(root: Path, wheels: Path, requirement: str) -> Path:
    """A new virtualenv under `root` with `requirement` installed from the built wheels (dependencies from the
    package index); returns its bin/ folder."""
    venv.EnvBuilder(with_pip=True).create(root)
    bin_dir = root / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "-q", "--find-links", wheels, requirement], cwd=root,
        timeout=INSTALL_TIMEOUT)
    return bin_dir


def test_generated_api_ships_in_the_client_wheel(wheels):
    import zipfile

    (wheel,) = wheels.glob("worldstream_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("session_pb2.py", "session_pb2_grpc.py", "encoder_pb2.py", "tensor_pb2.py"):
        assert f"worldstream/v1/{module}" in names


def test_client_installs_and_imports_without_torch(wheels, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", wheels, "worldstream-client")
    probe = ("import sys, time; t = time.perf_counter(); import worldstream.client, worldstream.api, worldstream.v1; "
             "print(time.perf_counter() - t); print(sorted(m for m in ('torch', 'av') if m in sys.modules))")
    out = run([bin_dir / "python", "-c", probe], cwd=tmp_path).stdout.split("\n")
    assert out[1] == "[]"  # neither torch nor PyAV was imported
    assert float(out[0]) < 1.0
    installed = run([bin_dir / "python", "-m", "pip", "list", "--format=freeze"], cwd=tmp_path).stdout.lower()
    assert "torch==" not in installed and "grpcio-tools" not in installed
    run([bin_dir / "worldstream-client", "--help"], cwd=tmp_path)


def test_services_wheel_runs_a_session_and_the_goldens_outside_the_repository(wheels, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", wheels, "worldstream-services")
    # A tiny session through both services and the client, configs and the demo picture from package data.
    out = tmp_path / "demo.mp4"
    run([bin_dir / "worldstream", "demo", "--config", "mg2/universal_tiny", "--blocks", "2", "--out", out],
        cwd=tmp_path, timeout=300)
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9 + 12
    # The golden checker on two of the shared files (the same code path as the suite's golden tests).
    goldens = [GOLDEN_DIR / f"{kind}.safetensors" for kind in ("mg2_gta_drive", "clip_visual")]
    if not all(p.exists() for p in goldens):
        pytest.skip(f"golden files not available in {GOLDEN_DIR}")
    lines = run([bin_dir / "worldstream", "golden", *goldens], cwd=tmp_path).stdout.strip().splitlines()
    assert lines[-1].startswith("max_rel_err=") and float(lines[-1].split("=")[1]) <= 1e-4
