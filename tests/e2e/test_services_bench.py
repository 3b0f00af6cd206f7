"""benchmarks/services.py on the tiny config (real service processes): the first frame's path from the services'
logs, every figure there and in an order that can happen."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "services.py"
LOG_CLOCKS = 0.003  # the decoder-to-encoder offset comes from two logs' millisecond timestamps
ROUNDING = 0.0002  # the logs round each figure to 0.1 ms: a sum of two may pass a figure taken just after


def test_first_frame_path(tmp_path):
    out = tmp_path / "services.json"
    printed = subprocess.run([sys.executable, str(SCRIPT), "--config", "mg2/universal_tiny", "--blocks", "3",
                              "--runs", "1", "--json", str(out), "--log-dir", str(tmp_path / "logs")],
                             check=True, timeout=180, cwd=REPO, capture_output=True, text=True).stdout
    assert "run 0 first-frame path (ms): decoder start -> encoder stream start" in printed, printed
    run = json.loads(out.read_text())["runs"][0]
    path = run["first_frame_path"]
    assert path is not None, "the services' logs lack the session's events"
    offset = path.pop("encoder_stream_start_s")
    assert all(seconds > 0 for seconds in path.values()), path
    assert -LOG_CLOCKS < offset < path["encoder_ready_s"], (offset, path)
    # decoder: the encoder accepted the image, then its context came, the session opened, `info` went out
    assert path["encoder_ready_s"] <= path["context_s"] < path["info_sent_s"] <= run["info_s"]
    assert path["context_s"] + path["session_setup_s"] <= path["info_sent_s"] + ROUNDING
    assert offset + path["encoder_open_s"] <= path["encoder_ready_s"] + LOG_CLOCKS
    # encoder, from its stream's start: opened, block 0 encoded, then sent
    assert path["encoder_open_s"] + path["encoder_block0_encode_s"] <= path["encoder_block0_encoded_s"] + ROUNDING
    assert path["encoder_block0_encoded_s"] <= path["encoder_block0_sent_s"]
    # block 0 needs its condition: its first frames follow the encoder's send, and reach the client after
    assert offset + path["encoder_block0_sent_s"] < path["first_frames_sent_s"] + LOG_CLOCKS
    assert path["info_sent_s"] < path["first_frames_sent_s"] <= run["first_frame_s"]
