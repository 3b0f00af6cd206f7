"""The light client: no torch and no PyAV at import, numpy frames, a clear error without PyAV, the CLI's shape."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest

from conftest import REPO
from worldstream.client import decode_frames
from worldstream.client.__main__ import BUNDLED_TRAJECTORIES, trajectory_path
from worldstream.v1 import session_pb2

IMPORT_CHECK = """
import sys, time
started = time.perf_counter()
import worldstream.client, worldstream.client.__main__
import worldstream.api.benchmark, worldstream.api.layout, worldstream.api.messages, worldstream.api.spaces
import worldstream.api.trajectory
print(time.perf_counter() - started, "torch" in sys.modules, "av" in sys.modules)
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_client_imports_fast_without_torch_or_pyav():
    run = python(IMPORT_CHECK)
    assert run.returncode == 0, run.stderr
    seconds, torch_loaded, av_loaded = run.stdout.split()
    assert (torch_loaded, av_loaded) == ("False", "False")
    assert float(seconds) < 1.0, f"import worldstream.client took {float(seconds):.2f} s"


def test_client_distribution_needs_no_torch():
    project = tomllib.loads((REPO / "client" / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].strip() for dep in project["dependencies"]}
    assert names == {"grpcio", "protobuf", "numpy", "pillow"}
    assert [dep.split(">")[0] for dep in project["optional-dependencies"]["video"]] == ["av"]


def test_without_pyav_play_says_how_to_install_it(tmp_path):
    """PyAV is only needed for the mp4: without it `play` stops before connecting, with the install line."""
    image = tmp_path / "first.png"
    image.write_bytes(b"not needed")
    run = python("import sys\nsys.modules['av'] = None  # what a missing package looks like to `import av`\n"
                 "from worldstream.client.__main__ import main\n"
                 "sys.exit(main(sys.argv[1:]))",
                 "play", "--address", "127.0.0.1:9", "--image", str(image), "--benchmark", "--blocks", "1",
                 "--out", str(tmp_path / "x.mp4"))
    assert run.returncode == 1
    assert "pip install 'worldstream-client[video]'" in run.stderr
    assert "reachable" not in run.stderr


def test_cli_is_subcommand_shaped_and_takes_no_mode():
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--trajectory" in run.stdout and "--mode" not in run.stdout
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "--image", "x.png", "--benchmark"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "play" in run.stderr


def test_bundled_trajectories(tmp_path):
    assert trajectory_path("universal_demo") == BUNDLED_TRAJECTORIES / "universal_demo.json"
    assert json.loads(trajectory_path("universal_demo").read_text())["mode"] == "universal"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert trajectory_path(str(own)) == own
    with pytest.raises(ValueError, match="bundled name \\(universal_demo"):
        trajectory_path("nowhere")


def test_raw_frames_decode_to_numpy_and_are_size_checked():
    info = session_pb2.SessionInfo(height=2, width=3, frame_encoding=session_pb2.FRAME_ENCODING_RAW_RGB)
    pixels = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
    block = session_pb2.BlockChunk(block_index=4, frames=[frame.tobytes() for frame in pixels])
    frames = decode_frames(block, info)
    assert frames.dtype == np.uint8 and np.array_equal(frames, pixels)
    block.frames[1] = block.frames[1][:-1]
    with pytest.raises(ValueError, match="block 4: a raw frame of 17 bytes, expected 2x3x3 = 18"):
        decode_frames(block, info)
