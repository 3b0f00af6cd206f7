"""Matrix-Game-2 actions: per-mode action spaces, block actions, the pixel-rate action track, the reference
benchmark trajectories and trajectory files.

Frame arithmetic (spec §2.7, §3.4, §3.5). Actions live at pixel rate: one row per output frame. A block is 3
latent frames; latent frame f covers pixel frame 0 (f = 0) or pixel frames [4f-3, 4f+1), so block 0 spans rows
[0, 9) and block b >= 1 spans rows [12b-3, 12b+9). A session of B blocks has 12B-3 = 1 + 4(3B-1) rows.
Latent frame f is conditioned on the 12 rows [4f-12, 4f-1] (rows < 0 read row 0), so block b reads the 20 rows
[12b-12, 12b+7]: the tail of the previous block's action and most of its own (the model's built-in latency).
"""
from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch

CAMERA_STEP = 0.1  # CAM_VALUE: the mouse delta of one camera key press (reference key maps and benchmark)
FRAMES_PER_BLOCK = 3  # latent frames per block
TEMPORAL_STRIDE = 4  # pixel frames per latent frame (VAE temporal compression)
WINDOW_ROWS = 12  # action rows one latent frame reads (windows_size 3 x stride 4)
ROWS_PER_BLOCK = FRAMES_PER_BLOCK * TEMPORAL_STRIDE  # 12 pixel frames per block after block 0
BLOCK_WINDOW_ROWS = TEMPORAL_STRIDE * (FRAMES_PER_BLOCK - 1) + WINDOW_ROWS  # 20 rows read per block
TRAJECTORY_FORMAT = "worldstream.trajectory.v1"


def track_rows(num_blocks: int) -> int:
    """Pixel-rate rows of a session of `num_blocks` blocks: 1 + 4 * (3 * num_blocks - 1)."""
    return ROWS_PER_BLOCK * num_blocks - (TEMPORAL_STRIDE - 1)


def block_span(b: int) -> tuple[int, int]:
    """[start, stop) of block b's own pixel rows: [0, 9) for block 0, [12b-3, 12b+9) after."""
    stop = track_rows(b + 1)
    return (0 if b == 0 else stop - ROWS_PER_BLOCK), stop


def block_pixel_frames(b: int) -> int:
    start, stop = block_span(b)
    return stop - start


def _blocks_in_rows(n_rows: int, what: str) -> int:
    """Number of blocks of a full pixel-rate track of n_rows rows (which must be 12B-3)."""
    if n_rows < track_rows(1) or (n_rows + TEMPORAL_STRIDE - 1) % ROWS_PER_BLOCK:
        raise ValueError(f"{what} has {n_rows} rows; a track of B blocks has 12*B-3 rows (9, 21, 33, ...)")
    return (n_rows + TEMPORAL_STRIDE - 1) // ROWS_PER_BLOCK


@dataclass(frozen=True)
class BlockAction:
    """The action of one block: `n_rows` pixel-rate rows over the block's span (9 for block 0, 12 after), or a
    single row (n_rows == 1) held over the whole span. `mouse` is None for modes without a mouse."""

    keyboard: torch.Tensor  # [n_rows, K] float32
    mouse: torch.Tensor | None = None  # [n_rows, 2] float32

    def __post_init__(self):
        if self.keyboard.dim() != 2 or self.keyboard.shape[0] < 1:
            raise ValueError(f"keyboard must be [n_rows, K] with n_rows >= 1, got {list(self.keyboard.shape)}")
        object.__setattr__(self, "keyboard", self.keyboard.to(torch.float32))
        if self.mouse is not None:
            if self.mouse.dim() != 2 or self.mouse.shape != (self.keyboard.shape[0], 2):
                raise ValueError(f"mouse must be [{self.keyboard.shape[0]}, 2] to match the keyboard rows, "
                                 f"got {list(self.mouse.shape)}")
            object.__setattr__(self, "mouse", self.mouse.to(torch.float32))

    @property
    def n_rows(self) -> int:
        return self.keyboard.shape[0]

    def rows(self, n: int) -> BlockAction:
        """This action as exactly n rows (a held action is expanded; no copy)."""
        if self.n_rows == n:
            return self
        if self.n_rows != 1:
            raise ValueError(f"block action has {self.n_rows} rows; the block spans {n} pixel frames "
                             "(give 1 row to hold it, or one row per pixel frame)")
        return BlockAction(self.keyboard.expand(n, -1), None if self.mouse is None else self.mouse.expand(n, -1))

    def to(self, device: torch.device | str) -> BlockAction:
        return BlockAction(self.keyboard.to(device), None if self.mouse is None else self.mouse.to(device))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True, eq=False)
class ActionSpace:
    """Action layout of one MG2 mode plus its interactive key map (spec §3.7).

    `keyboard_bindings` maps a pressed key (upper-case character) to the keyboard index it sets, or None for
    the "release" key; `mouse_bindings` maps a key to the (pitch, yaw) delta it adds. Mouse index 0 is pitch
    (positive = up), index 1 is yaw (positive = right). Values outside +-`mouse_limit` are rejected.
    """

    name: str
    key_names: tuple[str, ...]
    mouse_dim: int  # 2 (pitch, yaw) or 0
    keyboard_bindings: Mapping[str, int | None] = field(default_factory=dict)
    mouse_bindings: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    one_hot: bool = False  # exactly one key per row (templerun: "nomove" is a class, not all-zero)
    idle_key: str | None = None  # the key name meaning "do nothing" for one-hot spaces
    camera_step: float = CAMERA_STEP
    mouse_limit: float = 1.0

    @property
    def keyboard_dim(self) -> int:
        return len(self.key_names)

    @property
    def has_mouse(self) -> bool:
        return self.mouse_dim > 0

    # ---- building block actions -------------------------------------------------------------------------

    def idle_action(self) -> BlockAction:
        """No movement and no camera motion (templerun: the `nomove` class)."""
        return self.from_names([self.idle_key] if self.idle_key else [])

    def from_pressed(self, keys: Iterable[str]) -> BlockAction:
        """Held block action from the set of pressed keys (characters, any case), e.g. {"w", "j"}."""
        pressed = sorted({k.upper() for k in keys})
        unknown = [k for k in pressed if k not in self.keyboard_bindings and k not in self.mouse_bindings]
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} for mode {self.name!r}; valid keys: {self.key_help()}")
        indices = [self.keyboard_bindings[k] for k in pressed if k in self.keyboard_bindings]
        names = [self.key_names[i] for i in indices if i is not None]
        if self.one_hot and len(indices) > 1:
            raise ValueError(f"mode {self.name!r} takes one key per block, got {pressed}")
        pitch = sum(self.mouse_bindings[k][0] for k in pressed if k in self.mouse_bindings)
        yaw = sum(self.mouse_bindings[k][1] for k in pressed if k in self.mouse_bindings)
        return self.from_names(names, [pitch, yaw] if self.has_mouse else None)

    def from_names(self, keys: Iterable[str], mouse: Sequence[float] | None = None) -> BlockAction:
        """Held block action from key names (e.g. ["forward", "left"]) and a [pitch, yaw] mouse delta."""
        return self.from_vectors(self.keyboard_vector(keys), mouse)

    def keyboard_vector(self, keys: Iterable[str]) -> list[float]:
        """Multi-hot keyboard row of the given key names (one-hot spaces: exactly one name, none = idle)."""
        names = list(keys)
        unknown = [k for k in names if k not in self.key_names]
        if unknown:
            raise ValueError(f"unknown key name(s) {unknown} for mode {self.name!r}; valid: {list(self.key_names)}")
        if self.one_hot:
            if not names and self.idle_key:
                names = [self.idle_key]
            if len(set(names)) != 1:
                raise ValueError(f"mode {self.name!r} takes exactly one key name per block, got {names}")
        row = [0.0] * self.keyboard_dim
        for k in names:
            row[self.key_names.index(k)] = 1.0
        return row

    def from_vectors(self, keyboard: Sequence[float] | Sequence[Sequence[float]],
                     mouse: Sequence[float] | Sequence[Sequence[float]] | None = None,
                     where: str = "action") -> BlockAction:
        """Block action from raw Python numbers: one row ([K], [2]: held) or one row per pixel frame ([n, K],
        [n, 2]). A missing mouse means no camera motion. Validated before any tensor is built."""
        kb_rows = self._as_rows(keyboard, f"{where} keyboard")
        if mouse is None:
            mouse_rows = [[0.0, 0.0]] * len(kb_rows) if self.has_mouse else None
        elif not self.has_mouse:
            raise ValueError(f"{where}: mode {self.name!r} has no mouse input; drop the mouse values")
        else:
            mouse_rows = self._as_rows(mouse, f"{where} mouse")
            if len(mouse_rows) != len(kb_rows):
                raise ValueError(f"{where}: {len(kb_rows)} keyboard rows but {len(mouse_rows)} mouse rows")
        for i, row in enumerate(kb_rows):
            self._check_keyboard_row(row, f"{where} keyboard row {i}")
        for i, row in enumerate(mouse_rows or []):
            self._check_mouse_row(row, f"{where} mouse row {i}")
        return BlockAction(torch.tensor(kb_rows, dtype=torch.float32),
                           None if mouse_rows is None else torch.tensor(mouse_rows, dtype=torch.float32))

    # ---- validation -------------------------------------------------------------------------------------

    def check_shapes(self, action: BlockAction) -> None:
        """Layout check only (Python ints, no device sync)."""
        if action.keyboard.shape[1] != self.keyboard_dim:
            raise ValueError(f"mode {self.name!r} has {self.keyboard_dim} keyboard keys {list(self.key_names)}, "
                             f"got keyboard rows of size {action.keyboard.shape[1]}")
        if self.has_mouse and action.mouse is None:
            raise ValueError(f"mode {self.name!r} needs a mouse [pitch, yaw] per row")
        if not self.has_mouse and action.mouse is not None:
            raise ValueError(f"mode {self.name!r} has no mouse input; drop the mouse values")

    def validate(self, action: BlockAction) -> None:
        """Layout and value check of a tensor action. Reads values back (a sync): use at ingress, not per step."""
        self.check_shapes(action)
        kb = action.keyboard.detach().cpu()
        if not bool(torch.isfinite(kb).all()) or bool(((kb < 0) | (kb > 1)).any()):
            raise ValueError(f"keyboard values must be finite and in [0, 1] (1 = pressed) for mode {self.name!r}")
        if self.one_hot and not bool((((kb == 0) | (kb == 1)).all(dim=1) & (kb.sum(dim=1) == 1)).all()):
            raise ValueError(f"mode {self.name!r} needs one-hot keyboard rows (use {self.idle_key!r} for no action)")
        if action.mouse is not None:
            mouse = action.mouse.detach().cpu()
            if not bool(torch.isfinite(mouse).all()) or bool((mouse.abs() > self.mouse_limit).any()):
                raise ValueError(f"mouse values must be finite with |value| <= {self.mouse_limit} "
                                 f"(one camera step is {self.camera_step})")

    def _as_rows(self, values: Any, what: str) -> list[list[float]]:
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{what} must be a non-empty list of numbers or of rows, got {values!r}")
        rows = values if isinstance(values[0], (list, tuple)) else [values]
        for row in rows:
            if not isinstance(row, (list, tuple)) or not all(_is_number(v) for v in row):
                raise ValueError(f"{what} must contain only numbers (or rows of numbers), got {row!r}")
        return [[float(v) for v in row] for row in rows]

    def _check_keyboard_row(self, row: list[float], what: str) -> None:
        if len(row) != self.keyboard_dim:
            raise ValueError(f"{what}: mode {self.name!r} has {self.keyboard_dim} keyboard keys "
                             f"{list(self.key_names)}, got {len(row)} values")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in row):
            raise ValueError(f"{what}: keyboard values must be finite and in [0, 1] (1 = pressed), got {row}")
        if self.one_hot and (sorted(row) != [0.0] * (self.keyboard_dim - 1) + [1.0]):
            raise ValueError(f"{what}: mode {self.name!r} needs a one-hot row (use {self.idle_key!r} for no "
                             f"action), got {row}")

    def _check_mouse_row(self, row: list[float], what: str) -> None:
        if len(row) != 2:
            raise ValueError(f"{what}: mouse is [pitch, yaw], got {len(row)} values")
        if not all(math.isfinite(v) and abs(v) <= self.mouse_limit for v in row):
            raise ValueError(f"{what}: mouse values must be finite with |value| <= {self.mouse_limit} "
                             f"(one camera step is {self.camera_step}), got {row}")

    def key_help(self) -> str:
        """One line describing the interactive keys of this mode."""
        parts = [f"{k}={self.key_names[i] if i is not None else 'none'}" for k, i in self.keyboard_bindings.items()]
        parts += [f"{k}=camera[{p:+g},{y:+g}]" for k, (p, y) in self.mouse_bindings.items()]
        return ", ".join(parts)


ACTION_SPACES: dict[str, ActionSpace] = {
    "universal": ActionSpace(
        name="universal", key_names=("forward", "back", "left", "right"), mouse_dim=2,
        keyboard_bindings={"W": 0, "S": 1, "A": 2, "D": 3, "Q": None},
        mouse_bindings={"I": (CAMERA_STEP, 0.0), "K": (-CAMERA_STEP, 0.0), "J": (0.0, -CAMERA_STEP),
                        "L": (0.0, CAMERA_STEP), "U": (0.0, 0.0)}),
    # Steering is the mouse-yaw channel: A/D turn, Q releases both channels.
    "gta_drive": ActionSpace(
        name="gta_drive", key_names=("forward", "back"), mouse_dim=2,
        keyboard_bindings={"W": 0, "S": 1, "Q": None},
        mouse_bindings={"A": (0.0, -CAMERA_STEP), "D": (0.0, CAMERA_STEP), "Q": (0.0, 0.0)}),
    "templerun": ActionSpace(
        name="templerun",
        key_names=("nomove", "jump", "slide", "turnleft", "turnright", "leftside", "rightside"), mouse_dim=0,
        keyboard_bindings={"Q": 0, "W": 1, "S": 2, "Z": 3, "C": 4, "A": 5, "D": 6},
        one_hot=True, idle_key="nomove"),
}


def get_action_space(mode: str) -> ActionSpace:
    try:
        return ACTION_SPACES[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(ACTION_SPACES)}") from None


# ---- the pixel-rate action track of a session ------------------------------------------------------------

class ActionTrack:
    """A session's pixel-rate action rows, preallocated for `max_blocks` blocks (spec §3.4 `replace` semantics):
    each block's action overwrites the block's own span; the model reads `window_rows(b)`. Only Python ints and
    slicing are used, so the track may live on the model's device without host syncs."""

    def __init__(self, keyboard_dim: int, mouse_dim: int, max_blocks: int, device: torch.device | str | None = None):
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        if mouse_dim not in (0, 2):
            raise ValueError(f"mouse_dim must be 0 or 2, got {mouse_dim}")
        rows = track_rows(max_blocks)
        self.max_blocks = max_blocks
        self.keyboard = torch.zeros(rows, keyboard_dim, dtype=torch.float32, device=device)
        self.mouse = torch.zeros(rows, 2, dtype=torch.float32, device=device) if mouse_dim else None
        self.blocks_written = 0  # blocks [0, blocks_written) hold actions

    @classmethod
    def for_space(cls, space: ActionSpace, max_blocks: int, device: torch.device | str | None = None) -> ActionTrack:
        return cls(space.keyboard_dim, space.mouse_dim, max_blocks, device)

    @classmethod
    def from_full(cls, keyboard: torch.Tensor, mouse: torch.Tensor | None = None) -> ActionTrack:
        """Track holding a whole pixel-rate trajectory (keyboard [N, K], mouse [N, 2]; N = 12B-3)."""
        if keyboard.dim() != 2:
            raise ValueError(f"keyboard must be [N, K], got {list(keyboard.shape)}")
        blocks = _blocks_in_rows(keyboard.shape[0], "keyboard track")
        if mouse is not None and mouse.shape != (keyboard.shape[0], 2):
            raise ValueError(f"mouse must be [{keyboard.shape[0]}, 2], got {list(mouse.shape)}")
        track = cls(keyboard.shape[1], 0 if mouse is None else 2, blocks, keyboard.device)
        track.keyboard.copy_(keyboard)
        if mouse is not None:
            track.mouse.copy_(mouse)
        track.blocks_written = blocks
        return track

    def write_block(self, b: int, action: BlockAction) -> None:
        """Write block b's action over its span (block 0: 9 rows, later: 12). Blocks are written in order;
        rewriting an already written block is allowed."""
        if not 0 <= b <= min(self.blocks_written, self.max_blocks - 1):
            raise ValueError(f"cannot write block {b}: the next block is {self.blocks_written} and the track "
                             f"holds {self.max_blocks} blocks")
        if action.keyboard.shape[1] != self.keyboard.shape[1]:
            raise ValueError(f"action has {action.keyboard.shape[1]} keyboard keys, track has {self.keyboard.shape[1]}")
        if (action.mouse is None) != (self.mouse is None):
            raise ValueError("action and track disagree on having a mouse channel")
        start, stop = block_span(b)
        rows = action.rows(stop - start)
        self.keyboard[start:stop].copy_(rows.keyboard)
        if self.mouse is not None:
            self.mouse[start:stop].copy_(rows.mouse)
        self.blocks_written = max(self.blocks_written, b + 1)

    def window_rows(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The 20 rows block b's action module reads: raw rows [12b-12, 12b+7], rows < 0 reading row 0
        (keyboard [20, K], mouse [20, 2] or None). May be views of the track, valid until the next write."""
        self._check_written(b)
        start = ROWS_PER_BLOCK * b - WINDOW_ROWS
        stop = start + BLOCK_WINDOW_ROWS
        return _window(self.keyboard, start, stop), None if self.mouse is None else _window(self.mouse, start, stop)

    def prefix(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows [0, 1 + 4(3b+2)): the action prefix the reference passes to the model for block b."""
        self._check_written(b)
        stop = block_span(b)[1]
        return self.keyboard[:stop], None if self.mouse is None else self.mouse[:stop]

    def _check_written(self, b: int) -> None:
        if not 0 <= b < self.blocks_written:
            raise ValueError(f"block {b} has no action yet (blocks written: {self.blocks_written})")


def _window(track: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if start >= 0:
        return track[start:stop]
    # The reference front-pads the track with copies of row 0.
    return torch.cat([track[:1].expand(-start, -1), track[:stop]])


def split_track(keyboard: torch.Tensor, mouse: torch.Tensor | None = None) -> list[BlockAction]:
    """Cut a full pixel-rate trajectory (N = 12B-3 rows) into per-block actions over the block spans; writing
    them into an ActionTrack in order reproduces the trajectory exactly."""
    blocks = _blocks_in_rows(keyboard.shape[0], "keyboard track")
    if mouse is not None and mouse.shape[0] != keyboard.shape[0]:
        raise ValueError(f"mouse has {mouse.shape[0]} rows, keyboard {keyboard.shape[0]}")
    actions = []
    for b in range(blocks):
        start, stop = block_span(b)
        actions.append(BlockAction(keyboard[start:stop], None if mouse is None else mouse[start:stop]))
    return actions


# ---- reference benchmark trajectories (spec §3.6, `utils/conditions.py`) ----------------------------------

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


def benchmark_trajectory(mode: str, num_pixel_frames: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference benchmark action track (`combine_data`): row 0 from a random action, then 12-row segments
    of random actions (the last one shorter). N = num_pixel_frames = 1 + 4(T-1). Uses `random.Random(seed)`
    with the reference's draw order (two `randint` per segment), so it equals the reference run after
    `set_seed(seed)`. Returns keyboard [N, K] and mouse [N, 2] (None for templerun), float32 on CPU."""
    space = get_action_space(mode)
    if num_pixel_frames < 1 or num_pixel_frames % TEMPORAL_STRIDE != 1:
        raise ValueError(f"num_pixel_frames must be 1 + 4*(T-1) (1, 5, 9, ...), got {num_pixel_frames}")
    entries = BENCHMARK_ACTIONS[mode]
    keyboard = torch.zeros(num_pixel_frames, space.keyboard_dim)
    mouse = torch.zeros(num_pixel_frames, 2) if space.has_mouse else None
    rng = random.Random(seed)
    frame = 0
    while frame < num_pixel_frames:
        segment = _SEGMENT_LENGTHS[rng.randint(0, len(_SEGMENT_LENGTHS) - 1)]
        keys, camera = entries[rng.randint(0, len(entries) - 1)]
        length = 1 if frame == 0 else min(segment, num_pixel_frames - frame)
        keyboard[frame:frame + length] = torch.tensor(space.keyboard_vector(keys))
        if mouse is not None and camera is not None:
            mouse[frame:frame + length] = torch.tensor(_CAMERAS[camera])
        frame += length
    return keyboard, mouse


# ---- trajectory files -------------------------------------------------------------------------------------
#
# {"format": "worldstream.trajectory.v1", "mode": "universal", "description": "...optional...",
#  "blocks": [{"keys": ["forward", "left"], "mouse": [0.0, 0.1]},      # held per block; keys by name
#             {"keyboard": [1, 0, 0, 0], "mouse": [0, 0]}, ...]}      # or a raw keyboard vector
# or, instead of "blocks", pixel-rate rows (N = 12B-3, block spans as above):
#  "frames": {"keyboard": [[...], ...], "mouse": [[...], ...]}
# "mouse" is [pitch, yaw] (omitted = no camera motion; not allowed for templerun).

def load_trajectory(path: str | os.PathLike, mode: str) -> list[BlockAction]:
    """Per-block actions of a trajectory file, validated for `mode` (ValueError says what and where)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return parse_trajectory(doc, mode, str(path))


def parse_trajectory(doc: Any, mode: str, source: str = "trajectory") -> list[BlockAction]:
    space = get_action_space(mode)
    if not isinstance(doc, dict):
        raise ValueError(f"{source}: expected a JSON object")
    if doc.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"{source}: \"format\" must be {TRAJECTORY_FORMAT!r}, got {doc.get('format')!r}")
    if doc.get("mode") != mode:
        raise ValueError(f"{source}: written for mode {doc.get('mode')!r}, the model runs {mode!r}")
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
        _blocks_in_rows(action.n_rows, f"{source} frames")
        return split_track(action.keyboard, action.mouse)

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


def save_trajectory(path: str | os.PathLike, mode: str, blocks: Sequence[BlockAction], description: str = "") -> None:
    """Write per-block actions: held actions as "blocks" (binary keyboards by name), anything with per-frame
    rows as pixel-rate "frames"."""
    space = get_action_space(mode)
    if not blocks:
        raise ValueError("no blocks to save")
    for action in blocks:
        space.validate(action)  # write only what load_trajectory accepts
    doc: dict[str, Any] = {"format": TRAJECTORY_FORMAT, "mode": mode}
    if description:
        doc["description"] = description
    if all(a.n_rows == 1 for a in blocks):
        doc["blocks"] = [_held_entry(space, a) for a in blocks]
    else:
        rows = [a.rows(block_pixel_frames(b)) for b, a in enumerate(blocks)]
        doc["frames"] = {"keyboard": torch.cat([r.keyboard.cpu() for r in rows]).tolist()}
        if space.has_mouse:
            doc["frames"]["mouse"] = torch.cat([r.mouse.cpu() for r in rows]).tolist()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def _held_entry(space: ActionSpace, action: BlockAction) -> dict[str, Any]:
    keyboard = action.keyboard[0].cpu().tolist()
    entry: dict[str, Any]
    if all(v in (0.0, 1.0) for v in keyboard):
        entry = {"keys": [name for name, v in zip(space.key_names, keyboard) if v == 1.0]}
    else:
        entry = {"keyboard": keyboard}
    if action.mouse is not None:
        entry["mouse"] = action.mouse[0].cpu().tolist()
    return entry


def planned_actions(mode: str, blocks: int, trajectory: str | os.PathLike | None = None,
                    benchmark_seed: int = 0) -> list[BlockAction]:
    """The first `blocks` block actions of a trajectory file, or of the mode's reference benchmark trajectory."""
    if trajectory is not None:
        actions = load_trajectory(trajectory, mode)
        if len(actions) < blocks:
            raise ValueError(f"{trajectory} holds {len(actions)} blocks, fewer than the {blocks} asked for")
        return actions[:blocks]
    keyboard, mouse = benchmark_trajectory(mode, track_rows(blocks), benchmark_seed)
    return split_track(keyboard, mouse)
