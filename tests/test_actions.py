import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_DIR

from worldstream.api.benchmark import BENCHMARK_ACTIONS, benchmark_trajectory
from worldstream.api.layout import BlockLayout
from worldstream.api.messages import action_space_from_message, action_space_message
from worldstream.api.spaces import ACTION_SPACES, ActionSpace, BlockAction, get_action_space
from worldstream.api.trajectory import load_trajectory, planned_actions, save_trajectory, split_track
from worldstream.engine.action_track import ActionTrack, config_layout
from worldstream.engine.config import load_config

REPO = Path(__file__).resolve().parents[1]
MG2 = config_layout(load_config("mg2/universal"))  # 3 latent frames per block, stride 4, 12-row windows


def naive_window(keyboard: torch.Tensor, b: int) -> torch.Tensor:
    """Spec §2.7 literally: latent f reads raw rows 4f-12 .. 4f-1, indices < 0 clamped to row 0."""
    rows = []
    for f in range(3 * b, 3 * b + 3):
        rows.append(torch.stack([keyboard[max(r, 0)] for r in range(4 * f - 12, 4 * f)]))
    return torch.stack(rows)  # [3, 12, K]


def as_latent_windows(window: torch.Tensor) -> torch.Tensor:
    """The action module's grouping of the 20 block rows: latent i gets rows 4i .. 4i+11."""
    return torch.stack([window[4 * i:4 * i + 12] for i in range(3)])


def test_frame_arithmetic():
    assert MG2 == BlockLayout(frames_per_block=3, temporal_stride=4, window_frames=12)
    assert (MG2.first_block_frames, MG2.block_frames) == (9, 12)
    assert [MG2.track_frames(b) for b in (1, 2, 3, 50)] == [9, 21, 33, 597]
    assert MG2.span(0) == (0, 9) and MG2.span(1) == (9, 21) and MG2.span(4) == (45, 57)
    for b in range(1, 6):
        assert MG2.span(b) == (12 * b - 3, 12 * b + 9) and MG2.frames(b) == 12
        assert MG2.window(b) == (12 * b - 12, 12 * b + 8)
    assert MG2.window(0) == (-12, 8)
    assert [MG2.blocks_in_track(n, "track") for n in (9, 21, 597)] == [1, 2, 50]
    with pytest.raises(ValueError, match=r"12\*B-3 rows \(9, 21, 33"):
        MG2.blocks_in_track(13, "track")
    # Other layouts follow the same rule: 2 latent frames of stride 4 give 5, then 8 pixel frames.
    other = BlockLayout(frames_per_block=2, temporal_stride=4, window_frames=8)
    assert [other.frames(b) for b in range(3)] == [5, 8, 8] and other.span(2) == (13, 21)


def test_layout_from_block_frames():
    """A client rebuilds the layout from SessionInfo's frame counts (no action window: that is the model's)."""
    assert BlockLayout.from_block_frames(9, 12) == BlockLayout(3, 4)
    assert BlockLayout.from_block_frames(1, 1) == BlockLayout(1, 1)
    assert BlockLayout.from_block_frames(5, 8) == BlockLayout(2, 4)
    assert BlockLayout.from_block_frames(10, 12) == BlockLayout(4, 3)
    for first, later in [(9, 0), (0, 0), (10, 13), (12, 9)]:
        with pytest.raises(ValueError, match="fit no layout"):
            BlockLayout.from_block_frames(first, later)
    with pytest.raises(ValueError, match="no action window"):
        BlockLayout(3, 4).window(0)


def test_config_layout_checks_the_action_module_stride():
    cfg = load_config("mg2/universal_tiny", ["dit.action.vae_time_compression_ratio=8"])
    with pytest.raises(ValueError, match="compresses time by 4"):
        config_layout(cfg)
    assert config_layout(load_config("mg2/gta_drive", ["pipeline.frames_per_block=2"])).block_frames == 8


@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_window_rows_match_naive_reference(blocks):
    n = MG2.track_frames(blocks)
    keyboard = torch.rand(n, 4)
    mouse = torch.rand(n, 2) - 0.5
    track = ActionTrack.from_full(MG2, keyboard, mouse)
    for b in range(blocks):
        kb, ms = track.window_rows(b)
        assert kb.shape == (20, 4) and ms.shape == (20, 2)
        assert torch.equal(as_latent_windows(kb), naive_window(keyboard, b))
        assert torch.equal(as_latent_windows(ms), naive_window(mouse, b))
        if b >= 1:  # plain slice of raw rows [12b-12, 12b+7]
            assert torch.equal(kb, keyboard[12 * b - 12:12 * b + 8])
    first, _ = track.window_rows(0)
    assert torch.equal(first[:12], keyboard[:1].expand(12, 4)) and torch.equal(first[12:], keyboard[:8])


def test_write_block_spans_and_hold():
    space = ACTION_SPACES["universal"]
    track = ActionTrack.for_space(space, MG2, max_blocks=4)
    for b in range(4):
        keys = space.key_names[b]
        track.write_block(b, space.from_names([keys], [0.01 * b, -0.01 * b]))
    for b in range(4):
        start, stop = MG2.span(b)
        expected = torch.zeros(4)
        expected[b] = 1
        assert torch.equal(track.keyboard[start:stop], expected.expand(stop - start, 4))
        assert torch.allclose(track.mouse[start:stop], torch.tensor([0.01 * b, -0.01 * b]).expand(stop - start, 2))
    assert track.keyboard.shape[0] == MG2.track_frames(4)
    # A block's window: the latency of spec §3.4 (latent 3b sees 9 old + 3 new rows).
    kb, _ = track.window_rows(2)
    assert kb[:9, 1].sum() == 9 and kb[9:, 2].sum() == 11 and kb[:9, 2].sum() == 0

    # Per-frame rows must match the span; rewriting is allowed, skipping ahead is not.
    rows = np.eye(4, dtype=np.float32)[np.arange(12) % 4]
    track.write_block(1, BlockAction(rows, np.zeros((12, 2))))
    assert torch.equal(track.keyboard[9:21], torch.from_numpy(rows))
    with pytest.raises(ValueError, match="spans 9"):
        track.write_block(0, BlockAction(rows, np.zeros((12, 2))))
    fresh = ActionTrack.for_space(space, MG2, max_blocks=4)
    with pytest.raises(ValueError, match="next block is 0"):
        fresh.write_block(1, space.idle_action())
    with pytest.raises(ValueError, match="no action yet"):
        fresh.window_rows(0)
    with pytest.raises(ValueError, match="mouse"):
        fresh.write_block(0, BlockAction(np.zeros((1, 4))))
    with pytest.raises(ValueError, match="no action window"):
        ActionTrack.for_space(space, BlockLayout(3, 4), max_blocks=4)


def test_split_write_reproduces_full_track_and_prefix():
    keyboard, mouse = benchmark_trajectory(ACTION_SPACES["gta_drive"], MG2.track_frames(5), seed=3)
    actions = split_track(MG2, keyboard, mouse)
    assert [a.n_rows for a in actions] == [9, 12, 12, 12, 12]
    track = ActionTrack.for_space(ACTION_SPACES["gta_drive"], MG2, max_blocks=5)
    for b, action in enumerate(actions):
        track.write_block(b, action)
    keyboard, mouse = torch.from_numpy(keyboard), torch.from_numpy(mouse)
    full = ActionTrack.from_full(MG2, keyboard, mouse)
    assert torch.equal(track.keyboard, keyboard) and torch.equal(track.mouse, mouse)
    for b in range(5):
        assert torch.equal(track.window_rows(b)[0], full.window_rows(b)[0])
        kb, ms = full.prefix(b)
        assert kb.shape[0] == 1 + 4 * (3 * b + 2) and torch.equal(ms, mouse[:kb.shape[0]])
    with pytest.raises(ValueError, match="12\\*B-3"):
        ActionTrack.from_full(MG2, torch.zeros(13, 2))


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason="shared goldens not available")
@pytest.mark.parametrize("name", ["mg2_dit_blocks", "mg2_gta_drive", "mg2_templerun"])
def test_prefix_matches_golden_cond_current(name):
    from safetensors.torch import load_file
    t = load_file(str(GOLDEN_DIR / f"{name}.safetensors"))
    mouse = t.get("input.mouse_cond")
    track = ActionTrack.from_full(MG2, t["input.keyboard_cond"][0], None if mouse is None else mouse[0])
    b = 0
    while f"block{b}.keyboard_cond" in t:
        kb, ms = track.prefix(b)
        assert torch.equal(kb, t[f"block{b}.keyboard_cond"][0])
        if mouse is not None:
            assert torch.equal(ms, t[f"block{b}.mouse_cond"][0])
        b += 1
    assert b == track.max_blocks


def test_interactive_key_maps():
    uni = ACTION_SPACES["universal"]
    a = uni.from_pressed({"w", "J"})
    assert a.keyboard.tolist() == [[1, 0, 0, 0]] and np.allclose(a.mouse, [[0.0, -0.1]])
    a = uni.from_pressed({"I", "L", "Q"})
    assert a.keyboard.sum() == 0 and np.allclose(a.mouse, [[0.1, 0.1]])
    gta = ACTION_SPACES["gta_drive"]
    a = gta.from_pressed({"S", "D"})
    assert a.keyboard.tolist() == [[0, 1]] and np.allclose(a.mouse, [[0.0, 0.1]])
    a = gta.from_pressed({"Q"})
    assert a.keyboard.sum() == 0 and np.abs(a.mouse).sum() == 0
    temple = ACTION_SPACES["templerun"]
    for key, index in zip("QWSZCAD", range(7)):
        a = temple.from_pressed({key})
        assert a.mouse is None and a.keyboard[0].argmax() == index and a.keyboard.sum() == 1
    assert temple.from_pressed(set()).keyboard.tolist() == [[1, 0, 0, 0, 0, 0, 0]]  # nomove
    with pytest.raises(ValueError, match="one key per block"):
        temple.from_pressed({"W", "S"})
    with pytest.raises(ValueError, match="unknown key"):
        uni.from_pressed({"X"})
    assert "W=forward" in uni.key_help()


@pytest.mark.parametrize("mode", sorted(ACTION_SPACES))
def test_action_space_survives_the_session_info(mode):
    """A client rebuilds the mode's action space from SessionInfo: same layout, same actions from the same keys."""
    space = ACTION_SPACES[mode]
    rebuilt = action_space_from_message(mode, action_space_message(space))
    assert (rebuilt.name, rebuilt.key_names, rebuilt.mouse_dim, rebuilt.one_hot, rebuilt.idle_key) == \
        (space.name, space.key_names, space.mouse_dim, space.one_hot, space.idle_key)
    assert rebuilt.mouse_limit == space.mouse_limit and rebuilt.camera_step == pytest.approx(space.camera_step)
    keys = set(space.keyboard_bindings) | set(space.mouse_bindings)
    for key in sorted(keys):
        a, b = space.from_pressed({key}), rebuilt.from_pressed({key})
        assert np.array_equal(a.keyboard, b.keyboard)
        assert (a.mouse is None and b.mouse is None) or np.array_equal(a.mouse, b.mouse)
    assert np.array_equal(rebuilt.idle_action().keyboard, space.idle_action().keyboard)
    message = action_space_message(space)
    message.bindings[0].key_name = "fly"
    with pytest.raises(ValueError, match="'fly', which is not one of"):
        action_space_from_message(mode, message)


def test_block_action_holds_float32_copies():
    rows = [[1, 0, 0, 0], [0, 1, 0, 0]]
    action = BlockAction(rows, [[0.1, 0.0], [0.0, 0.1]])
    assert action.keyboard.dtype == np.float32 and action.mouse.dtype == np.float32 and action.n_rows == 2
    held = BlockAction(np.ones((1, 4)))
    assert held.rows(3).keyboard.shape == (3, 4) and held.rows(1) is held
    assert np.array_equal(action.last_row().keyboard, [[0, 1, 0, 0]])
    with pytest.raises(ValueError, match="rows"):
        action.rows(3)
    with pytest.raises(ValueError, match="mouse must be"):
        BlockAction(rows, [[0.0, 0.0]])


def test_named_and_vector_validation():
    uni = ACTION_SPACES["universal"]
    assert uni.from_names(["forward", "left"], [0.0, 0.1]).keyboard.tolist() == [[1, 0, 1, 0]]
    with pytest.raises(ValueError, match="unknown key name"):
        uni.from_names(["jump"])
    with pytest.raises(ValueError, match="4 keyboard keys"):
        uni.from_vectors([1, 0])
    with pytest.raises(ValueError, match=r"\|value\| <= 1.0"):
        uni.from_vectors([1, 0, 0, 0], [0.0, 1.5])
    with pytest.raises(ValueError, match="finite"):
        uni.from_vectors([1, 0, 0, 0], [math.nan, 0.0])
    with pytest.raises(ValueError, match="pitch, yaw"):
        uni.from_vectors([1, 0, 0, 0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="no mouse"):
        ACTION_SPACES["templerun"].from_vectors([1, 0, 0, 0, 0, 0, 0], [0.0, 0.0])
    with pytest.raises(ValueError, match="one-hot"):
        ACTION_SPACES["templerun"].from_vectors([0, 1, 1, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="unknown mode"):
        get_action_space("minecraft")
    with pytest.raises(ValueError, match="finite and in"):
        uni.validate(BlockAction([[2.0, 0, 0, 0]], np.zeros((1, 2))))
    with pytest.raises(ValueError, match="one-hot"):
        ACTION_SPACES["templerun"].validate(BlockAction(np.zeros((1, 7))))
    uni.validate(uni.idle_action())


def reference_patterns(mode):
    """Spec §3.6 action lists as named strings, decoded by substring matching like the reference."""
    cams = {"camera_l": [0, -0.1], "camera_r": [0, 0.1]}
    if mode == "universal":
        single, double = ["forward", "left", "right"], ["forward_left", "forward_right"]
        names = double * 5 + list(cams) * 5 + single * 5 + [f"{a}_{c}" for a in single + double for c in cams]
        base = single + list(cams)
    elif mode == "gta_drive":
        single = ["forward", "back"]
        names = list(cams) * 2 + single * 2 + [f"{a}_{c}" for a in single for c in cams]
        base = single + list(cams)
    else:
        names = base = ["jump", "slide", "leftside", "rightside", "turnleft", "turnright", "nomove"]
    space = ACTION_SPACES[mode]
    out = []
    for name in names:
        kb, mouse = [0.0] * space.keyboard_dim, [0.0, 0.0]
        for sub in base:
            if sub in name:
                if sub in cams:
                    mouse = cams[sub]
                else:
                    kb[space.key_names.index(sub)] = 1.0
        out.append((kb, mouse))
    return out


@pytest.mark.parametrize("mode,count", [("universal", 45), ("gta_drive", 12), ("templerun", 7)])
def test_benchmark_generator(mode, count):
    assert len(BENCHMARK_ACTIONS[mode]) == count
    space = ACTION_SPACES[mode]
    patterns = reference_patterns(mode)
    n = MG2.track_frames(4)  # 45 rows = 1 + 4 * (12 - 1)
    kb, mouse = benchmark_trajectory(space, n, seed=7)
    assert kb.shape == (n, space.keyboard_dim) and kb.dtype == np.float32
    assert (mouse is None) == (not space.has_mouse) and (mouse is None or mouse.shape == (n, 2))
    again = benchmark_trajectory(space, n, seed=7)
    assert np.array_equal(kb, again[0]) and (mouse is None or np.array_equal(mouse, again[1]))
    assert not np.array_equal(kb, benchmark_trajectory(space, n, seed=8)[0])

    # Replay the RNG draws: row 0 and each 12-row segment [1+12k, 13+12k) come from the drawn entry.
    rng = random.Random(7)
    starts = [0] + list(range(1, n, 12))
    for i, start in enumerate(starts):
        rng.randint(0, 0)
        expected_kb, expected_mouse = patterns[rng.randint(0, count - 1)]
        stop = 1 if i == 0 else min(start + 12, n)
        assert kb[start:stop].tolist() == [expected_kb] * (stop - start)
        if mouse is not None:
            expected = np.broadcast_to(np.array(expected_mouse, dtype=np.float32), (stop - start, 2))
            assert np.array_equal(mouse[start:stop], expected)
    short_kb, _ = benchmark_trajectory(space, 17, seed=7)  # last segment of 4 rows
    assert np.array_equal(short_kb[:13], kb[:13])
    with pytest.raises(ValueError, match="no reference benchmark"):
        benchmark_trajectory(ActionSpace(name="doom", key_names=("fire",), mouse_dim=0), 9, seed=0)


def test_trajectory_file_round_trip(tmp_path):
    uni = ACTION_SPACES["universal"]
    blocks = [uni.from_names(["forward"], [0.0, 0.1]), uni.idle_action(), uni.from_vectors([0.5, 0, 0, 1], [0.1, 0])]
    path = tmp_path / "held.json"
    save_trajectory(path, uni, MG2, blocks, description="test")
    doc = json.loads(path.read_text())
    assert doc["format"] == "worldstream.trajectory.v1" and doc["blocks"][0]["keys"] == ["forward"]
    assert "keyboard" in doc["blocks"][2]
    loaded = load_trajectory(path, uni, MG2)
    for a, b in zip(blocks, loaded):
        assert np.array_equal(a.keyboard, b.keyboard) and np.array_equal(a.mouse, b.mouse)

    # Pixel-rate trajectories round-trip exactly through "frames".
    temple = ACTION_SPACES["templerun"]
    kb, _ = benchmark_trajectory(temple, MG2.track_frames(3), seed=1)
    path = tmp_path / "frames.json"
    save_trajectory(path, temple, MG2, split_track(MG2, kb))
    assert "frames" in json.loads(path.read_text())
    track = ActionTrack.for_space(temple, MG2, 3)
    for b, action in enumerate(load_trajectory(path, temple, MG2)):
        track.write_block(b, action)
    assert torch.equal(track.keyboard, torch.from_numpy(kb)) and track.mouse is None

    demo = load_trajectory(REPO / "configs" / "trajectories" / "universal_demo.json", uni, MG2)
    assert len(demo) == 10 and all(a.n_rows == 1 for a in demo)


def test_planned_actions():
    uni = ACTION_SPACES["universal"]
    demo = load_trajectory(REPO / "configs" / "trajectories" / "universal_demo.json", uni, MG2)
    assert planned_actions(uni, MG2, 4, demo) == demo[:4]
    with pytest.raises(ValueError, match="holds 10 blocks, fewer than the 11"):
        planned_actions(uni, MG2, 11, demo)
    benchmark = planned_actions(uni, MG2, 3, benchmark_seed=5)
    kb, mouse = benchmark_trajectory(uni, 33, seed=5)
    assert [a.n_rows for a in benchmark] == [9, 12, 12]
    assert np.array_equal(np.concatenate([a.keyboard for a in benchmark]), kb)
    assert np.array_equal(np.concatenate([a.mouse for a in benchmark]), mouse)


@pytest.mark.parametrize("doc,message", [
    ({"format": "v0", "mode": "universal", "blocks": [{"keys": []}]}, "format"),
    ({"mode": "gta_drive", "blocks": [{"keys": []}]}, "mode 'gta_drive'"),
    ({"blocks": [{"keys": ["jump"]}]}, "unknown key name"),
    ({"blocks": [{"keys": [], "mouse": [float("nan"), 0]}]}, "finite"),
    ({"blocks": [{"keys": [], "mouse": [0, 2.0]}]}, "<= 1.0"),
    ({"blocks": [{"keyboard": [1, 0, 0]}]}, "block 0 keyboard"),
    ({"blocks": [{"keys": [], "keyboard": [0, 0, 0, 0]}]}, "exactly one of"),
    ({"blocks": [{"keys": [], "speed": 2}]}, "expected"),
    ({"blocks": []}, "non-empty"),
    ({"blocks": [{"keys": []}], "frames": {"keyboard": [[0, 0, 0, 0]]}}, "exactly one of"),
    ({"frames": {"keyboard": [[0, 0, 0, 0]] * 10}}, "12\\*B-3"),
    ({"blocks": [{"keys": []}], "extra": 1}, "unknown field"),
])
def test_trajectory_validation_errors(tmp_path, doc, message):
    full = {"format": "worldstream.trajectory.v1", "mode": "universal", **doc}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(full))
    with pytest.raises(ValueError, match=message):
        load_trajectory(path, ACTION_SPACES["universal"], MG2)


def test_trajectory_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{blocks")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trajectory(path, ACTION_SPACES["universal"], MG2)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_trajectory(path, ACTION_SPACES["universal"], MG2)
