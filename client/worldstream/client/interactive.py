"""Keyboard play in a terminal: raw, non-blocking tty input mapped to block actions with the mode's key map.

Terminals report key presses (and auto-repeat), not releases, so a key counts as held while it was seen in
the last `hold_seconds`. Esc or Ctrl-C ends the session.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty

from worldstream.api.spaces import ActionSpace, BlockAction

_QUIT = {"\x1b", "\x03"}  # Esc, Ctrl-C (raw mode delivers it as a character)


class TerminalKeys:
    """Raw-mode stdin for the duration of a `with` block; `read()` returns the characters typed so far."""

    def __init__(self):
        if not sys.stdin.isatty():
            raise RuntimeError("--interactive needs a terminal on stdin")
        self.fd = sys.stdin.fileno()
        self._saved = None

    def __enter__(self) -> TerminalKeys:
        self._saved = termios.tcgetattr(self.fd)
        tty.setraw(self.fd)
        return self

    def __exit__(self, *exc) -> None:
        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def read(self) -> str:
        chars = []
        while select.select([self.fd], [], [], 0)[0]:
            data = os.read(self.fd, 64)
            if not data:
                break
            chars.append(data.decode(errors="ignore"))
        return "".join(chars)


class KeyboardActions:
    """Current block action from recent key presses."""

    def __init__(self, space: ActionSpace, keys: TerminalKeys, hold_seconds: float = 0.5):
        self.space = space
        self.keys = keys
        self.hold_seconds = hold_seconds
        self.last_seen: dict[str, float] = {}
        self.quit = False

    def poll(self) -> None:
        now = time.monotonic()
        for char in self.keys.read():
            if char in _QUIT:
                self.quit = True
            key = char.upper()
            if key in self.space.keyboard_bindings or key in self.space.mouse_bindings:
                self.last_seen[key] = now

    def held(self) -> list[str]:
        """Held keys, most recent last; one-hot modes keep only the most recent."""
        cutoff = time.monotonic() - self.hold_seconds
        held = sorted((t, k) for k, t in self.last_seen.items() if t >= cutoff)
        keys = [k for _, k in held]
        return keys[-1:] if self.space.one_hot else keys

    def current(self) -> BlockAction:
        self.poll()
        return self.space.from_pressed(self.held())
