"""Client library of the WorldSessionService API (synchronous, usable from scripts and tests).

    result = run_session("127.0.0.1:50051", "assets/demo.png", actions, frame_encoding="raw")
    result.frames  # numpy uint8 [N, H, W, 3]
    result = run_session("127.0.0.1:50051", None, [Action()] * 7, prompt="a fox in snow")  # a text-to-video server
    result = run_session(address, None, [Action()] * 6, prompt="a fox in snow",
                         switches=[(2, "the fox dives"), (4, "night falls")])  # LongLive: prompt switches
    result = run_session(address, None, [Action()] * 4, video="clip.mp4", video_prompt="what the clip shows",
                         prompt="what happens next")  # LongLive: continue a clip; result.video_frames first

`SessionStream` is the lower-level handle: it learns the session's mode, action space, block layout and frame
size from the server's `SessionInfo` (`info`, `space`, `layout`), so callers can plan actions once it is open
(`play`) or decide them on the fly (interactive play).

The server sends a block's first frames as they are generated (`block_frames`, a latent's frames each), then the
block with the rest; the stream assembles them into whole blocks (`ReceivedBlock`), and `on_frames` sees each run of
frames as it arrives (a live display).
"""
from __future__ import annotations

import io
import os
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from worldstream.api.layout import BlockLayout
from worldstream.api.messages import action_message, action_space_from_message, parse_action
from worldstream.api.spaces import BlockAction
from worldstream.v1 import session_pb2, session_pb2_grpc
from .frames import decode_frames
from .tls import ChannelTLS, open_channel, wait_connected

FRAME_ENCODINGS = {"jpeg": session_pb2.FRAME_ENCODING_JPEG, "raw": session_pb2.FRAME_ENCODING_RAW_RGB}
PACINGS = {"lockstep": session_pb2.PACING_LOCKSTEP, "realtime": session_pb2.PACING_REALTIME}
# Raw-RGB blocks of full-size frames are 8.1 MB; leave room for larger configs.
MAX_RECEIVE_BYTES = 256 << 20


@dataclass
class ReceivedBlock:
    index: int
    frames: np.ndarray  # uint8 [T, H, W, 3]
    action: BlockAction | None  # the action the server applied (from its echo); None for text-to-video
    stage_seconds: dict[str, float]  # server-side stages
    latency: float  # seconds from sending this block's action (or the previous block, REALTIME) to receiving it
    received_at: float  # time.perf_counter() on arrival (of its last frames)
    first_frames_at: float  # time.perf_counter() when its first frames arrived (early, or with the block)
    wire_bytes: int  # of its responses (its early frames' and its own)
    switched: session_pb2.PromptSwitched | None = None  # the prompt switch that took effect at this block


@dataclass
class SessionResult:
    info: session_pb2.SessionInfo
    blocks: list[ReceivedBlock] = field(default_factory=list)
    end: session_pb2.SessionEnd | None = None
    started_at: float = 0.0  # time.perf_counter() when the start request was sent
    video_frames: np.ndarray | None = None  # a video-conditional session's clip as the model reconstructs it

    @property
    def switches(self) -> list[session_pb2.PromptSwitched]:
        """The prompt switches that took effect, in order."""
        return [block.switched for block in self.blocks if block.switched is not None]

    @property
    def frames(self) -> np.ndarray:
        """All frames, uint8 [N, H, W, 3]."""
        return np.concatenate([block.frames for block in self.blocks])

    @property
    def frame_count(self) -> int:
        return sum(block.frames.shape[0] for block in self.blocks)

    @property
    def time_to_first_frame(self) -> float:
        return self.blocks[0].first_frames_at - self.started_at if self.blocks else float("nan")

    @property
    def elapsed(self) -> float:
        return self.blocks[-1].received_at - self.started_at if self.blocks else 0.0

    @property
    def fps(self) -> float:
        """Frames per second after the first block (steady-state generation rate seen by the client)."""
        if len(self.blocks) < 2:
            return float("nan")
        span = self.blocks[-1].received_at - self.blocks[0].received_at
        return sum(block.frames.shape[0] for block in self.blocks[1:]) / span

    def summary(self) -> dict[str, float]:
        latencies = [block.latency for block in self.blocks]
        return {
            "blocks": len(self.blocks), "frames": self.frame_count, "seconds": self.elapsed,
            "time_to_first_frame": self.time_to_first_frame, "fps": self.fps,
            "latency_mean": statistics.fmean(latencies) if latencies else float("nan"),
            "latency_p50": statistics.median(latencies) if latencies else float("nan"),
            "latency_max": max(latencies, default=float("nan")),
        }


def image_bytes(image: str | os.PathLike | bytes | Image.Image) -> bytes:
    """PNG/JPEG bytes of an image given as a file, encoded bytes or a PIL image."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    with open(image, "rb") as f:
        return f.read()


def video_bytes(video: str | os.PathLike | bytes) -> bytes:
    """The encoded video file (MP4, WebM, ...) given as a path or as its bytes."""
    if isinstance(video, bytes):
        return video
    with open(video, "rb") as f:
        return f.read()


_HALF_CLOSE = object()


FramesCallback = Callable[[int, int, np.ndarray], None]


class SessionStream:
    """One open session. Send actions with `send`, iterate to receive blocks, `finish` to say no more actions.
    RPC failures surface as grpc.RpcError (with the server's status code and message) while iterating.
    `on_frames(block index, index in the block of the first frame, frames uint8 [t, H, W, 3])` is called, while
    iterating, with each run of a block's frames as it arrives, before the block is complete."""

    def __init__(self, address: str, start: session_pb2.StartSession, timeout: float | None = None,
                 connect_timeout: float = 10.0, tls: ChannelTLS | None = None, on_frames: FramesCallback | None = None):
        self.on_frames = on_frames
        self._channel = open_channel(address, tls, [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)],
                                     aio=False)
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._finished = False
        self.lockstep = start.pacing != session_pb2.PACING_REALTIME
        self.sent_at: list[float] = []  # perf_counter() of each action sent
        self.started_at = time.perf_counter()
        self._requests.put(session_pb2.SessionRequest(start=start))
        server = f"the WorldSessionService server at {address}{' over TLS' if tls else ''}"
        try:
            wait_connected(self._channel, server, connect_timeout)
        except ConnectionError:
            self._channel.close()
            raise
        self._call = session_pb2_grpc.WorldSessionServiceStub(self._channel).Session(self._request_stream(), timeout=timeout)
        try:
            first = next(self._call)
            if first.WhichOneof("response") != "info":
                raise RuntimeError(f"server answered the start with `{first.WhichOneof('response')}`, not `info`")
            self.info: session_pb2.SessionInfo = first.info
            # Text-to-video servers announce no action space: their actions are empty
            self.space = (action_space_from_message(first.info.mode, first.info.action_space)
                          if first.info.HasField("action_space") else None)
            self.layout = BlockLayout.from_block_frames(first.info.first_block_frames, first.info.block_frames)
        except BaseException:
            self.close()
            raise
        self.end: session_pb2.SessionEnd | None = None
        self._last_arrival = time.perf_counter()
        self._video_frames: list[np.ndarray] = []  # chunks of the clip's reconstruction (`video_frames`)
        self._switched: session_pb2.PromptSwitched | None = None  # announced for the next block
        self._early: list[np.ndarray] = []  # frames of the next block that came before it (`block_frames`)
        self._early_block: int | None = None  # ... its index
        self._early_at = 0.0  # ... when the first of them arrived
        self._early_bytes = 0

    def _request_stream(self) -> Iterator[session_pb2.SessionRequest]:
        while True:
            request = self._requests.get()
            if request is _HALF_CLOSE:
                return
            yield request

    def send(self, action: BlockAction | session_pb2.Action) -> None:
        """Queue an action. REALTIME takes held actions only: per-frame rows are sent as their last row (the
        newest state), since the block they will land on is not known."""
        if not self.lockstep and isinstance(action, BlockAction) and action.n_rows > 1:
            action = action.last_row()
        with self._lock:
            if self._finished:
                raise RuntimeError("the session was finished; no more actions can be sent")
            message = action if isinstance(action, session_pb2.Action) else action_message(action)
            self.sent_at.append(time.perf_counter())
            self._requests.put(session_pb2.SessionRequest(action=message))

    def switch_prompt(self, prompt: str) -> None:
        """Generate under `prompt` from the block of the next action sent (LOCKSTEP) or from the next block that
        starts once it is encoded (REALTIME); deployments with `info.prompt_switching` (LongLive)."""
        with self._lock:
            if self._finished:
                raise RuntimeError("the session was finished; no more prompts can be sent")
            self._requests.put(session_pb2.SessionRequest(switch_prompt=session_pb2.SwitchPrompt(prompt=prompt)))

    @property
    def video_frames(self) -> np.ndarray | None:
        """A video-conditional session's clip as the model reconstructs it (complete once block 0 arrived)."""
        return np.concatenate(self._video_frames) if self._video_frames else None

    def finish(self, explicit_stop: bool = False) -> None:
        """No more actions: half-close (or send `stop` first). Blocks whose actions were sent still arrive."""
        with self._lock:
            if not self._finished:
                self._finished = True
                if explicit_stop:
                    self._requests.put(session_pb2.SessionRequest(stop=session_pb2.StopSession()))
                self._requests.put(_HALF_CLOSE)

    def __iter__(self) -> Iterator[ReceivedBlock]:
        for response in self._call:
            kind = response.WhichOneof("response")
            if kind == "end":
                self.end = response.end
                # Only the call's status follows: wait for it, so that closing the stream does not cancel a call
                # that the server is still finishing (it would count it as CANCELLED).
                self.finish()
                next(self._call, None)
                return
            if kind == "prompt_switched":
                self._switched = response.prompt_switched
            elif kind == "video_frames":
                self._add_video_frames(response.video_frames)
            elif kind == "block_frames":
                self._add_block_frames(response)
            elif kind == "block":
                yield self._received(response)
            else:
                raise RuntimeError(f"unexpected `{kind}` response in the middle of a session")

    def _add_video_frames(self, chunk: session_pb2.VideoFrames) -> None:
        received = sum(len(frames) for frames in self._video_frames)
        if chunk.first_frame != received:
            raise RuntimeError(f"video frames from {chunk.first_frame} after {received} frames")
        self._video_frames.append(decode_frames(chunk, self.info, f"video frames from {chunk.first_frame}"))

    def _add_block_frames(self, response: session_pb2.SessionResponse) -> None:
        now, part = time.perf_counter(), response.block_frames
        if self._early_block is None:
            self._early_block, self._early_at = part.block_index, now
        self._check_frames_follow(part.block_index, part.first_frame, len(part.frames), "block frames")
        frames = decode_frames(part, self.info, f"block {part.block_index} from frame {part.first_frame}")
        self._early.append(frames)
        self._early_bytes += response.ByteSize()
        if self.on_frames is not None:
            self.on_frames(part.block_index, part.first_frame, frames)

    def _check_frames_follow(self, block_index: int, first_frame: int, count: int, what: str) -> None:
        """`count` frames of a block continue those that came before it (none: from frame 0 of any block), and
        the block holds no more frames than a block has (checked before they are decoded or kept)."""
        received = sum(len(frames) for frames in self._early)
        if (self._early_block is not None and block_index != self._early_block) or first_frame != received:
            before = f"{received} frames of block {self._early_block}" if self._early else "no frames"
            raise RuntimeError(f"{what} of block {block_index} from frame {first_frame} came after {before}")
        most = self.layout.block_frames  # (block 0 has fewer)
        if first_frame + count > most:
            raise RuntimeError(f"{what} of block {block_index} would make it {first_frame + count} frames; a block of "
                               f"this session has at most {most}")

    def _received(self, response: session_pb2.SessionResponse) -> ReceivedBlock:
        now = time.perf_counter()
        block = response.block
        self._check_frames_follow(block.block_index, block.first_frame, len(block.frames), "the block")
        frames = decode_frames(block, self.info)
        if self.on_frames is not None:
            self.on_frames(block.block_index, block.first_frame, frames)
        first_frames_at = self._early_at if self._early else now
        frames = np.concatenate([*self._early, frames]) if self._early else frames
        wire_bytes = self._early_bytes + response.ByteSize()
        self._early, self._early_block, self._early_bytes = [], None, 0
        if self.lockstep and block.block_index < len(self.sent_at):
            latency = now - self.sent_at[block.block_index]
        else:
            latency = now - self._last_arrival
        self._last_arrival = now
        switched, self._switched = self._switched, None
        if switched is not None and switched.block_index != block.block_index:
            raise RuntimeError(f"a prompt switch announced for block {switched.block_index} came before block "
                               f"{block.block_index}")
        return ReceivedBlock(block.block_index, frames, self.applied_action(block), dict(block.stage_seconds),
                             latency, now, first_frames_at, wire_bytes, switched)

    def applied_action(self, block: session_pb2.BlockChunk) -> BlockAction | None:
        if self.space is None:
            return None
        return parse_action(block.action, self.space, self.layout,
                            block.block_index if block.action.frames else None, f"echo of block {block.block_index}")

    def play(self, actions: Sequence[BlockAction | session_pb2.Action], window: int = 2,
             on_block: Callable[[ReceivedBlock, SessionStream], None] | None = None,
             switches: Sequence[tuple[int, str]] = ()) -> SessionResult:
        """Send `actions`, one per block, and receive their blocks. LOCKSTEP keeps `window` actions in flight;
        REALTIME sends the next action as each block arrives. `switches`: (block index, prompt) pairs, each sent
        right before that block's action (LOCKSTEP: the switch takes effect exactly there)."""
        if window < 1:
            raise ValueError("window must be at least 1")
        result = SessionResult(self.info, started_at=self.started_at)
        pending = list(actions)
        in_flight = window if self.lockstep else 1
        switch_at = dict(switches)
        if len(switch_at) != len(switches) or not all(0 <= b < len(actions) for b in switch_at):
            raise ValueError(f"switches at blocks {[b for b, _ in switches]}: give distinct block indices in "
                             f"[0, {len(actions) - 1}]")

        def refill(received: int) -> None:
            while pending and len(self.sent_at) < received + in_flight:
                if len(self.sent_at) in switch_at:
                    self.switch_prompt(switch_at[len(self.sent_at)])
                self.send(pending.pop(0))
            # LOCKSTEP: queued actions still run after the half-close. REALTIME: the server would stop at its
            # next block, so keep the stream open until every action has had its block.
            if not pending and (self.lockstep or received >= len(actions)):
                self.finish()

        refill(0)
        for block in self:
            result.blocks.append(block)
            refill(len(result.blocks))  # before the callback: keep the server busy while the caller works
            if on_block is not None:
                on_block(block, self)
        result.end = self.end
        result.video_frames = self.video_frames
        return result

    def cancel(self) -> None:
        """Abort the session right away (the server frees it)."""
        self._call.cancel()

    def close(self) -> None:
        self.finish()
        self._call.cancel()
        self._channel.close()

    def __enter__(self) -> SessionStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_request(image: str | os.PathLike | bytes | Image.Image | None, mode: str = "", *, prompt: str = "",
                  seed: int = 0, max_blocks: int = 0, frame_encoding: str = "jpeg", jpeg_quality: int = 0,
                  pacing: str = "lockstep", video: str | os.PathLike | bytes | None = None,
                  video_prompt: str = "", whole_blocks: bool = False) -> session_pb2.StartSession:
    """A start request from an image or (text-to-video servers, `image` None) a prompt, optionally continuing a
    `video` (a file or its bytes) that `video_prompt` describes; `mode` empty: whatever the server runs (the
    session's `info` says which). `whole_blocks`: the server sends each block's frames at once, when all are
    generated (not a latent's frames as each is)."""
    return session_pb2.StartSession(mode=mode, image=b"" if image is None else image_bytes(image), prompt=prompt,
                                    seed=seed, max_blocks=max_blocks, frame_encoding=FRAME_ENCODINGS[frame_encoding],
                                    jpeg_quality=jpeg_quality, pacing=PACINGS[pacing],
                                    video=b"" if video is None else video_bytes(video), video_prompt=video_prompt,
                                    whole_blocks=whole_blocks)


def run_session(address: str, image: str | os.PathLike | bytes | Image.Image | None,
                actions: Sequence[BlockAction | session_pb2.Action], *, mode: str = "", prompt: str = "", seed: int = 0,
                max_blocks: int | None = None, frame_encoding: str = "jpeg", jpeg_quality: int = 0,
                pacing: str = "lockstep", window: int = 2, timeout: float | None = None,
                on_block: Callable[[ReceivedBlock, SessionStream], None] | None = None,
                tls: ChannelTLS | None = None, switches: Sequence[tuple[int, str]] = (),
                video: str | os.PathLike | bytes | None = None, video_prompt: str = "", whole_blocks: bool = False,
                on_frames: FramesCallback | None = None) -> SessionResult:
    """Run a whole session: one block per action (`max_blocks` defaults to len(actions)); see
    `SessionStream.play`; text-to-video: `prompt` instead of an image, and empty `Action()`s; LongLive:
    `switches` ((block, prompt) pairs), and a `video` to continue with its `video_prompt`. `tls`: reach the
    server over TLS; `whole_blocks` and `on_frames`: see `start_request` and `SessionStream`. Raises
    grpc.RpcError with the server's status on failure, ConnectionError when no server answers."""
    start = start_request(image, mode, prompt=prompt, seed=seed,
                          max_blocks=len(actions) if max_blocks is None else max_blocks,
                          frame_encoding=frame_encoding, jpeg_quality=jpeg_quality, pacing=pacing, video=video,
                          video_prompt=video_prompt, whole_blocks=whole_blocks)
    with SessionStream(address, start, timeout=timeout, tls=tls, on_frames=on_frames) as stream:
        return stream.play(actions, window=window, on_block=on_block, switches=switches)
