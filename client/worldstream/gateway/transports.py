"""How frames reach the page: JPEG over the tab's WebSocket (works everywhere), or a WebRTC video track (see
`webrtc`). Both take frames from the same playout and report when each frame left the gateway, which the page
needs for its latency readout."""
from __future__ import annotations

import struct
import time

from aiohttp import web

from .playout import Frame

# Binary WebSocket message of one frame: this header, then the JPEG file as the decoder encoded it.
FRAME_HEADER = struct.Struct("<IId")  # seq, block index, sent at (Unix time, milliseconds)


def now_ms() -> float:
    return time.time() * 1000.0


class JpegOverWebSocket:
    """Passes the decoder's JPEG frames through to the page unchanged."""

    name = "jpeg"
    needs_pixels = False

    def __init__(self, ws: web.WebSocketResponse):
        self.ws = ws

    async def send(self, frame: Frame) -> int:
        """Sends one frame; returns the bytes sent."""
        data = FRAME_HEADER.pack(frame.seq, frame.block, now_ms()) + frame.jpeg
        await self.ws.send_bytes(data)
        return len(data)

    async def close(self) -> None:
        pass
