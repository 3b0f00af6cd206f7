"""Client of the FrameInterpolationService API: a clip's frames in, the interpolated clip out (numpy uint8 frames,
no torch; PyAV only to read and write mp4).

    result = interpolate("127.0.0.1:50051", frames, factor=2, batch=4, frame_encoding="raw", keep=True)
    result.frames  # uint8 [(T - 1) * factor + 1, H, W, 3], the input frames and the new ones in output order

The frames are sent as the server reads them (it reads only as far ahead as its window of pairs in flight), and
the output clip is assembled as the new frames arrive: each input frame is kept only until the frames after it
are back.
"""
from __future__ import annotations

import io
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from worldstream.v1 import interpolation_pb2, interpolation_pb2_grpc, session_pb2
from .frames import decode_jpeg
from .video import import_av

PAYLOADS = {"default": interpolation_pb2.PAIR_PAYLOAD_UNSPECIFIED,
            "tokens": interpolation_pb2.PAIR_PAYLOAD_TOKENS_FP32,
            "tokens-bf16": interpolation_pb2.PAIR_PAYLOAD_TOKENS_BF16,
            "frames": interpolation_pb2.PAIR_PAYLOAD_FRAMES,
            "frames-jpeg": interpolation_pb2.PAIR_PAYLOAD_FRAMES_JPEG}
INPUT_FORMATS = ("raw", "png", "jpeg")  # how the client sends its frames
FRAME_ENCODINGS = {"jpeg": session_pb2.FRAME_ENCODING_JPEG, "raw": session_pb2.FRAME_ENCODING_RAW_RGB}
INPUT_JPEG_QUALITY = 95
MAX_MESSAGE_BYTES = 64 << 20  # a raw 1088 x 1920 frame is 6.3 MB


# ---- video files ---------------------------------------------------------------------------------------------

def read_video(path: str | Path) -> tuple[Iterator[np.ndarray], Fraction, int]:
    """The frames of a video file as uint8 RGB [H, W, 3], lazily, with the frame rate and the frame count (0 when
    the container does not say)."""
    av = import_av()
    container = av.open(str(path))
    stream = container.streams.video[0]
    fps = Fraction(stream.average_rate or stream.guessed_rate or 25)

    def frames() -> Iterator[np.ndarray]:
        try:
            for frame in container.decode(stream):
                yield frame.to_ndarray(format="rgb24")
        finally:
            container.close()

    return frames(), fps, int(stream.frames or 0)


def frame_bytes(frame: np.ndarray, input_format: str) -> bytes:
    """uint8 RGB [H, W, 3] -> the bytes of a ClipFrame in `input_format`."""
    if input_format == "raw":
        return np.ascontiguousarray(frame).tobytes()
    buffer = io.BytesIO()
    if input_format == "png":
        Image.fromarray(frame).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(frame).save(buffer, format="JPEG", quality=INPUT_JPEG_QUALITY)
    return buffer.getvalue()


# ---- the output clip -----------------------------------------------------------------------------------------

class OutputClip:
    """Puts the input frames and the new frames in output order and hands each to `sink`: input frame t sits at
    t * factor, the new frames of pair t after it. Input frames wait here until their pair's frames arrive."""

    def __init__(self, factor: int, sink: Callable[[np.ndarray], None]):
        self.factor = factor
        self.sink = sink
        self.inputs: deque[np.ndarray] = deque()
        self.next_input = 0  # index of the oldest input frame waiting
        self.next_new = 1  # output index of the next new frame
        self._lock = threading.Lock()  # inputs are added by the sending thread

    def add_input(self, frame: np.ndarray) -> None:
        with self._lock:
            self.inputs.append(frame)

    def add_new(self, output_index: int, frame: np.ndarray) -> None:
        if output_index != self.next_new:
            raise ValueError(f"new frame {output_index} arrived while new frame {self.next_new} is due")
        self.next_new += 1 + (output_index % self.factor == self.factor - 1)  # skip the next input's place
        pair = output_index // self.factor
        while self.next_input <= pair:
            self._emit_input()
        self.sink(frame)

    def finish(self) -> None:
        """The clip's last input frame."""
        while self.inputs:
            self._emit_input()

    def _emit_input(self) -> None:
        with self._lock:
            if not self.inputs:
                raise ValueError(f"the frames after input frame {self.next_input} arrived before it was sent")
            frame = self.inputs.popleft()
        self.sink(frame)
        self.next_input += 1


# ---- a stream --------------------------------------------------------------------------------------------------

@dataclass
class InterpolationResult:
    info: interpolation_pb2.InterpolateInfo
    started_at: float  # perf_counter() when the start was sent
    first_frame_at: float = math.nan  # ... when the first new frame arrived
    finished_at: float = math.nan
    batches: list[interpolation_pb2.InterpolatedBatch] = field(default_factory=list)
    end: interpolation_pb2.InterpolateEnd | None = None
    output: list[np.ndarray] = field(default_factory=list)  # with keep=True

    @property
    def frames(self) -> np.ndarray:
        return np.stack(self.output)

    @property
    def pairs(self) -> int:
        return sum(batch.pairs for batch in self.batches)

    @property
    def time_to_first_frame(self) -> float:
        return self.first_frame_at - self.started_at

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / (self.finished_at - self.started_at)

    @property
    def payload_bytes(self) -> int:
        return sum(batch.payload_bytes for batch in self.batches)


def interpolate(address: str, frames: Iterable[np.ndarray], *, factor: int = 2, batch: int = 0,
                payload: str = "default", input_format: str = "raw", frame_encoding: str = "jpeg",
                jpeg_quality: int = 0, seed: int = 0, keep: bool = False,
                on_frame: Callable[[np.ndarray], None] | None = None,
                on_batch: Callable[[interpolation_pb2.InterpolatedBatch, InterpolationResult], None] | None = None,
                timeout: float | None = None, connect_timeout: float = 10.0) -> InterpolationResult:
    """Interpolate a clip (uint8 RGB frames [H, W, 3], one size) through the decoder at `address`. The output clip
    goes frame by frame to `on_frame` (and into `result.output` with `keep`). Raises grpc.RpcError with the
    server's status on failure."""
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError("the clip has no frames")
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format {input_format!r}: use one of {INPUT_FORMATS}")
    height, width = first.shape[:2]
    start = interpolation_pb2.InterpolateStart(
        height=height, width=width, factor=factor, batch=batch,
        frame_format=(interpolation_pb2.CLIP_FRAME_FORMAT_RAW_RGB if input_format == "raw"
                      else interpolation_pb2.CLIP_FRAME_FORMAT_IMAGE),
        frame_encoding=FRAME_ENCODINGS[frame_encoding], jpeg_quality=jpeg_quality, seed=seed,
        payload=PAYLOADS[payload])

    result: InterpolationResult | None = None

    def sink(frame: np.ndarray) -> None:
        if keep:
            result.output.append(frame)
        if on_frame is not None:
            on_frame(frame)

    clip = OutputClip(factor, sink)

    def requests() -> Iterator[interpolation_pb2.InterpolateRequest]:
        yield interpolation_pb2.InterpolateRequest(start=start)
        for frame in _chain(first, frames):
            clip.add_input(frame)
            yield interpolation_pb2.InterpolateRequest(frame=interpolation_pb2.ClipFrame(
                data=frame_bytes(frame, input_format)))

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(f"no FrameInterpolationService reachable at {address} within {connect_timeout:g} s"
                                  ) from None
        started = time.perf_counter()
        call = interpolation_pb2_grpc.FrameInterpolationServiceStub(channel).Interpolate(requests(), timeout=timeout)
        try:
            for response in call:
                kind = response.WhichOneof("response")
                if kind == "info":
                    result = InterpolationResult(response.info, started)
                elif result is None:
                    raise RuntimeError(f"the server answered the start with `{kind}`, not `info`")
                elif kind == "frame":
                    if math.isnan(result.first_frame_at):
                        result.first_frame_at = time.perf_counter()
                    clip.add_new(response.frame.output_index, _decode(response.frame.data, result.info))
                elif kind == "batch":
                    result.batches.append(response.batch)
                    result.finished_at = time.perf_counter()
                    if on_batch is not None:
                        on_batch(response.batch, result)
                elif kind == "end":
                    result.end = response.end
                    clip.finish()
                    result.finished_at = time.perf_counter()
        finally:
            call.cancel()  # no-op once the call has ended
    if result is None or result.end is None:
        raise RuntimeError("the stream closed without `end`")
    return result


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _decode(data: bytes, info: interpolation_pb2.InterpolateInfo) -> np.ndarray:
    shape = (info.height, info.width, 3)
    if info.frame_encoding == session_pb2.FRAME_ENCODING_RAW_RGB:
        if len(data) != info.height * info.width * 3:
            raise ValueError(f"a raw frame of {len(data)} bytes, expected {info.height}x{info.width}x3")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape)
    frame = decode_jpeg(data)
    if frame.shape != shape:
        raise ValueError(f"a JPEG frame of {frame.shape[0]}x{frame.shape[1]}, the clip's frames are "
                         f"{info.height}x{info.width}")
    return frame


# ---- command line ------------------------------------------------------------------------------------------------

class Progress:
    """One status line on stderr, rewritten per batch."""

    def __init__(self, total_pairs: int):
        self.total = total_pairs  # 0: unknown

    def update(self, batch: interpolation_pb2.InterpolatedBatch, result: InterpolationResult) -> None:
        done = batch.first_pair + batch.pairs
        rate = result.pairs / (result.finished_at - result.started_at)
        if self.total:
            filled = min(20, 20 * done // self.total)
            bar = f"[{'#' * filled}{'.' * (20 - filled)}] {done}/{self.total} pairs"
        else:
            bar = f"{done} pairs"
        sys.stderr.write(f"\r{bar} | {rate:6.2f} pairs/s | first frame {result.time_to_first_frame:6.3f} s ")
        sys.stderr.flush()


def add_arguments(commands) -> None:
    """The `interpolate` command of worldstream-client."""
    parser = commands.add_parser("interpolate", help="interpolate a video through a decoder service",
                                 description="Send a video's frames to a FrameInterpolationService (an EDEN "
                                             "deployment) and write the interpolated video.")
    parser.set_defaults(run=run)
    parser.add_argument("--address", default="127.0.0.1:50051", help="decoder service host:port")
    parser.add_argument("--video", type=Path, required=True, help="input video (anything PyAV reads)")
    parser.add_argument("--factor", type=int, choices=(2, 4), default=2, help="output frames per input interval")
    parser.add_argument("--out", type=Path, default=Path("out/interpolated.mp4"), help="video to write (fps x factor)")
    parser.add_argument("--batch", type=int, default=0, help="frame pairs per forward, K (0 = the server's limit)")
    parser.add_argument("--payload", choices=sorted(PAYLOADS), default="default",
                        help="what the encoder service sends the decoder service (default: the server's)")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="raw",
                        help="how frames are sent: raw RGB (lossless, largest), PNG, or JPEG (quality 95)")
    parser.add_argument("--raw", action="store_true", help="receive lossless raw RGB frames instead of JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=0, help="JPEG quality 1-100 (0 = server default)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")


def run(args) -> int:
    from .video import VideoWriter

    try:
        frames, fps, count = read_video(args.video)
        progress = Progress(max(0, count - 1))
        with VideoWriter(args.out, fps=fps * args.factor) as writer:
            result = interpolate(args.address, frames, factor=args.factor, batch=args.batch, payload=args.payload,
                                 input_format=args.input_format, frame_encoding="raw" if args.raw else "jpeg",
                                 jpeg_quality=args.jpeg_quality, seed=args.seed,
                                 on_frame=lambda frame: writer.write(frame[None]), on_batch=progress.update)
    except grpc.RpcError as e:
        print(f"\ninterpolation failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:  # unreachable server, bad file, no PyAV
        print(f"\n{e}", file=sys.stderr)
        return 1
    print(file=sys.stderr)
    info = result.info
    print(f"clip {info.stream_id}: {result.pairs} pairs of {info.height}x{info.width}, x{info.factor}, batch "
          f"{info.batch}, payload {interpolation_pb2.PairPayload.Name(info.payload)[len('PAIR_PAYLOAD_'):].lower()}")
    print(f"{result.pairs_per_second:.2f} pairs/s | first output frame after {result.time_to_first_frame:.3f} s | "
          f"{result.payload_bytes / max(1, result.pairs) / 2**20:.2f} MiB per pair between the services")
    print(f"video: {args.out.resolve()} ({writer.frames_written} frames at {float(fps * args.factor):g} fps)")
    return 0
