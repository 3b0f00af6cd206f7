"""One browser tab: its WebSocket (JSON control and input messages in; info, blocks, errors and JPEG frames out)
and at most one live decoder session at a time: an image session (REALTIME, driven by the page's input) or a
text-to-video session (LOCKSTEP, one empty action per block as the playout drains; see `requests.session_start`),
which may continue a clip (its reconstruction plays first, then the generated blocks, as one video).
The session ends when the page stops it, when the decoder ends it, or when the tab's WebSocket closes.

Page -> gateway (JSON text messages):
    {"type": "start", "image": {"demo": NAME} | {"data": BASE64, "name": FILE} | "prompt": TEXT,
     "video": {"data": BASE64, "name": FILE} and "video_prompt": TEXT (with "prompt"; video-conditional deployments),
     "transport": "jpeg" | "webrtc", "seed": INT, "record": BOOL, "offer": SDP (webrtc)}
    {"type": "input", "keys": ["W", ...] (held, in press order), "mouse": [dx, dy] (pixels since the last input)}
    {"type": "switch", "prompt": TEXT}               text sessions of deployments with prompt switching (LongLive)
    {"type": "stop"}
    {"type": "ping", "t": MS}                        clock offset for the latency readout
    {"type": "stats", "paint_latency": [SECONDS...]} the page's latency samples, for the gateway's metrics
Gateway -> page: JSON {"type": "info" | "answer" | "clip" | "frames" | "block" | "switched" | "sent" | "end" | "error"
| "pong", ...} ("clip": frames of the clip's reconstruction, before block 0; "frames": a block's first frames, relayed
as the decoder sends them ahead of the block; "block": the block's last frames and its action echo),
and one binary message per frame on the JPEG transport (`transports.FRAME_HEADER`, then the JPEG file).
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from aiohttp import WSMsgType, web

from worldstream.api.layout import BlockLayout
from worldstream.api.messages import action_message, action_space_from_message, parse_action
from worldstream.api.spaces import ActionSpace, BlockAction
from worldstream.client.frames import decode_frames
from worldstream.v1 import session_pb2
from .input import InputError, InputMapper, RateLimit
from .playout import Frame, Playout
from .recording import Recording
from .requests import PageError, session_start, switch_request
from .transports import JpegOverWebSocket, now_ms

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger("worldstream.gateway")
MAX_CONTROL_BYTES = 64 << 10  # every message but `start` (an image or a clip) and `switch` (a prompt) is far smaller
MAX_STATS_SAMPLES = 256
# Text sessions: blocks requested beyond the one being queued for playout. Two keep the decoder busy while a block
# plays, and a prompt switch takes effect at most that many blocks after what is on screen.
TEXT_BLOCKS_AHEAD = 2
SWITCH_RATE, SWITCH_BURST = 1.0, 3  # prompt switches per second per tab; a person types slower
CLIP_BLOCK = 0xFFFFFFFF  # the block index of a clip frame in its frame header (the page tells them by `clip`)


def millis(timestamp) -> float:
    return timestamp.seconds * 1000.0 + timestamp.nanos / 1e6


class LiveSession:
    """One decoder session played to one tab."""

    def __init__(self, tab: Tab, start: session_pb2.StartSession, transport_name: str, offer: str | None,
                 record: bool):
        self.tab, self.gateway = tab, tab.gateway
        self.start, self.transport_name, self.offer, self.record = start, transport_name, offer, record
        self.video = bool(start.video)  # a clip to continue: its reconstruction comes before block 0
        self.call = None
        self.transport = None
        self.mapper: InputMapper | None = None
        self.recording: Recording | None = None
        self.pending_input: dict[str, Any] | None = None  # input that came before the session was open
        self.last_action: BlockAction | None = None
        self.write_lock = asyncio.Lock()
        self.writing_done = False
        self.layout: BlockLayout | None = None
        self.info: session_pb2.SessionInfo | None = None
        self.blocks_requested = 0  # text sessions: empty actions sent
        self.unrecorded: list[np.ndarray] = []  # a block's early frames, recorded with its action once it comes
        self.end: session_pb2.SessionEnd | None = None

    async def run(self) -> None:
        """The whole session; its end or its error is the last thing it sends the page."""
        self.gateway.metrics.sessions_started.labels(self.transport_name).inc()
        try:
            self.call = self.gateway.stub.Session()
            await self.call.write(session_pb2.SessionRequest(start=self.start))
            self.start.ClearField("video")  # sent (serialized by the write): not held for the whole session
            info = await self._open()
            await self._play_session(info)
        except grpc.aio.AioRpcError as e:
            await self.tab.error(f"decoder_{e.code().name.lower()}", f"the decoder ended the session: "
                                 f"{e.code().name}: {e.details()}", fatal=True)
        except PageError as e:
            await self.tab.error(e.code, str(e), fatal=True)
        except ConnectionResetError:
            pass  # the tab went away
        except Exception as e:
            log.exception("session failed")
            await self.tab.error("internal", f"the gateway failed: {type(e).__name__}: {e}", fatal=True)
        finally:
            if self.call is not None and not self.call.done():
                self.call.cancel()
            if self.transport is not None:
                await self.transport.close()

    async def _open(self) -> session_pb2.SessionInfo:
        response = await self.call.read()
        if response is grpc.aio.EOF or response.WhichOneof("response") != "info":
            raise PageError("decoder_protocol", "the decoder did not answer the start with `info`")
        info = response.info
        text = not info.HasField("action_space")  # text-to-video families take empty actions
        if text != bool(self.start.prompt):  # the pacing was chosen by the start's kind
            raise PageError("decoder_protocol", f"the decoder answered a {'prompt' if self.start.prompt else 'image'} "
                                                f"start with a {info.family} session")
        space = None if text else action_space_from_message(info.mode, info.action_space)
        self.layout = BlockLayout.from_block_frames(info.first_block_frames, info.block_frames)
        self.mapper = None if text else InputMapper(space)
        self.info = info
        self.gateway.saw_deployment(info)
        if self.record:
            self.recording = self.tab.new_recording(info.fps, space)
        if self.transport_name == "webrtc":
            from .webrtc import WebRtcTransport

            try:
                self.transport, answer = await WebRtcTransport.answer(self.offer, info.fps, self._sent)
            except ValueError as e:
                raise PageError("webrtc_offer", f"the WebRTC offer could not be answered: {e}") from None
        else:
            self.transport = JpegOverWebSocket(self.tab.ws)
        bindings = [{"key": b.key, "name": b.key_name, "mouse": list(b.mouse)} for b in info.action_space.bindings]
        await self.tab.send({
            "type": "info", "session_id": info.session_id, "mode": info.mode, "height": info.height,
            "width": info.width, "fps": info.fps, "max_blocks": info.max_blocks, "transport": self.transport_name,
            **deployment(info), "prompt_tokens_dropped": info.prompt_tokens_dropped,
            "key_names": list(space.key_names) if space else [], "mouse_dim": space.mouse_dim if space else 0,
            "one_hot": bool(space and space.one_hot), "bindings": bindings, "recording": self.recording is not None})
        if self.transport_name == "webrtc":
            await self.tab.send({"type": "answer", "sdp": answer})
        if text:
            for _ in range(TEXT_BLOCKS_AHEAD):
                await self._request_block()
        elif self.pending_input is not None:
            await self.input(self.pending_input)
        return info

    async def _play_session(self, info: session_pb2.SessionInfo) -> None:
        playout = Playout(info.fps, capacity=info.block_frames)
        tasks = [asyncio.create_task(self._receive(info, playout)), asyncio.create_task(self._play(playout))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        url = None
        if self.recording is not None:
            await self.recording.finish()
            url = f"/recordings/{self.recording.token}.mp4" if self.recording.finished else None
        end = self.end
        await self.tab.send({"type": "end", "reason": session_pb2.EndReason.Name(end.reason).removeprefix(
            "END_REASON_").lower(), "detail": end.detail, "blocks": end.blocks_generated, "recording": url})

    async def _receive(self, info: session_pb2.SessionInfo, playout: Playout) -> None:
        """Decoder blocks (after a clip's reconstruction) -> the page's block (clip) messages, the recording and the
        playout buffer."""
        loop, seq, clip_frames = asyncio.get_running_loop(), 0, 0
        needs_pixels = self.transport.needs_pixels or self.recording is not None
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    raise PageError("decoder_protocol", "the decoder closed the session without `end`")
                kind = response.WhichOneof("response")
                if kind == "end":
                    self.end = response.end
                    # Only the call's status follows: let it arrive instead of cancelling a call the decoder is
                    # still finishing (it would count it as cancelled).
                    await self._write(None, last=True)
                    await self.call.code()
                    return
                if kind == "prompt_switched":
                    switched = response.prompt_switched
                    await self.tab.send({"type": "switched", "block": switched.block_index,
                                         "count": switched.switch_count,
                                         "tokens_dropped": switched.prompt_tokens_dropped})
                    continue
                if kind == "video_frames":
                    clip = response.video_frames
                    if not self.video or clip.first_frame != clip_frames or seq != clip_frames:
                        raise PageError("decoder_protocol", f"the decoder sent clip frames from {clip.first_frame} "
                                                            f"after {seq} frames of a session "
                                                            f"{'with' if self.video else 'without'} a clip")
                    where = f"clip frames from {clip.first_frame}"
                    pixels = await loop.run_in_executor(None, decode_frames, clip, info, where) if needs_pixels \
                        else None
                    await self.tab.send({"type": "clip", "first_frame": clip.first_frame, "first_seq": seq,
                                         "frames": len(clip.frames), "total_frames": clip.total_frames})
                    seq = clip_frames = await self._queue(playout, seq, CLIP_BLOCK, clip.frames, pixels, None, True)
                    continue
                if kind not in ("block_frames", "block"):
                    raise PageError("decoder_protocol", f"the decoder sent `{kind}` in the middle of a session")
                # A block's first frames come ahead of it (`block_frames`): on to the page at once
                early = kind == "block_frames"
                block = response.block_frames if early else response.block
                if block.first_frame + len(block.frames) > self.layout.block_frames:  # (block 0 has fewer)
                    # (a block's early frames wait for its action in the recording: bounded by a block)
                    raise PageError("decoder_protocol", f"the decoder sent frames {block.first_frame} to "
                                                        f"{block.first_frame + len(block.frames) - 1} of block "
                                                        f"{block.block_index}, more than a block has")
                received = now_ms()
                self.gateway.metrics.block_receive_delay.observe(max(0.0, received - millis(block.send_time)) / 1e3)
                action = None if self.mapper is None or early else parse_action(
                    block.action, self.mapper.space, self.layout, block.block_index if block.action.frames else None,
                    f"echo of block {block.block_index}")
                where = f"block {block.block_index} from frame {block.first_frame}"
                pixels = await loop.run_in_executor(None, decode_frames, block, info, where) if needs_pixels else None
                message = {"type": "frames" if early else "block", "index": block.block_index,
                           "first_frame": block.first_frame, "first_seq": seq, "frames": len(block.frames),
                           "send_time": millis(block.send_time), "received": received}
                if not early:
                    message["echo"] = None if action is None else self.mapper.echo(action)
                await self.tab.send(message)
                seq = await self._queue(playout, seq, block.block_index, block.frames, pixels, action, not early)
                if self.mapper is None and not early:  # its frames are queued: request the next block
                    await self._request_block()
        finally:
            await playout.close()

    async def _queue(self, playout: Playout, seq: int, block: int, jpegs, pixels: np.ndarray | None,
                     action: BlockAction | None, complete: bool) -> int:
        """Frames from `seq` on -> the recording and the playout; returns the next frame's seq. `complete`: the
        last frames of a block (or clip frames); a block's earlier frames are recorded with them, under its
        action."""
        if self.recording is not None:
            self.unrecorded.append(pixels)
            if complete:
                for frames in self.unrecorded:
                    self.recording.write(frames, action)
                self.unrecorded.clear()
        for i, jpeg in enumerate(jpegs):
            await playout.put(Frame(seq + i, block, jpeg, None if pixels is None else pixels[i]))
        return seq + len(jpegs)

    async def _play(self, playout: Playout) -> None:
        metrics, name = self.gateway.metrics, self.transport_name
        async for frame in playout.frames():
            sent = await self.transport.send(frame)
            metrics.frames_sent.labels(name).inc()
            metrics.bytes_sent.labels(name).inc(sent)

    async def _sent(self, seq: int, at: float) -> None:
        """WebRTC: when the encoder took frame `seq` (the page maps RTP timestamps to frames with it)."""
        await self.tab.send({"type": "sent", "seq": seq, "t": at})

    async def input(self, message: dict[str, Any]) -> None:
        if self.info is None:
            self.pending_input = message
            return
        if self.mapper is None:
            raise InputError(f"this {self.info.family} session is text-to-video: it takes no keyboard or mouse")
        action = self.mapper.action(message)
        if self.last_action is not None and _same(action, self.last_action):
            return
        self.last_action = action
        await self._write(session_pb2.SessionRequest(action=action_message(action)))

    async def switch(self, message: dict[str, Any]) -> None:
        """Sends a prompt switch; it takes effect at the next block requested (LOCKSTEP)."""
        request = switch_request(message)
        info = self.info
        if info is None:
            raise PageError("not_started", "the session is still starting; switch once its first frames play")
        if not info.prompt_switching:
            raise PageError("no_prompt_switching", f"this deployment ({info.family}) cannot switch prompts; "
                                                   "LongLive deployments can")
        async with self.write_lock:
            # A switch after the last block's action has no block to take effect at: the decoder would end the
            # session with INVALID_ARGUMENT.
            if self.blocks_requested >= info.max_blocks:
                raise PageError("switch_too_late", f"all {info.max_blocks} blocks of this session are already "
                                                   "requested, so no block is left to switch at; start a new "
                                                   "session with the new prompt")
            await self._write_locked(request)

    async def _request_block(self) -> None:
        """Text sessions: the empty action of the next block, unless every block is requested."""
        async with self.write_lock:
            if self.blocks_requested < self.info.max_blocks:
                self.blocks_requested += 1
                await self._write_locked(session_pb2.SessionRequest(action=session_pb2.Action()))

    async def stop(self) -> None:
        """The decoder ends the session after the block in progress (the blocks requested, text sessions) and
        sends `end`."""
        await self._write(session_pb2.SessionRequest(stop=session_pb2.StopSession()), last=True)

    async def _write(self, request: session_pb2.SessionRequest | None, last: bool = False) -> None:
        """Sends `request` (if any); `last`: then half-closes the request stream."""
        async with self.write_lock:
            await self._write_locked(request, last)

    async def _write_locked(self, request: session_pb2.SessionRequest | None, last: bool = False) -> None:
        if self.writing_done or self.call is None or self.call.done():
            return
        try:
            if request is not None:
                await self.call.write(request)
            if last:
                self.writing_done = True
                await self.call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call already ended; `run` reports its status


def deployment(info: session_pb2.SessionInfo) -> dict[str, Any]:
    """What a page needs to know of the decoder's deployment before it starts a session (`/api/config`)."""
    return {"family": info.family, "text": not info.HasField("action_space"),
            "prompt_switching": info.prompt_switching, "video_conditioning": info.video_conditioning}


def _same(a: BlockAction, b: BlockAction) -> bool:
    return np.array_equal(a.keyboard, b.keyboard) and (
        (a.mouse is None and b.mouse is None) or (a.mouse is not None and b.mouse is not None
                                                  and np.array_equal(a.mouse, b.mouse)))


class Tab:
    def __init__(self, gateway: Gateway, ws: web.WebSocketResponse):
        self.gateway, self.ws = gateway, ws
        self.session: LiveSession | None = None
        self.task: asyncio.Task | None = None
        self.recordings: list[Recording] = []
        limits = gateway.limits
        self.input_rate = RateLimit(limits.input_rate, limits.input_burst)
        self.switch_rate = RateLimit(SWITCH_RATE, SWITCH_BURST)  # each switch is a text encode on the encoder
        self.rate_error_at = 0.0

    async def serve(self) -> None:
        """Handles the tab's messages until its WebSocket closes, then ends its session."""
        self.gateway.metrics.tabs_connected.inc()
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    data, message = message.data, None  # a start's clip is not held while the next one is awaited
                    await self._handle(data)
                    del data
                elif message.type == WSMsgType.BINARY:
                    await self.error("bad_message", "binary messages are not accepted; send JSON text messages")
                elif message.type == WSMsgType.ERROR and getattr(message.data, "code", None) == 1009:
                    # aiohttp closes the socket (code 1009, which the page explains): the page's own check of
                    # the image size was bypassed
                    self.gateway.metrics.errors.labels("message_too_large").inc()
                    log.info("closed a page's WebSocket: a message over %d bytes",
                             self.gateway.limits.max_message_bytes)
        finally:
            self.gateway.metrics.tabs_connected.dec()
            await self._end_session()
            for recording in self.recordings:
                self.gateway.recordings.pop(recording.token, None)
                await recording.discard()

    async def _handle(self, data: str) -> None:
        try:
            # A start with a clip is tens of MiB of JSON: parsed on a worker thread, not on the event loop
            message = json.loads(data) if len(data) <= MAX_CONTROL_BYTES else \
                await asyncio.get_running_loop().run_in_executor(None, json.loads, data)
            if not isinstance(message, dict):
                raise PageError("bad_message", "messages must be JSON objects with a `type`")
            kind = message.get("type")
            if kind not in ("start", "switch") and len(data) > MAX_CONTROL_BYTES:
                raise PageError("message_too_large", f"`{kind}` messages must be under {MAX_CONTROL_BYTES} bytes")
            handler = {"start": self._start, "input": self._input, "switch": self._switch, "stop": self._stop,
                       "ping": self._ping, "stats": self._stats}.get(kind)
            if handler is None:
                raise PageError("bad_message", f"unknown message type {kind!r}; expected start, input, switch, "
                                               "stop, ping or stats")
            await handler(message)
        except json.JSONDecodeError as e:
            await self.error("bad_message", f"messages must be JSON: {e}")
        except InputError as e:
            await self.error("bad_input", str(e))
        except PageError as e:
            await self.error(e.code, str(e))

    async def _start(self, message: dict[str, Any]) -> None:
        if self.task is not None and not self.task.done():
            raise PageError("session_running", "a session is already running in this tab; stop it first")
        gateway = self.gateway
        transport = message.get("transport") or gateway.default_transport
        if transport not in gateway.transports:
            raise PageError("bad_transport", f"transport {transport!r} is not available here; this gateway offers "
                                             f"{', '.join(gateway.transports)}")
        offer = message.get("offer")
        if transport == "webrtc" and not isinstance(offer, str):
            raise PageError("webrtc_offer", "a WebRTC start needs the page's SDP offer in `offer`")
        limits = gateway.limits
        # Off the event loop: base64 decoding of a clip, reading a demo image
        start = await asyncio.get_running_loop().run_in_executor(None, functools.partial(
            session_start, message, gateway.demos, limits.max_image_bytes, limits.max_video_bytes,
            gateway.jpeg_quality))
        if gateway.sessions_active >= limits.max_sessions:
            raise PageError("gateway_full", f"this gateway plays {limits.max_sessions} sessions at most and "
                                            "all are in use; close another tab or try again later")
        for recording in self.recordings:  # one download per tab: the latest session's
            gateway.recordings.pop(recording.token, None)
            await recording.discard()
        self.recordings.clear()
        self.session = LiveSession(self, start, transport, offer, bool(message.get("record", True)))
        gateway.hold_session()
        self.task = asyncio.create_task(self.session.run())
        self.task.add_done_callback(lambda _: gateway.release_session())  # also if cancelled before it ran

    async def _input(self, message: dict[str, Any]) -> None:
        self.gateway.metrics.input_messages.inc()
        if not self.input_rate.allow():
            now = asyncio.get_running_loop().time()
            if now - self.rate_error_at > 1.0:  # say it once a second, not once per dropped message
                self.rate_error_at = now
                limits = self.gateway.limits
                await self.error("input_rate", f"input is limited to {limits.input_rate:g} messages per second "
                                               f"(bursts of {limits.input_burst}); extra input was dropped")
            return
        if self.session is not None and not self.task.done():
            await self.session.input(message)

    async def _switch(self, message: dict[str, Any]) -> None:
        if self.session is None or self.task.done():
            raise PageError("no_session", "no session is playing in this tab; start one with the prompt instead")
        if not self.switch_rate.allow():
            raise PageError("switch_rate", f"prompt switches are limited to {SWITCH_RATE:g} per second (bursts of "
                                           f"{SWITCH_BURST}); this one was dropped")
        await self.session.switch(message)

    async def _stop(self, message: dict[str, Any]) -> None:
        if self.session is not None and not self.task.done():
            await self.session.stop()

    async def _ping(self, message: dict[str, Any]) -> None:
        await self.send({"type": "pong", "t": message.get("t"), "server": now_ms()})

    async def _stats(self, message: dict[str, Any]) -> None:
        samples = message.get("paint_latency")
        if (not isinstance(samples, list) or len(samples) > MAX_STATS_SAMPLES
                or not all(isinstance(v, (int, float)) and 0 <= v < 3600 for v in samples)):
            raise PageError("bad_message", f"`paint_latency` must be a list of at most {MAX_STATS_SAMPLES} "
                                           "latencies in seconds")
        if self.session is not None:
            histogram = self.gateway.metrics.paint_latency.labels(self.session.transport_name)
            for value in samples:
                histogram.observe(value)

    def new_recording(self, fps: int, space: ActionSpace | None) -> Recording:
        recording = Recording(self.gateway.recordings_dir, fps, space)
        self.recordings.append(recording)
        self.gateway.recordings[recording.token] = recording
        return recording

    async def _end_session(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message))

    async def error(self, code: str, message: str, fatal: bool = False) -> None:
        """Shows an error on the page; `fatal`: it ended the session."""
        self.gateway.metrics.errors.labels(code).inc()
        log.info("error shown to a page: %s: %s", code, message)
        await self.send({"type": "error", "code": code, "message": message, "fatal": fatal})
