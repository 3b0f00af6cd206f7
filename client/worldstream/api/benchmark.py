"""The reference benchmark trajectories of the three MG2 modes (spec §3.6, the reference's `utils/conditions.py`)."""
from __future__ import annotations

import random

import numpy as np

from .spaces import CAMERA_STEP, ActionSpace

# Each entry: (pressed key names, camera name or None). The list order matters: the RNG picks by index.
_CAMERAS = {"camera_l": (0.0, -CAMERA_STEP), "camera_r": (0.0, CAMERA_STEP)}
_UNIVERSAL_SINGLE = [("forward",), ("left",), ("right",)]
_UNIVERSAL_DOUBLE = [("forward", "left"), ("forward", "right")]
_GTA_SINGLE = [("forward",), ("back",)]
BENCHMARK_ACTIONS: dict[str, list[tuple[tuple[str, ...], str | None]]] = {
    "universal": [(keys, None) for keys in _UNIVERSAL_DOUBLE] * 5
    + [((), cam) for cam in _CAMERAS] * 5
    + [(keys, None) for keys in _UNIVERSAL_SINGLE] * 5
    + [(keys, cam) for keys in _UNIVERSAL_SINGLE + _UNIVERSAL_DOUBLE for cam in _CAMERAS],
    "gta_drive": [((), cam) for cam in _CAMERAS] * 2
    + [(keys, None) for keys in _GTA_SINGLE] * 2
    + [(keys, cam) for keys in _GTA_SINGLE for cam in _CAMERAS],
    # The reference's list order, which differs from the keyboard index order.
    "templerun": [((name,), None) for name in
                  ("jump", "slide", "leftside", "rightside", "turnleft", "turnright", "nomove")],
}
_SEGMENT_LENGTHS = [12]  # pixel frames per random segment (the last one may be shorter)


def benchmark_trajectory(space: ActionSpace, num_pixel_frames: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The reference benchmark action track (`combine_data`) of the mode `space.name`: row 0 from a random
    action, then 12-row segments of random actions (the last one shorter). Uses `random.Random(seed)` with the
    reference's draw order (two `randint` per segment), so it equals the reference run after `set_seed(seed)`.
    Returns keyboard [N, K] and mouse [N, 2] (None without a mouse), float32, N = num_pixel_frames."""
    if space.name not in BENCHMARK_ACTIONS:
        raise ValueError(f"mode {space.name!r} has no reference benchmark trajectory (modes with one: "
                         f"{sorted(BENCHMARK_ACTIONS)}); play a trajectory file instead")
    if num_pixel_frames < 1:
        raise ValueError(f"num_pixel_frames must be >= 1, got {num_pixel_frames}")
    entries = BENCHMARK_ACTIONS[space.name]
    keyboard = np.zeros((num_pixel_frames, space.keyboard_dim), dtype=np.float32)
    mouse = np.zeros((num_pixel_frames, 2), dtype=np.float32) if space.has_mouse else None
    rng = random.Random(seed)
    frame = 0
    while frame < num_pixel_frames:
        segment = _SEGMENT_LENGTHS[rng.randint(0, len(_SEGMENT_LENGTHS) - 1)]
        keys, camera = entries[rng.randint(0, len(entries) - 1)]
        length = 1 if frame == 0 else min(segment, num_pixel_frames - frame)
        keyboard[frame:frame + length] = space.keyboard_vector(keys)
        if mouse is not None and camera is not None:
            mouse[frame:frame + length] = _CAMERAS[camera]
        frame += length
    return keyboard, mouse
