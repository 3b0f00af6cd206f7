import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import GOLDEN_DIR

from worldstream.api.actions import (ACTION_SPACES, BENCHMARK_ACTIONS, BlockAction, ActionTrack, benchmark_trajectory,
                                 block_span, get_action_space, load_trajectory, save_trajectory, split_track,
                                 track_rows)

REPO = Path(__file__).resolve().parents[1]


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
    assert [track_rows(b) for b in (1, 2, 3, 50)] == [9, 21, 33, 597]
    assert block_span(0) == (0, 9) and block_span(1) == (9, 21) and block_span(4) == (45, 57)
    for b in range(1, 6):
        assert block_span(b) == (12 * b - 3, 12 * b + 9)


@pytest.mark.parametrize("blocks", [1, 2, 5])
def test_window_rows_match_naive_reference(blocks):
    n = track_rows(blocks)
    keyboard = torch.rand(n, 4)
    mouse = torch.rand(n, 2) - 0.5
    track = ActionTrack.from_full(keyboard, mouse)
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
    track = ActionTrack.for_space(space, max_blocks=4)
    for b in range(4):
        keys = space.key_names[b]
        track.write_block(b, space.from_names([keys], [0.01 * b, -0.01 * b]))
    for b in range(4):
        start, stop = block_span(b)
        expected = torch.zeros(4)
        expected[b] = 1
        assert torch.equal(track.keyboard[start:stop], expected.expand(stop - start, 4))
        assert torch.allclose(track.mouse[start:stop], torch.tensor([0.01 * b, -0.01 * b]).expand(stop - start, 2))
    assert track.keyboard.shape[0] == track_rows(4)
    # A block's window: the latency of spec §3.4 (latent 3b sees 9 old + 3 new rows).
    kb, _ = track.window_rows(2)
    assert kb[:9, 1].sum() == 9 and kb[9:, 2].sum() == 11 and kb[:9, 2].sum() == 0

    # Per-frame rows must match the span; rewriting is allowed, skipping ahead is not.
    rows = torch.eye(4)[torch.arange(12) % 4]
    track.write_block(1, BlockAction(rows, torch.zeros(12, 2)))
    assert torch.equal(track.keyboard[9:21], rows)
    with pytest.raises(ValueError, match="spans 9"):
        track.write_block(0, BlockAction(rows, torch.zeros(12, 2)))
    fresh = ActionTrack.for_space(space, max_blocks=4)
    with pytest.raises(ValueError, match="next block is 0"):
        fresh.write_block(1, space.idle_action())
    with pytest.raises(ValueError, match="no action yet"):
        fresh.window_rows(0)
    with pytest.raises(ValueError, match="mouse"):
        fresh.write_block(0, BlockAction(torch.zeros(1, 4)))


def test_split_write_reproduces_full_track_and_prefix():
    keyboard, mouse = benchmark_trajectory("gta_drive", track_rows(5), seed=3)
    actions = split_track(keyboard, mouse)
    assert [a.n_rows for a in actions] == [9, 12, 12, 12, 12]
    track = ActionTrack.for_space(ACTION_SPACES["gta_drive"], max_blocks=5)
    for b, action in enumerate(actions):
        track.write_block(b, action)
    full = ActionTrack.from_full(keyboard, mouse)
    assert torch.equal(track.keyboard, keyboard) and torch.equal(track.mouse, mouse)
    for b in range(5):
        assert torch.equal(track.window_rows(b)[0], full.window_rows(b)[0])
        kb, ms = full.prefix(b)
        assert kb.shape[0] == 1 + 4 * (3 * b + 2) and torch.equal(ms, mouse[:kb.shape[0]])
    with pytest.raises(ValueError, match="12\\*B-3"):
        ActionTrack.from_full(torch.zeros(13, 2))


@pytest.mark.skipif(not GOLDEN_DIR.is_dir(), reason="shared goldens not available")
@pytest.mark.parametrize("name", ["mg2_dit_blocks", "mg2_gta_drive", "mg2_templerun"])
def test_prefix_matches_golden_cond_current(name):
    from safetensors.torch import load_file
    t = load_file(str(GOLDEN_DIR / f"{name}.safetensors"))
    mouse = t.get("input.mouse_cond")
    track = ActionTrack.from_full(t["input.keyboard_cond"][0], None if mouse is None else mouse[0])
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
    assert a.keyboard.tolist() == [[1, 0, 0, 0]] and torch.allclose(a.mouse, torch.tensor([[0.0, -0.1]]))
    a = uni.from_pressed({"I", "L", "Q"})
    assert a.keyboard.sum() == 0 and torch.allclose(a.mouse, torch.tensor([[0.1, 0.1]]))
    gta = ACTION_SPACES["gta_drive"]
    a = gta.from_pressed({"S", "D"})
    assert a.keyboard.tolist() == [[0, 1]] and torch.allclose(a.mouse, torch.tensor([[0.0, 0.1]]))
    a = gta.from_pressed({"Q"})
    assert a.keyboard.sum() == 0 and a.mouse.abs().sum() == 0
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
        uni.validate(BlockAction(torch.tensor([[2.0, 0, 0, 0]]), torch.zeros(1, 2)))
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
    n = track_rows(4)  # 45 rows = 1 + 4 * (12 - 1)
    kb, mouse = benchmark_trajectory(mode, n, seed=7)
    assert kb.shape == (n, space.keyboard_dim) and kb.dtype == torch.float32
    assert (mouse is None) == (not space.has_mouse) and (mouse is None or mouse.shape == (n, 2))
    again = benchmark_trajectory(mode, n, seed=7)
    assert torch.equal(kb, again[0]) and (mouse is None or torch.equal(mouse, again[1]))
    assert not torch.equal(kb, benchmark_trajectory(mode, n, seed=8)[0])

    # Replay the RNG draws: row 0 and each 12-row segment [1+12k, 13+12k) come from the drawn entry.
    rng = random.Random(7)
    starts = [0] + list(range(1, n, 12))
    for i, start in enumerate(starts):
        rng.randint(0, 0)
        expected_kb, expected_mouse = patterns[rng.randint(0, count - 1)]
        stop = 1 if i == 0 else min(start + 12, n)
        assert kb[start:stop].tolist() == [expected_kb] * (stop - start)
        if mouse is not None:
            expected = torch.tensor(expected_mouse, dtype=torch.float32).expand(stop - start, 2)
            assert torch.equal(mouse[start:stop], expected)
    short_kb, _ = benchmark_trajectory(mode, 17, seed=7)  # last segment of 4 rows
    assert torch.equal(short_kb[:13], kb[:13])
    with pytest.raises(ValueError, match="1 \\+ 4"):
        benchmark_trajectory(mode, 12, seed=0)


def test_trajectory_file_round_trip(tmp_path):
    uni = ACTION_SPACES["universal"]
    blocks = [uni.from_names(["forward"], [0.0, 0.1]), uni.idle_action(), uni.from_vectors([0.5, 0, 0, 1], [0.1, 0])]
    path = tmp_path / "held.json"
    save_trajectory(path, "universal", blocks, description="test")
    doc = json.loads(path.read_text())
    assert doc["format"] == "worldstream.trajectory.v1" and doc["blocks"][0]["keys"] == ["forward"]
    assert "keyboard" in doc["blocks"][2]
    loaded = load_trajectory(path, "universal")
    for a, b in zip(blocks, loaded):
        assert torch.equal(a.keyboard, b.keyboard) and torch.equal(a.mouse, b.mouse)

    # Pixel-rate trajectories round-trip exactly through "frames".
    kb, _ = benchmark_trajectory("templerun", track_rows(3), seed=1)
    path = tmp_path / "frames.json"
    save_trajectory(path, "templerun", split_track(kb))
    assert "frames" in json.loads(path.read_text())
    track = ActionTrack.for_space(ACTION_SPACES["templerun"], 3)
    for b, action in enumerate(load_trajectory(path, "templerun")):
        track.write_block(b, action)
    assert torch.equal(track.keyboard, kb) and track.mouse is None

    demo = load_trajectory(REPO / "configs" / "trajectories" / "universal_demo.json", "universal")
    assert len(demo) == 10 and all(a.n_rows == 1 for a in demo)


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
        load_trajectory(path, "universal")


def test_trajectory_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{blocks")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_trajectory(path, "universal")
