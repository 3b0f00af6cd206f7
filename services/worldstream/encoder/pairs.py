"""The encoder service of a frame-interpolation config: `ConditionEncoderService.EncodePairs` over EDEN's cond layers.

Each `EncodePairs` stream is one client clip, forwarded frame by frame by a decoder service (protocol in
protos/worldstream/v1/pair_encoder.proto). Per batch of K consecutive pairs the stream decodes the new frames,
runs the encoder half (`engine.interpolation.encode_payload`: padding, the unpadded difference, the frame stats
and, for the TOKENS payloads, the patchify) on its own worker thread, and sends the payload in chunks. The
decoder's credit bounds the frames a stream holds: the frames of batch b arrive only once b is granted.

A decoder on the same host and GPU may offer CUDA IPC (wire/cuda_ipc.py): the stream then writes each payload into
a slot of its ring of device buffers and sends only the slot's header; a credit returns the oldest slot.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from ..engine.eden import build_eden_patchify, check_frame_size
from ..engine.interpolation import DEFAULT_PAYLOAD_JPEG_QUALITY, decode_frame, encode_payload, payload_spec
from ..models.eden import EdenConfig, EdenPatchify, PairGeometry
from ..serving.aio import (Requests, WorkerLane, now_timestamp, run_call, run_together, within,
                           write_with_timeout)
from ..serving.errors import ServiceError
from ..serving.logs import log_event
from ..serving.metrics import ServiceMetrics
from ..serving.streams import opening_request, require_kind
from ..wire import cuda_ipc, pack_tensors
from worldstream.v1 import encoder_pb2_grpc, interpolation_pb2, pair_encoder_pb2
from .server import encoder_slots

log = logging.getLogger("worldstream.encoder")

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_PAYLOAD_PREFIX, _FORMAT_PREFIX = "PAIR_PAYLOAD_", "CLIP_FRAME_FORMAT_"


def payload_name(value: int) -> str:
    """PairPayload value -> the engine's payload name ("tokens_fp32", "frames", ...); ValueError if unknown/unset."""
    if value == interpolation_pb2.PAIR_PAYLOAD_UNSPECIFIED or value not in interpolation_pb2.PairPayload.values():
        raise ValueError(f"unknown payload {value}; use TOKENS_FP32, TOKENS_BF16, FRAMES or FRAMES_JPEG")
    return interpolation_pb2.PairPayload.Name(value)[len(_PAYLOAD_PREFIX):].lower()


def payload_value(name: str) -> int:
    return interpolation_pb2.PairPayload.Value(_PAYLOAD_PREFIX + name.upper())


def frame_format_name(value: int) -> str:
    """ClipFrameFormat value (unset: IMAGE) -> "image" or "raw_rgb"; ValueError if unknown."""
    value = value or interpolation_pb2.CLIP_FRAME_FORMAT_IMAGE
    if value not in interpolation_pb2.ClipFrameFormat.values():
        raise ValueError(f"unknown frame_format {value}; use IMAGE (PNG/JPEG) or RAW_RGB")
    return interpolation_pb2.ClipFrameFormat.Name(value)[len(_FORMAT_PREFIX):].lower()


def slot_tensors(payload: str, pairs: int, geometry: PairGeometry, cfg: EdenConfig) -> cuda_ipc.SlotTensors:
    """The payload's tensors of a batch of `pairs` pairs as they lie in a CUDA IPC slot (not FRAMES_JPEG)."""
    return [(spec.name, spec.dtype, spec.shape) for spec in payload_spec(payload, pairs, geometry, cfg)]


class PairEncoderService(encoder_pb2_grpc.ConditionEncoderServiceServicer):
    def __init__(self, cfg: Any, metrics: ServiceMetrics, *, max_streams: int = 64, idle_timeout: float = 300.0,
                 warm_up: bool = True):
        if max_streams < 1:
            raise ValueError("need max_streams >= 1")
        self.cfg = cfg
        self.metrics = metrics
        self.slots = encoder_slots(max_streams, metrics)
        self.idle_timeout = idle_timeout
        self.warm_up = warm_up
        self.max_pairs = int(cfg.limits.max_pairs)
        self.max_pixels = int(cfg.limits.max_pixels)
        self.patchify: EdenPatchify | None = None

    async def load(self) -> None:
        """Build (and warm up) the cond layers off the event loop; NOT_SERVING meanwhile."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        patchify = await loop.run_in_executor(None, build_eden_patchify, self.cfg)
        if self.warm_up:
            grey = torch.full((2, 3, 64, 64), 128, dtype=torch.uint8)
            await loop.run_in_executor(None, encode_payload, grey, "tokens_fp32", patchify)
        self.patchify = patchify
        log_event(log, "models loaded", family="eden", device=str(patchify.patch_cond_dit.weight.device),
                  seconds=round(time.perf_counter() - started, 3))

    async def terminate(self) -> None:
        await self.slots.terminate()

    async def Encode(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        async def refuse() -> None:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this encoder runs a frame-interpolation (eden) config and serves EncodePairs only: "
                               "run encoder and decoder with the same config")
        await run_call(refuse(), context, self.metrics, log, "Encode")

    async def EncodePairs(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await run_call(self._encode_pairs(Requests(context), context), context, self.metrics, log, "EncodePairs")

    async def _encode_pairs(self, requests, context: grpc.aio.ServicerContext) -> None:
        self.slots.check_open(loaded=self.patchify is not None)
        first = await opening_request(requests, self.idle_timeout, self.metrics, "a `start` request")
        options = self._checked(require_kind(first, "start"), context.peer())
        with self.slots.slot():
            stream = _PairStream(self, options, context)
            try:
                await run_together(stream.send_all(), stream.read(requests))
            finally:
                stream.close()

    def _checked(self, start: pair_encoder_pb2.PairStreamStart, peer: str) -> StreamOptions:
        try:
            check_frame_size(start.height, start.width, self.patchify.cfg, self.max_pixels)
            payload, frame_format = payload_name(start.payload), frame_format_name(start.frame_format)
        except ValueError as e:
            raise ServiceError(_INVALID, str(e)) from None
        if not 1 <= start.batch <= self.max_pairs:
            raise ServiceError(_INVALID, f"batch of {start.batch} pairs; this encoder takes 1 to {self.max_pairs}")
        if start.initial_credits < 1:
            raise ServiceError(_INVALID, "initial_credits must be at least 1 batch")
        quality = start.jpeg_quality or DEFAULT_PAYLOAD_JPEG_QUALITY
        if quality > 100:
            raise ServiceError(_INVALID, f"jpeg_quality must be in [1, 100], got {start.jpeg_quality}")
        offer = start.cuda_ipc if start.HasField("cuda_ipc") else None
        device = self.patchify.patch_cond_dit.weight.device
        # One slot per batch of initial credit: the frames of batch b arrive only after the credit that returns the
        # slot of batch b - initial_credits, so a slot is always free when a batch is encoded.
        ipc = payload != "frames_jpeg" and cuda_ipc.accepts(offer, device, peer, start.initial_credits)
        return StreamOptions(start.stream_id, start.height, start.width, frame_format, payload, start.batch, quality,
                             start.initial_credits, ipc)


@dataclass(frozen=True)
class StreamOptions:
    stream_id: str
    height: int
    width: int
    frame_format: str  # "image" or "raw_rgb"
    payload: str       # an engine payload name
    batch: int
    jpeg_quality: int
    initial_credits: int
    cuda_ipc: bool  # the payload travels through a CUDA IPC ring (the decoder offered it, same host and GPU)


class _PairStream:
    """One EncodePairs stream: the frames received so far, the credit, and the batches as they are encoded."""

    def __init__(self, service: PairEncoderService, options: StreamOptions, context: grpc.aio.ServicerContext):
        self.service = service
        self.options = options
        self.context = context
        self.metrics = service.metrics
        self.lane = WorkerLane(f"pairs-{options.stream_id[:10]}")
        self.frames: dict[int, bytes] = {}  # the frames of batches not yet encoded, by index
        self.received = 0
        self.credits = options.initial_credits
        self.decoder_done = False  # half-closed: the clip has `received` frames
        self.changed = asyncio.Condition()
        self.last_frame: torch.Tensor | None = None  # the previous batch's last frame, the next one's first
        self.sent = 0
        self.ring: cuda_ipc.SlotRing | None = None  # with CUDA IPC: batch b goes into slot b mod its size

    async def _send(self, message: pair_encoder_pb2.EncodePairsResponse) -> None:
        await write_with_timeout(self.context, message, self.metrics, self.service.idle_timeout)

    async def read(self, requests) -> None:
        """Frames and credits from the decoder; a frame beyond the granted batches is refused."""
        batch = self.options.batch
        async for message in requests:
            self.metrics.bytes_received.inc(message.ByteSize())
            kind = message.WhichOneof("request")
            async with self.changed:
                if kind == "frame":
                    if self.received > self.credits * batch:
                        raise ServiceError(_INVALID, f"frame {self.received} arrived without credit: {self.credits} "
                                                     f"batches of {batch} pairs take {self.credits * batch + 1} "
                                                     "frames at most")
                    self.frames[self.received] = message.frame.data
                    self.received += 1
                elif kind == "credit" and message.credit.batches >= 1:
                    self.credits += message.credit.batches
                else:
                    raise ServiceError(_INVALID, f"after `start` only `frame` and `credit` (of at least 1 batch) "
                                                 f"are allowed, got `{kind or 'an empty request'}`")
                self.changed.notify_all()
        async with self.changed:
            self.decoder_done = True
            self.changed.notify_all()

    async def _frames_of(self, b: int) -> int:
        """Wait until batch b's frames are here; its number of pairs (0: the clip has no batch b)."""
        first, batch = b * self.options.batch, self.options.batch

        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.received > first + batch or self.decoder_done)
        try:
            await within(wait(), self.service.idle_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the decoder sent no frame for "
                                                                  f"{self.service.idle_timeout:g} s") from None
        return max(0, min(batch, self.received - 1 - first))

    async def send_all(self) -> None:
        options = self.options
        ready = pair_encoder_pb2.PairStreamReady(payload=payload_value(options.payload), batch=options.batch)
        if options.cuda_ipc:
            patchify = self.service.patchify
            geometry = PairGeometry(options.height, options.width, patchify.cfg.patch_size)
            _, slot_bytes = cuda_ipc.layout(slot_tensors(options.payload, options.batch, geometry, patchify.cfg))
            self.ring = await self.lane.run(cuda_ipc.SlotRing, patchify.patch_cond_dit.weight.device, slot_bytes,
                                            options.initial_credits)
            ready.cuda_ipc.CopyFrom(self.ring.message)
        await self._send(pair_encoder_pb2.EncodePairsResponse(ready=ready))
        log_event(log, "pair stream opened", stream_id=options.stream_id, payload=options.payload,
                  batch=options.batch, height=options.height, width=options.width,
                  transport="cuda_ipc" if options.cuda_ipc else "grpc")
        encoded: asyncio.Queue = asyncio.Queue(maxsize=1)  # one batch encoded ahead of the one being sent
        await run_together(self._send_batches(encoded), self._encode_batches(encoded))
        log_event(log, "pair stream finished", stream_id=options.stream_id, frames=self.received, batches=self.sent)

    async def _encode_batches(self, encoded: asyncio.Queue) -> None:
        b = 0
        while (pairs := await self._frames_of(b)) > 0:
            first = b * self.options.batch
            data = [self.frames.pop(t) for t in range(first + (self.last_frame is not None), first + pairs + 1)]
            if self.ring is not None:
                self._check_slot_returned(b)
            messages, seconds = await self.lane.run(self._encode, b, first, data)
            self.metrics.block_stage_seconds.labels(stage="encode").observe(seconds)
            await encoded.put((b, pairs, seconds, messages))
            b += 1
        await encoded.put(None)

    def _check_slot_returned(self, b: int) -> None:
        """Batch b reuses the slot of batch b - ring size, which the credit beyond the initial one for that batch
        returned (it came before batch b's frames: the credit rules make this hold)."""
        returned = self.credits - self.options.initial_credits
        if b - self.ring.slots >= returned:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"batch {b} would overwrite the CUDA IPC slot of batch "
                                                         f"{b - self.ring.slots}, which the decoder has not returned")

    def _encode(self, b: int, first: int, data: list[bytes]) -> tuple[list[pair_encoder_pb2.EncodePairsResponse],
                                                                         float]:
        """Decode the batch's new frames, encode the pairs and pack the payload (on the lane)."""
        started = time.perf_counter()
        options = self.options
        decoded = [] if self.last_frame is None else [self.last_frame]
        start_index = first + len(decoded)
        for i, frame in enumerate(data):
            try:
                decoded.append(decode_frame(frame, options.frame_format, options.height, options.width,
                                            start_index + i))
            except ValueError as e:
                raise ServiceError(_INVALID, str(e)) from None
        self.last_frame = decoded[-1]
        tensors = encode_payload(torch.stack(decoded), options.payload, self.service.patchify, options.jpeg_quality)
        if self.ring is not None:
            header = self.ring.write(b % self.ring.slots, tensors)
            return [pair_encoder_pb2.EncodePairsResponse(cuda_ipc=header)], time.perf_counter() - started
        messages = [pair_encoder_pb2.EncodePairsResponse(tensor=chunk) for chunk in pack_tensors(tensors)]
        return messages, time.perf_counter() - started

    async def _send_batches(self, encoded: asyncio.Queue) -> None:
        while (item := await encoded.get()) is not None:
            b, pairs, seconds, messages = item
            await self._send(pair_encoder_pb2.EncodePairsResponse(batch=pair_encoder_pb2.PairBatch(
                batch_index=b, pairs=pairs, encode_seconds=seconds, send_time=now_timestamp())))
            for message in messages:
                await self._send(message)
            self.sent += 1
            self.metrics.blocks_served.inc()

    def close(self) -> None:
        """Drop the stream's frames once the work in flight is done (synchronous: a second cancellation of the call
        cannot skip it)."""
        self.lane.close(self._free)

    def _free(self) -> None:
        self.frames.clear()
        self.last_frame = None
        if self.ring is not None:
            self.ring.close()
