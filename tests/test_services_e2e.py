"""End to end: client -> decoder service -> encoder service, as real processes on loopback, tiny config."""
from __future__ import annotations

import concurrent.futures
import json
import os
import pty
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from service_harness import CONFIG, REPO, engine_frames, png_bytes, running_services
from worldstream.api.benchmark import benchmark_trajectory
from worldstream.api.layout import BlockLayout
from worldstream.api.spaces import get_action_space
from worldstream.api.trajectory import split_track
from worldstream.client import SessionStream, run_session, start_request
from worldstream.engine.config import load_config
from worldstream.v1 import session_pb2

SEED = 1234
IMAGE = png_bytes(seed=7)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("e2e"), decoder_args=["--max-sessions", "3"]) as running:
        yield running


def reference_actions(n_blocks: int):
    """Per-frame benchmark rows for block 0 (exact replay), then a held key action, then a raw vector."""
    space, layout = get_action_space("universal"), BlockLayout(frames_per_block=3, temporal_stride=4)
    keyboard, mouse = benchmark_trajectory(space, layout.track_frames(n_blocks), seed=3)
    actions = split_track(layout, keyboard, mouse)[:1]
    actions.append(space.from_names(["forward", "left"], [0.0, 0.1]))
    actions.append(space.from_vectors([0.0, 1.0, 0.0, 1.0], [-0.1, 0.0]))
    return actions[:n_blocks]


def test_stream_equals_batch_engine(services):
    actions = reference_actions(3)
    result = run_session(services.address, IMAGE, actions, seed=SEED, frame_encoding="raw")  # the server's mode
    info = result.info
    assert (info.mode, info.first_block_frames, info.block_frames, info.max_blocks) == ("universal", 9, 12, 3)
    assert info.fps == load_config(CONFIG).video.fps == 16
    assert list(info.action_space.key_names) == ["forward", "back", "left", "right"]
    assert result.end.reason == session_pb2.END_REASON_MAX_BLOCKS
    assert [b.index for b in result.blocks] == [0, 1, 2]
    assert [b.frames.shape[0] for b in result.blocks] == [9, 12, 12]
    assert result.frames.shape == (33, info.height, info.width, 3)
    for block, action in zip(result.blocks, actions):
        assert np.array_equal(block.action.rows(action.n_rows).keyboard, action.keyboard)
        assert {"action_wait", "condition_wait", "denoise", "vae_decode", "frame_encode"} <= set(block.stage_seconds)

    expected = engine_frames(IMAGE, actions, SEED)
    for b, (block, frames) in enumerate(zip(result.blocks, expected)):
        assert np.array_equal(block.frames, frames), f"block {b} differs from the in-process engine"


def test_concurrent_sessions_are_independent(services):
    """Sessions running at the same time on one decoder each give exactly their own seed's frames."""
    actions = reference_actions(2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = {seed: pool.submit(run_session, services.address, IMAGE, actions, mode="universal", seed=seed,
                                  frame_encoding="raw") for seed in (SEED + 1, SEED + 2)}
        results = {seed: run.result(timeout=300) for seed, run in runs.items()}
    for seed, result in results.items():
        for b, (block, frames) in enumerate(zip(result.blocks, engine_frames(IMAGE, actions, seed))):
            assert np.array_equal(block.frames, frames), f"seed {seed}, block {b} differs from a session run alone"
    assert not np.array_equal(results[SEED + 1].frames, results[SEED + 2].frames)


def test_jpeg_realtime_session(services):
    """REALTIME: blocks run back to back; each uses the latest action (the idle action before the first, the
    last one again when no new one came)."""
    start = start_request(IMAGE, "universal", seed=SEED, max_blocks=3, pacing="realtime", jpeg_quality=90)
    forward = get_action_space("universal").from_names(["forward"])
    with SessionStream(services.address, start) as stream:
        stream.send(forward)
        blocks = list(stream)
    info = stream.info
    assert info.frame_encoding == session_pb2.FRAME_ENCODING_JPEG and info.pacing == session_pb2.PACING_REALTIME
    assert stream.end.reason == session_pb2.END_REASON_MAX_BLOCKS and stream.end.blocks_generated == 3
    frame = (info.height, info.width, 3)
    assert [b.frames.shape for b in blocks] == [(9, *frame), (12, *frame), (12, *frame)]
    applied = [np.array_equal(b.action.keyboard, forward.keyboard) for b in blocks]
    assert applied[-1] and applied == sorted(applied)  # idle until the action arrived, then it is repeated
    assert all(np.array_equal(b.action.keyboard, np.zeros((1, 4))) for b, on in zip(blocks, applied) if not on)


def test_client_stops_early(services):
    """The client may stop at any block: the blocks whose actions were sent arrive, then `end`."""
    space = get_action_space("universal")
    start = start_request(IMAGE, "universal", seed=SEED, max_blocks=10)
    with SessionStream(services.address, start) as stream:
        stream.send(space.from_names(["forward"]))
        stream.finish(explicit_stop=True)
        blocks = list(stream)
    assert len(blocks) == 1 and stream.end.reason == session_pb2.END_REASON_CLIENT_STOP


def test_client_cli_writes_video(services, tmp_path):
    image = tmp_path / "first.png"
    image.write_bytes(IMAGE)
    out = tmp_path / "session.mp4"
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                          "--image", str(image), "--benchmark", "--blocks", "2", "--out", str(out), "--overlay"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"video: {out}" in run.stdout and "time to first frame" in run.stdout and "(universal)" in run.stdout
    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
        assert container.streams.video[0].average_rate == 16  # the session's fps
    assert frames == 21


def test_client_cli_checks_the_trajectory_against_the_session(services, tmp_path):
    """The client learns the mode from the session: a trajectory of another mode is refused, saying which."""
    image = tmp_path / "first.png"
    image.write_bytes(IMAGE)
    trajectory = tmp_path / "drive.json"
    trajectory.write_text(json.dumps({"format": "worldstream.trajectory.v1", "mode": "gta_drive",
                                      "blocks": [{"keys": ["forward"]}]}))
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                          "--image", str(image), "--trajectory", str(trajectory), "--blocks", "1",
                          "--out", str(tmp_path / "no.mp4")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "written for mode 'gta_drive', the model runs 'universal'" in run.stderr
    assert not (tmp_path / "no.mp4").exists()


@pytest.mark.parametrize("pacing", ["realtime", "lockstep"])
def test_interactive_client_plays_from_a_terminal(services, tmp_path, pacing):
    """`--interactive` reads raw keys from a (pseudo-)terminal; held keys become the blocks' actions."""
    image = tmp_path / "first.png"
    image.write_bytes(IMAGE)
    out = tmp_path / "played.mp4"
    leader, follower = pty.openpty()
    client = subprocess.Popen([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                               "--image", str(image), "--interactive", "--pacing", pacing,
                               "--blocks", "3", "--out", str(out), "--overlay"], cwd=REPO, stdin=follower,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(follower)
    try:
        deadline = time.monotonic() + 120
        while client.poll() is None and time.monotonic() < deadline:
            os.write(leader, b"w")  # like a held key's auto-repeat
            time.sleep(0.05)
        stdout, stderr = client.communicate(timeout=30)
    finally:
        os.close(leader)
        if client.poll() is None:
            client.kill()
    assert client.returncode == 0, stderr
    assert f"video: {out}" in stdout
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9 + 2 * 12
