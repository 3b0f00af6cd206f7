"""Browser input -> the mode's held action: pressed keys through the mode's key map (`ActionSpace.from_pressed`)
plus pointer-lock mouse motion as a camera delta, and the rate limit on input messages."""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from worldstream.api.spaces import ActionSpace, BlockAction

MAX_KEYS = 16  # a page never holds more bound keys than this
MAX_MOUSE_PIXELS = 10_000.0  # per input message; more is not a mouse


class InputError(ValueError):
    """An input message the page should not have sent (the message says what is wrong)."""


class InputMapper:
    """Turns the page's input state into a held BlockAction. Mouse motion is in pixels since the page's previous
    input message; `pixels_per_step` pixels give one camera step (the delta of one camera key)."""

    def __init__(self, space: ActionSpace, pixels_per_step: float = 10.0):
        self.space = space
        self.radians_per_pixel = space.camera_step / pixels_per_step

    def action(self, message: dict[str, Any]) -> BlockAction:
        keys, (dx, dy) = self._keys(message.get("keys", [])), self._mouse(message.get("mouse", [0, 0]))
        if self.space.one_hot:
            keys = keys[-1:]  # the page lists keys in press order: the newest wins
        try:
            action = self.space.from_pressed(keys)
        except ValueError as e:
            raise InputError(str(e)) from None
        if action.mouse is None or (dx == 0 and dy == 0):
            return action
        # Pitch > 0 looks up; the pointer's y grows downwards.
        pitch_yaw = action.mouse[0] + np.array([-dy, dx], dtype=np.float32) * self.radians_per_pixel
        limit = self.space.mouse_limit
        return BlockAction(action.keyboard, np.clip(pitch_yaw, -limit, limit)[None])

    def echo(self, action: BlockAction) -> dict[str, Any]:
        """What the page shows of an applied action: key names, the physical keys bound to them, the mouse."""
        row = action.keyboard[-1]
        indices = [i for i, value in enumerate(row) if value >= 0.5]
        if self.space.one_hot and self.space.idle_key:
            indices = [i for i in indices if self.space.key_names[i] != self.space.idle_key]
        keys = sorted(k for k, i in self.space.keyboard_bindings.items() if i is not None and i in indices)
        mouse = [round(float(v), 4) for v in action.mouse[-1]] if action.mouse is not None else []
        return {"names": [self.space.key_names[i] for i in indices], "keys": keys, "mouse": mouse}

    def _keys(self, keys: Any) -> list[str]:
        if not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(isinstance(k, str) and len(k) == 1
                                                                           for k in keys):
            raise InputError(f"input `keys` must be a list of at most {MAX_KEYS} one-character key names")
        return keys

    @staticmethod
    def _mouse(mouse: Any) -> tuple[float, float]:
        if (not isinstance(mouse, list) or len(mouse) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           and abs(v) <= MAX_MOUSE_PIXELS for v in mouse)):
            raise InputError(f"input `mouse` must be [dx, dy] in pixels, each within +-{MAX_MOUSE_PIXELS:g}")
        return float(mouse[0]), float(mouse[1])


class RateLimit:
    """Token bucket: `rate` messages per second on average, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = burst, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
