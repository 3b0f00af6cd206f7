"""The decoder service of a frame-interpolation config: `worldstream.v1.FrameInterpolationService` over EDEN's DiT
and decoder, fed by the encoder service's `EncodePairs` (one model family per deployment, chosen by the config).

Per clip three coroutines run on the event loop: a reader (the client's frames, checked and forwarded to the
encoder as far as the credit allows, so that the client is read only as fast as the clip is interpolated), a
producer (each batch's payload -> its new frames, on the clip's own worker thread) and the deliverer (frame
encoding on a shared thread pool, then writing to the client, in output order). A bounded queue between producer
and deliverer keeps at most `OUTBOX_BATCHES` finished batches in memory.

With `transfer.cuda_ipc` a decoder on a GPU offers the encoder the same-host data plane (wire/cuda_ipc.py) for every
payload but FRAMES_JPEG; the encoder uses it if it runs on the same GPU, else the payload travels over gRPC.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from ..encoder.pair_client import PairEncoderClient, PairFeed, ReceivedBatch
from ..encoder.pairs import frame_format_name, payload_name, payload_value
from ..engine.eden import EdenInterpolator, check_frame_size
from ..engine.interpolation import (FACTORS, PAYLOADS, ClipInterpolation, check_frame_bytes, decode_frame,
                                    payload_tokens)
from ..media import encode_jpeg
from ..models.eden import PairGeometry
from ..serving.aio import Requests, WorkerLane, run_call, run_together, within, write_with_timeout
from ..serving.bootstrap import Service
from ..serving.errors import ServiceError
from ..serving.logs import log_event
from ..serving.metrics import ServiceMetrics
from ..serving.security import client_security_from_args
from ..serving.streams import StreamSlots, opening_request
from ..wire import cuda_ipc
from worldstream.v1 import interpolation_pb2, interpolation_pb2_grpc, pair_encoder_pb2, session_pb2
from .requests import parse_frame_output, require_start

log = logging.getLogger("worldstream.decoder")

SERVICE_NAME = interpolation_pb2.DESCRIPTOR.services_by_name["FrameInterpolationService"].full_name
OUTBOX_BATCHES = 2  # finished batches waiting for encoding/sending before the producer pauses
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True)
class ClipOptions:
    height: int
    width: int
    factor: int
    batch: int
    frame_format: str  # "image" or "raw_rgb"
    frame_encoding: int  # of the returned frames
    jpeg_quality: int
    seed: int
    payload: str


def parse_start(start: interpolation_pb2.InterpolateStart, interpolator: EdenInterpolator,
                default_payload: str) -> ClipOptions:
    """Check a start against this server; ServiceError(INVALID_ARGUMENT) says what to fix."""
    try:
        check_frame_size(start.height, start.width, interpolator.cfg, interpolator.max_pixels)
        frame_format = frame_format_name(start.frame_format)
        payload = payload_name(start.payload) if start.payload else default_payload
    except ValueError as e:
        raise ServiceError(_INVALID, str(e)) from None
    factor = start.factor or 2
    if factor not in FACTORS:
        raise ServiceError(_INVALID, f"factor {start.factor}: use 2 (one middle frame per pair) or 4")
    limit = interpolator.max_pairs
    if start.batch > limit:
        raise ServiceError(_INVALID, f"batch of {start.batch} pairs exceeds this server's limit of {limit} pairs per "
                                     f"forward; send 1 to {limit} (0 = {limit})")
    encoding, quality = parse_frame_output(start)
    return ClipOptions(start.height, start.width, factor, start.batch or limit, frame_format, encoding, quality,
                       start.seed, payload)


class InterpolationService(interpolation_pb2_grpc.FrameInterpolationServiceServicer):
    def __init__(self, cfg: Any, encoder: PairEncoderClient, metrics: ServiceMetrics, *, max_streams: int,
                 idle_timeout: float, frame_workers: int = 2, warm_up: bool = True):
        payload = str(cfg.transfer.payload)
        if payload not in PAYLOADS:
            raise ValueError(f"transfer.payload {payload!r}: use one of {PAYLOADS}")
        self.cfg = cfg
        self.encoder = encoder
        self.metrics = metrics
        self.slots = StreamSlots("decoder", max_streams, metrics,
                                 full="this decoder interpolates {limit} clips at most and all are busy; retry later "
                                      "or connect to another replica")
        self.idle_timeout = idle_timeout
        self.warm_up = warm_up
        self.default_payload = payload
        self.payload_jpeg_quality = int(cfg.transfer.jpeg_quality)
        self.cuda_ipc = bool(cfg.transfer.cuda_ipc)
        self.cuda_ipc_offer = None  # set once loaded, if this decoder can receive through CUDA IPC
        self.frame_pool = concurrent.futures.ThreadPoolExecutor(frame_workers, thread_name_prefix="frames")
        self.interpolator: EdenInterpolator | None = None

    async def load(self) -> None:
        """Build (and warm up) the model off the event loop; NOT_SERVING meanwhile."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        interpolator = await loop.run_in_executor(None, EdenInterpolator, self.cfg)
        if self.warm_up:
            grey = torch.full((1, 3, 64, 64), 128, dtype=torch.uint8)
            await loop.run_in_executor(None, interpolator.interpolate, grey, grey, [0])
        if self.cuda_ipc:
            self.cuda_ipc_offer = cuda_ipc.offer(interpolator.device, self.encoder.address)
        self.interpolator = interpolator
        log_event(log, "models loaded", family="eden", device=str(interpolator.device),
                  default_payload=self.default_payload, cuda_ipc_offered=self.cuda_ipc_offer is not None,
                  seconds=round(time.perf_counter() - started, 3))

    async def terminate(self) -> None:
        await self.slots.terminate()

    async def Interpolate(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await run_call(self._interpolate(Requests(context), context), context, self.metrics, log, "Interpolate")

    async def _interpolate(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        self.slots.check_open(loaded=self.interpolator is not None)
        received = time.perf_counter()
        first = await opening_request(requests, self.idle_timeout, self.metrics, "a `start` request")
        options = parse_start(require_start(first), self.interpolator, self.default_payload)
        with self.slots.slot():
            clip = _Clip(self, options, context, received)
            try:
                await clip.run(requests)
            finally:
                await clip.release()


@dataclass
class _Finished:
    """A batch's new frames on their way to the client."""
    first_pair: int
    frames: torch.Tensor  # uint8 [n, F - 1, H, W, 3]
    stage_seconds: dict[str, float]
    payload_bytes: int


class _Clip:
    def __init__(self, service: InterpolationService, options: ClipOptions, context: grpc.aio.ServicerContext,
                 received: float):
        self.id = uuid.uuid4().hex
        self.service = service
        self.options = options
        self.context = context
        self.received = received
        self.metrics = service.metrics
        self.geometry = PairGeometry(options.height, options.width, service.interpolator.cfg.patch_size)
        self.model_work = ClipInterpolation(service.interpolator, options.factor, options.batch, options.seed)
        self.lane = WorkerLane(f"clip-{self.id[:8]}")
        self.feed: PairFeed | None = None
        self.inputs: dict[int, bytes] = {}  # factor 4: the input frames of batches not yet interpolated
        self.outbox: asyncio.Queue[_Finished | None] = asyncio.Queue(OUTBOX_BATCHES)
        self.frames_sent = 0

    def _log(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(log, event, level, stream_id=self.id, **fields)

    async def _send(self, response: interpolation_pb2.InterpolateResponse) -> None:
        await write_with_timeout(self.context, response, self.metrics, self.service.idle_timeout)

    async def run(self, requests: Any) -> None:
        options, service = self.options, self.service
        self._log("clip starting", height=options.height, width=options.width, factor=options.factor,
                  batch=options.batch, payload=options.payload, peer=self.context.peer())
        start = pair_encoder_pb2.PairStreamStart(
            stream_id=self.id, height=options.height, width=options.width,
            frame_format=interpolation_pb2.ClipFrameFormat.Value(f"CLIP_FRAME_FORMAT_{options.frame_format.upper()}"),
            payload=payload_value(options.payload), batch=options.batch, jpeg_quality=service.payload_jpeg_quality,
            initial_credits=service.encoder.window)
        if service.cuda_ipc_offer is not None and options.payload != "frames_jpeg":
            start.cuda_ipc.CopyFrom(service.cuda_ipc_offer)
        self.feed = await service.encoder.open_pairs(start, service.interpolator.cfg, service.interpolator.device)
        self._log("payload transport", transport="cuda_ipc" if self.feed.cuda_ipc else "grpc")
        await self._send(interpolation_pb2.InterpolateResponse(info=interpolation_pb2.InterpolateInfo(
            stream_id=self.id, height=options.height, width=options.width, factor=options.factor,
            batch=options.batch, frame_encoding=options.frame_encoding, payload=payload_value(options.payload))))
        await run_together(self._deliver(), self._produce(), self._read(requests))

    async def _read(self, requests: Any) -> None:
        """The client's frames -> the encoder (each once its batch has credit)."""
        options, count = self.options, 0
        while True:
            try:
                message = await within(anext(requests, None), self.service.idle_timeout)
            except asyncio.TimeoutError:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no frame and no half-close for "
                                                                      f"{self.service.idle_timeout:g} s") from None
            if message is None:
                break
            self.metrics.bytes_received.inc(message.ByteSize())
            if message.WhichOneof("request") != "frame":
                raise ServiceError(_INVALID, f"`{message.WhichOneof('request') or 'an empty request'}` after `start`: "
                                             "send the clip's frames, then half-close")
            try:
                check_frame_bytes(message.frame.data, options.frame_format, options.height, options.width, count)
            except ValueError as e:
                raise ServiceError(_INVALID, str(e)) from None
            if options.factor == 4:
                self.inputs[count] = message.frame.data
            await self.feed.send_frame(message.frame.data)
            count += 1
        if count < 2:
            raise ServiceError(_INVALID, f"the clip has {count} frame{'s' * (count != 1)}: send at least 2 frames "
                                         "before half-closing")
        await self.feed.finish()

    async def _produce(self) -> None:
        b = 0
        while (batch := await self.feed.batch(b)) is not None:
            first_pair = b * self.options.batch
            inputs = None
            if self.options.factor == 4:
                inputs = [self.inputs.pop(t) if t < first_pair + batch.pairs else self.inputs[t]
                          for t in range(first_pair, first_pair + batch.pairs + 1)]
            frames, seconds = await self.lane.run(self._interpolate, batch, inputs)
            stages = {"encode": batch.encode_seconds, "transfer": batch.transfer_seconds, "decode": seconds}
            await self.outbox.put(_Finished(first_pair, frames, stages, batch.payload_bytes))
            b += 1
        await self.outbox.put(None)

    def _interpolate(self, batch: ReceivedBatch, inputs: list[bytes] | None) -> tuple[torch.Tensor, float]:
        """A batch's payload -> its new frames (on the lane)."""
        started = time.perf_counter()
        options, first_pair = self.options, batch.index * self.options.batch
        try:
            tokens = payload_tokens(options.payload, batch.tensors, self.service.interpolator.model, self.geometry)
        except ValueError as e:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder sent an invalid payload: {e}") from None
        frames = None
        if inputs is not None:
            try:
                frames = torch.stack([decode_frame(data, options.frame_format, options.height, options.width,
                                                   first_pair + i) for i, data in enumerate(inputs)])
            except ValueError as e:
                raise ServiceError(_INVALID, str(e)) from None
        return self.model_work.new_frames(tokens, first_pair, frames), time.perf_counter() - started

    async def _deliver(self) -> None:
        loop = asyncio.get_running_loop()
        factor = self.options.factor
        while (item := await self.outbox.get()) is not None:
            started = time.perf_counter()
            encoded = await loop.run_in_executor(self.service.frame_pool, self._encode_frames, item.frames)
            item.stage_seconds["frame_encode"] = time.perf_counter() - started
            for i, pair_frames in enumerate(encoded):
                for k, data in enumerate(pair_frames):
                    await self._send(interpolation_pb2.InterpolateResponse(frame=interpolation_pb2.InterpolatedFrame(
                        output_index=(item.first_pair + i) * factor + k + 1, data=data)))
                    if self.frames_sent == 0:
                        self.metrics.time_to_first_frame_seconds.observe(time.perf_counter() - self.received)
                    self.frames_sent += 1
            pairs = item.frames.shape[0]
            await self._send(interpolation_pb2.InterpolateResponse(batch=interpolation_pb2.InterpolatedBatch(
                first_pair=item.first_pair, pairs=pairs, payload_bytes=item.payload_bytes,
                stage_seconds=item.stage_seconds)))
            self.metrics.blocks_served.inc()
            for stage, seconds in item.stage_seconds.items():
                self.metrics.block_stage_seconds.labels(stage=stage).observe(seconds)
        pairs = self.frames_sent // (factor - 1)
        await self._send(interpolation_pb2.InterpolateResponse(end=interpolation_pb2.InterpolateEnd(
            input_frames=pairs + 1, pairs=pairs, frames_sent=self.frames_sent)))
        self._log("clip finished", pairs=pairs, frames_sent=self.frames_sent)

    def _encode_frames(self, frames: torch.Tensor) -> list[list[bytes]]:
        if self.options.frame_encoding == session_pb2.FRAME_ENCODING_RAW_RGB:
            return [[frame.numpy().tobytes() for frame in pair] for pair in frames]
        return [[encode_jpeg(frame, self.options.jpeg_quality) for frame in pair] for pair in frames]

    async def release(self) -> None:
        """Free what the clip holds, however it ended (after the batch in flight)."""
        if self.feed is not None:
            self.feed.close()
        self.inputs.clear()
        await asyncio.shield(self.lane.close(lambda: None))
        self._log("clip released", frames_sent=self.frames_sent)


def build_service(args: argparse.Namespace, cfg: Any, metrics: ServiceMetrics) -> Service:
    """The decoder process of an eden config (`worldstream serve decoder --config eden/...`): the decoder's flags
    apply per clip (--max-sessions clips, --encoder-window batches of credit)."""
    encoder = PairEncoderClient(args.encoder_address, metrics, connect_timeout=args.encoder_connect_timeout,
                                request_timeout=args.encoder_timeout, window=args.encoder_window,
                                **client_security_from_args(args, "encoder-"))
    service = InterpolationService(cfg, encoder, metrics, max_streams=args.max_sessions,
                                   idle_timeout=args.idle_timeout, frame_workers=args.frame_workers,
                                   warm_up=args.warmup_blocks != 0)
    return Service(name=SERVICE_NAME,
                   register=lambda server: interpolation_pb2_grpc.add_FrameInterpolationServiceServicer_to_server(
                       service, server),
                   load=service.load, terminate=service.terminate, close=encoder.close,
                   dependency_ready=lambda: encoder.serving(timeout=args.encoder_check_interval),
                   dependency=f"encoder at {args.encoder_address}",
                   dependency_check_interval=args.encoder_check_interval,
                   log_fields={"config": args.config, "encoder_address": args.encoder_address})
