"""The WebRTC transport (aiortc): one peer connection per session with one video track fed from the playout.
The page offers (receive-only video, all ICE candidates gathered), the gateway answers; no trickle ICE and no
TURN, so the browser must reach the gateway's host candidates (UDP) directly. The encoder (VP8 or H.264, as the
browser and aiortc agree) runs in aiortc's sender; frames it has not taken yet are replaced by newer ones."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from fractions import Fraction

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from .playout import Frame
from .transports import now_ms

RTP_CLOCK = 90_000  # Hz, the clock of video RTP timestamps


class PlayoutTrack(MediaStreamTrack):
    """A video track whose frames are the playout's. `on_sent(seq, ms)` is told when aiortc takes each frame to
    encode; the RTP timestamp of frame `seq` is a fixed random offset plus `seq * rtp_step`."""

    kind = "video"

    def __init__(self, fps: int, on_sent: Callable[[int, float], Awaitable[None]]):
        super().__init__()
        self.rtp_step = RTP_CLOCK // fps
        self.on_sent = on_sent
        self.dropped = 0
        self._next: asyncio.Queue[Frame] = asyncio.Queue(1)

    def push(self, frame: Frame) -> None:
        if self._next.full():  # the sender is behind: the newer frame wins
            self._next.get_nowait()
            self.dropped += 1
        self._next.put_nowait(frame)

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self._next.get()
        video = VideoFrame.from_ndarray(frame.pixels, format="rgb24")
        video.pts, video.time_base = frame.seq * self.rtp_step, Fraction(1, RTP_CLOCK)
        await self.on_sent(frame.seq, now_ms())
        return video


class WebRtcTransport:
    name = "webrtc"
    needs_pixels = True

    def __init__(self, track: PlayoutTrack, connection: RTCPeerConnection):
        self.track, self.connection = track, connection

    @classmethod
    async def answer(cls, offer_sdp: str, fps: int, on_sent: Callable[[int, float], Awaitable[None]]
                     ) -> tuple[WebRtcTransport, str]:
        """The transport for the page's offer, and the SDP answer (candidates included) to send back."""
        connection = RTCPeerConnection()
        try:
            track = PlayoutTrack(fps, on_sent)
            await connection.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
            if not any(t.kind == "video" for t in connection.getTransceivers()):
                raise ValueError("the WebRTC offer has no video section; offer a receive-only video transceiver")
            connection.addTrack(track)  # takes the offer's video transceiver
            await connection.setLocalDescription(await connection.createAnswer())
        except BaseException:
            await connection.close()
            raise
        return cls(track, connection), connection.localDescription.sdp

    async def send(self, frame: Frame) -> int:
        self.track.push(frame)
        return 0  # bytes on the wire are counted by aiortc, not here

    async def close(self) -> None:
        self.track.stop()
        await self.connection.close()
