"""Matrix-Game-2 action spaces (spec §3.7) and the action of one block.

An action has one row per pixel frame (keyboard [n, K] in [0, 1], mouse [n, 2] = [pitch, yaw]), or a single
row held over the whole block. Values are checked here, in plain Python and numpy, before anything reaches a
model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

CAMERA_STEP = 0.1  # CAM_VALUE: the mouse delta of one camera key press (reference key maps and benchmark)


@dataclass(frozen=True, eq=False)
class BlockAction:
    """The action of one block: `n_rows` pixel-rate rows over the block's span (see `BlockLayout`), or a single
    row (n_rows == 1) held over the whole span. `mouse` is None for modes without a mouse. Holds its own
    float32 copies of the rows."""

    keyboard: np.ndarray  # [n_rows, K] float32
    mouse: np.ndarray | None = None  # [n_rows, 2] float32

    def __post_init__(self):
        keyboard = np.array(self.keyboard, dtype=np.float32)
        if keyboard.ndim != 2 or keyboard.shape[0] < 1:
            raise ValueError(f"keyboard must be [n_rows, K] with n_rows >= 1, got {list(keyboard.shape)}")
        object.__setattr__(self, "keyboard", keyboard)
        if self.mouse is not None:
            mouse = np.array(self.mouse, dtype=np.float32)
            if mouse.shape != (keyboard.shape[0], 2):
                raise ValueError(f"mouse must be [{keyboard.shape[0]}, 2] to match the keyboard rows, "
                                 f"got {list(mouse.shape)}")
            object.__setattr__(self, "mouse", mouse)

    @property
    def n_rows(self) -> int:
        return self.keyboard.shape[0]

    def rows(self, n: int) -> BlockAction:
        """This action as exactly n rows (a held action is repeated)."""
        if self.n_rows == n:
            return self
        if self.n_rows != 1:
            raise ValueError(f"block action has {self.n_rows} rows; the block spans {n} pixel frames "
                             "(give 1 row to hold it, or one row per pixel frame)")
        return BlockAction(self.keyboard.repeat(n, axis=0), None if self.mouse is None else self.mouse.repeat(n, axis=0))

    def last_row(self) -> BlockAction:
        """The newest state of the action, held."""
        return BlockAction(self.keyboard[-1:], None if self.mouse is None else self.mouse[-1:])


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
        [n, 2]). A missing mouse means no camera motion. Validated before any array is built."""
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
        return BlockAction(np.array(kb_rows, dtype=np.float32),
                           None if mouse_rows is None else np.array(mouse_rows, dtype=np.float32))

    # ---- validation -------------------------------------------------------------------------------------

    def check_shapes(self, action: BlockAction) -> None:
        """Layout check only."""
        if action.keyboard.shape[1] != self.keyboard_dim:
            raise ValueError(f"mode {self.name!r} has {self.keyboard_dim} keyboard keys {list(self.key_names)}, "
                             f"got keyboard rows of size {action.keyboard.shape[1]}")
        if self.has_mouse and action.mouse is None:
            raise ValueError(f"mode {self.name!r} needs a mouse [pitch, yaw] per row")
        if not self.has_mouse and action.mouse is not None:
            raise ValueError(f"mode {self.name!r} has no mouse input; drop the mouse values")

    def validate(self, action: BlockAction) -> None:
        """Layout and value check of an action built from arrays."""
        self.check_shapes(action)
        kb = action.keyboard
        if not np.isfinite(kb).all() or ((kb < 0) | (kb > 1)).any():
            raise ValueError(f"keyboard values must be finite and in [0, 1] (1 = pressed) for mode {self.name!r}")
        if self.one_hot and not ((((kb == 0) | (kb == 1)).all(axis=1)) & (kb.sum(axis=1) == 1)).all():
            raise ValueError(f"mode {self.name!r} needs one-hot keyboard rows (use {self.idle_key!r} for no action)")
        if action.mouse is not None:
            if not np.isfinite(action.mouse).all() or (np.abs(action.mouse) > self.mouse_limit).any():
                raise ValueError(f"mouse values must be finite with |value| <= {self.mouse_limit} "
                                 f"(one camera step is {self.camera_step:g})")

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
                             f"(one camera step is {self.camera_step:g}), got {row}")

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
