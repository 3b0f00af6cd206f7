"""Keyboard play in a terminal: raw, non-blocking tty input mapped to block actions with the mode's key map, or
(text-to-video) prompts typed line by line.

Terminals report key presses (and auto-repeat), not releases, so a key counts as held while it was seen in
the last `hold_seconds`. Esc or Ctrl-C ends the session.
"""
from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

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


class PromptLines:
    """Prompts typed in the terminal, one per line, read on a daemon thread: the terminal stays in its normal
    (line-editing) mode, so a prompt can be corrected before Enter. End of input (Ctrl-D) ends the session."""

    def __init__(self):
        if not sys.stdin.isatty():
            raise RuntimeError("--interactive needs a terminal on stdin")

    def start(self, on_prompt: Callable[[str], None], on_end: Callable[[], None]) -> None:
        """Call `on_prompt` with each non-empty line typed, then `on_end` at end of input."""
        def read() -> None:
            for line in sys.stdin:
                if line.strip():
                    on_prompt(line.strip())
            on_end()

        threading.Thread(target=read, name="prompt-lines", daemon=True).start()
