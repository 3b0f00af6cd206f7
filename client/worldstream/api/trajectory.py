"""Trajectory files (`worldstream.trajectory.v1`) and the block actions a session plays.

    {"format": "worldstream.trajectory.v1", "mode": "universal", "description": "...optional...",
     "blocks": [{"keys": ["forward", "left"], "mouse": [0.0, 0.1]},      # held per block; keys by name
                {"keyboard": [1, 0, 0, 0], "mouse": [0, 0]}, ...]}      # or a raw keyboard vector
    or, instead of "blocks", pixel-rate rows over the block spans (`BlockLayout`; 12*B-3 rows for MG2):
     "frames": {"keyboard": [[...], ...], "mouse": [[...], ...]}

"mouse" is [pitch, yaw] (omitted = no camera motion; not allowed for modes without a mouse).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .benchmark import benchmark_trajectory
from .layout import BlockLayout
from .spaces import ActionSpace, BlockAction

TRAJECTORY_FORMAT = "worldstream.trajectory.v1"


def split_track(layout: BlockLayout, keyboard: np.ndarray, mouse: np.ndarray | None = None) -> list[BlockAction]:
    """Cut a full pixel-rate trajectory (whole blocks of rows) into per-block actions over the block spans;
    playing them in order reproduces the trajectory exactly."""
    blocks = layout.blocks_in_track(keyboard.shape[0], "keyboard track")
    if mouse is not None and mouse.shape[0] != keyboard.shape[0]:
        raise ValueError(f"mouse has {mouse.shape[0]} rows, keyboard {keyboard.shape[0]}")
    actions = []
    for b in range(blocks):
        start, stop = layout.span(b)
        actions.append(BlockAction(keyboard[start:stop], None if mouse is None else mouse[start:stop]))
    return actions


def read_trajectory(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON document of a trajectory file (checked against an action space by `parse_trajectory`)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


def load_trajectory(path: str | os.PathLike, space: ActionSpace, layout: BlockLayout) -> list[BlockAction]:
    """Per-block actions of a trajectory file, validated for `space` (ValueError says what and where)."""
    return parse_trajectory(read_trajectory(path), space, layout, str(path))


def parse_trajectory(doc: Mapping[str, Any], space: ActionSpace, layout: BlockLayout,
                     source: str = "trajectory") -> list[BlockAction]:
    if not isinstance(doc, Mapping):
        raise ValueError(f"{source}: expected a JSON object")
    if doc.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"{source}: \"format\" must be {TRAJECTORY_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("mode") != space.name:
        raise ValueError(f"{source}: written for mode {doc.get('mode')!r}, the model runs {space.name!r}")
    unknown = set(doc) - {"format", "mode", "description", "blocks", "frames"}
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}")
    if ("blocks" in doc) == ("frames" in doc):
        raise ValueError(f"{source}: give exactly one of \"blocks\" (per-block actions) or \"frames\" (pixel rows)")

    if "frames" in doc:
        frames = doc["frames"]
        if not isinstance(frames, dict) or set(frames) - {"keyboard", "mouse"} or "keyboard" not in frames:
            raise ValueError(f"{source}: \"frames\" must be {{\"keyboard\": [[...]], \"mouse\": [[...]]}}")
        action = space.from_vectors(frames["keyboard"], frames.get("mouse"), f"{source} frames")
        layout.blocks_in_track(action.n_rows, f"{source} frames")
        return split_track(layout, action.keyboard, action.mouse)

    blocks = doc["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise ValueError(f"{source}: \"blocks\" must be a non-empty list")
    actions = []
    for i, block in enumerate(blocks):
        where = f"{source} block {i}"
        if not isinstance(block, dict) or set(block) - {"keys", "keyboard", "mouse"}:
            raise ValueError(f"{where}: expected {{\"keys\": [...] or \"keyboard\": [...], \"mouse\": [p, y]}}, "
                             f"got {block!r}")
        if ("keys" in block) == ("keyboard" in block):
            raise ValueError(f"{where}: give exactly one of \"keys\" (names) or \"keyboard\" (raw vector)")
        if "keys" in block:
            keys = block["keys"]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise ValueError(f"{where}: \"keys\" must be a list of key names {list(space.key_names)}")
            try:
                keyboard = space.keyboard_vector(keys)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        else:
            keyboard = block["keyboard"]
            if not isinstance(keyboard, list) or (keyboard and isinstance(keyboard[0], list)):
                raise ValueError(f"{where}: \"keyboard\" is one held row of {space.keyboard_dim} values")
        actions.append(space.from_vectors(keyboard, block.get("mouse"), where))
    return actions


def save_trajectory(path: str | os.PathLike, space: ActionSpace, layout: BlockLayout, blocks: Sequence[BlockAction],
                    description: str = "") -> None:
    """Write per-block actions: held actions as "blocks" (binary keyboards by name), anything with per-frame
    rows as pixel-rate "frames"."""
    if not blocks:
        raise ValueError("no blocks to save")
    for action in blocks:
        space.validate(action)  # write only what load_trajectory accepts
    doc: dict[str, Any] = {"format": TRAJECTORY_FORMAT, "mode": space.name}
    if description:
        doc["description"] = description
    if all(a.n_rows == 1 for a in blocks):
        doc["blocks"] = [_held_entry(space, a) for a in blocks]
    else:
        rows = [a.rows(layout.frames(b)) for b, a in enumerate(blocks)]
        doc["frames"] = {"keyboard": np.concatenate([r.keyboard for r in rows]).tolist()}
        if space.has_mouse:
            doc["frames"]["mouse"] = np.concatenate([r.mouse for r in rows]).tolist()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _held_entry(space: ActionSpace, action: BlockAction) -> dict[str, Any]:
    keyboard = action.keyboard[0].tolist()
    entry: dict[str, Any]
    if all(v in (0.0, 1.0) for v in keyboard):
        entry = {"keys": [name for name, v in zip(space.key_names, keyboard) if v == 1.0]}
    else:
        entry = {"keyboard": keyboard}
    if action.mouse is not None:
        entry["mouse"] = action.mouse[0].tolist()
    return entry


def planned_actions(space: ActionSpace, layout: BlockLayout, blocks: int,
                    trajectory: Sequence[BlockAction] | None = None, benchmark_seed: int = 0) -> list[BlockAction]:
    """The first `blocks` actions of a trajectory (`load_trajectory`, `parse_trajectory`), or of the mode's
    reference benchmark trajectory."""
    if trajectory is not None:
        if len(trajectory) < blocks:
            raise ValueError(f"the trajectory holds {len(trajectory)} blocks, fewer than the {blocks} asked for")
        return list(trajectory[:blocks])
    keyboard, mouse = benchmark_trajectory(space, layout.track_frames(blocks), benchmark_seed)
    return split_track(layout, keyboard, mouse)
