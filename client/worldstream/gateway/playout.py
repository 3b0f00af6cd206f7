"""Playout at the session's frame rate. Blocks arrive in bursts (9 or 12 frames at once); a browser should see
them one frame per 1/fps. A small bounded queue between the two is the jitter buffer: the receiver waits for room
before it reads the next block from the decoder, so a decoder faster than real time is held back by gRPC flow
control instead of piling frames up here."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Frame:
    seq: int  # index of the frame in the session, from 0
    block: int  # index of its block
    jpeg: bytes  # as the decoder encoded it
    pixels: np.ndarray | None = None  # uint8 [H, W, 3], decoded only where a transport or the recording needs it


class Playout:
    """Frames in (`put`, waits while the buffer is full), frames out at `fps` (`frames`). A frame that is due more
    than one period ago (the buffer ran dry) restarts the clock instead of being rushed out with its followers."""

    def __init__(self, fps: float, capacity: int):
        self.period = 1.0 / fps
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(capacity)

    async def put(self, frame: Frame) -> None:
        await self._queue.put(frame)

    async def close(self) -> None:
        """No more frames: `frames` ends after the buffered ones."""
        await self._queue.put(None)

    async def frames(self) -> AsyncIterator[Frame]:
        loop = asyncio.get_running_loop()
        due: float | None = None
        while (frame := await self._queue.get()) is not None:
            now = loop.time()
            if due is None or now > due + self.period:
                due = now
            elif due > now:
                await asyncio.sleep(due - now)
            yield frame
            due += self.period
