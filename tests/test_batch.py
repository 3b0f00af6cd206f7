"""Batch front-end on the tiny CPU config: a playable mp4 and a Chrome trace with the block-loop tags."""
import json

import av

from conftest import REPO

from worldstream.cli import main


def test_blocks_write_a_playable_mp4(tmp_path):
    """Three blocks: block 0's 9 frames, then 12 per block, and block 2 is the first to roll the KV window."""
    out = tmp_path / "batch.mp4"
    assert main(["batch", "--config", "mg2/universal_tiny", "--blocks", "3", "--out", str(out), "--overlay",
                 "--trajectory", str(REPO / "configs/trajectories/universal_demo.json")]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 16
    assert len(frames) == 9 + 2 * 12
    assert frames[0].shape == (288, 528, 3)  # 96x176, enlarged 3x for the overlay


def test_profile_writes_nested_trace_tags(tmp_path):
    trace = tmp_path / "trace.json"
    assert main(["batch", "--config", "mg2/templerun_tiny", "--blocks", "2", "--out", str(tmp_path / "t.mp4"),
                 "--profile", str(trace)]) == 0
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    for tag in ("session_setup", "conditioning", "block_0", "block_1", "data_preparation", "cache_update",
                "vae_decode", "to_host", "denoise_step_0_t1000.0", "denoise_step_3_t625.0"):
        assert tag in names, tag
