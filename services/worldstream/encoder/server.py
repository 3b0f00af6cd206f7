"""The condition-encoder service: `worldstream.v1.ConditionEncoderService` over the engine's EncoderModels.

Each `Encode` stream is one decoder session. Its model work (image decode, CLIP, VAE encode, host copies) runs on
the stream's own worker thread, never on the event loop; a stream computes its blocks in order, at most
`prefetch` blocks beyond the credits the decoder granted, and sends a block only once it has the credit.
With a text-to-video config the encoder runs the UMT5 text encoder instead: a stream sends its prompt's text
context once and ends. Configs that continue videos (LongLive, `conditioning`) also take clips: a `video` stream
sends the clip's conditioning latents, one block per tensor, and ends (`videos`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from torch.profiler import record_function

from ..engine.builders import dit_config
from ..engine.encoder import EncoderModels
from ..engine.text import TextEncoder, build_text_encoder
from ..media import load_image
from ..serving.aio import Requests, WorkerLane, run_call, run_together, within, write_with_timeout
from ..serving.errors import ServiceError
from ..serving.logs import log_event
from ..serving.memory import HeapTrimmer
from ..serving.metrics import ServiceMetrics
from ..serving.profiling import StreamProfiler
from ..serving.streams import StreamSlots, opening_request, require_kind
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc
from ..wire import pack_tensor
from .videos import ClipEncoder, receive_clip

log = logging.getLogger("worldstream.encoder")

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["ConditionEncoderService"].full_name
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def encoder_slots(max_streams: int, metrics: ServiceMetrics) -> StreamSlots:
    """The stream admission of an encoder service (this one, or `pairs.PairEncoderService`)."""
    return StreamSlots("encoder", max_streams, metrics,
                       full="the encoder serves {limit} streams at most; retry later or add encoder replicas")


class ConditionEncoderService(encoder_pb2_grpc.ConditionEncoderServiceServicer):
    def __init__(self, cfg: Any, metrics: ServiceMetrics, *, max_streams: int = 64, prefetch: int = 2,
                 idle_timeout: float = 300.0, warmup_blocks: int = 2, profile_dir: Path | None = None):
        if prefetch < 0 or max_streams < 1:
            raise ValueError("need prefetch >= 0 and max_streams >= 1")
        self.cfg = cfg
        self.metrics = metrics
        self.slots = encoder_slots(max_streams, metrics)
        self.prefetch = prefetch
        self.idle_timeout = idle_timeout
        self.warmup_blocks = warmup_blocks
        self.profiler = StreamProfiler(profile_dir, log)
        self.models: EncoderModels | None = None
        self.text_encoder: TextEncoder | None = None  # text-to-video configs: prompts instead of images
        self.clips: ClipEncoder | None = None  # configs that continue videos: their clips
        self.trimmer = HeapTrimmer()  # a clip (up to 32 MiB, received in 1 MiB chunks) leaves free heap behind
        self.text_to_video = dit_config(cfg).text_dim is not None

    async def load(self) -> None:
        """Build and warm up the models off the event loop (the health service reports NOT_SERVING meanwhile)."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        if self.text_to_video:
            text_encoder = await loop.run_in_executor(None, build_text_encoder, self.cfg)
            await loop.run_in_executor(None, text_encoder, ["warm-up"])
            if "conditioning" in self.cfg:
                self.clips = await loop.run_in_executor(None, ClipEncoder, self.cfg)
            self.text_encoder = text_encoder
            log_event(log, "models loaded", mode=str(self.cfg.mode), device=str(text_encoder.device),
                      seconds=round(time.perf_counter() - started, 3))
            return
        models = await loop.run_in_executor(None, EncoderModels.build, self.cfg)
        await loop.run_in_executor(None, models.warm_up, self.warmup_blocks)
        self.models = models
        log_event(log, "models loaded", mode=models.mode, device=str(models.device),
                  warmup_blocks=self.warmup_blocks, seconds=round(time.perf_counter() - started, 3))

    async def terminate(self) -> None:
        await self.slots.terminate()

    async def Encode(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await run_call(self._encode(Requests(context), context), context, self.metrics, log, "Encode")

    async def _encode(self, requests, context: grpc.aio.ServicerContext) -> None:
        self.slots.check_open(loaded=self.models is not None or self.text_encoder is not None)
        first = await opening_request(requests, self.idle_timeout, self.metrics,
                                      "an `image`, `prompt` or `video` request")
        kind, expected = first.WhichOneof("request"), "prompt" if self.text_to_video else "image"
        if kind == "video" and self.clips is not None:
            await self._encode_video(first.video, requests, context)
            return
        if kind in ("image", "prompt", "video") and kind != expected:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this encoder serves {self.cfg.family} ({self.cfg.mode}), which takes `{expected}` "
                               f"requests, not `{kind}`: run encoder and decoder with the same config")
        request = require_kind(first, expected)
        if self.text_to_video:
            await self._encode_prompt(request, context)
            return
        self._check(request)
        with self.slots.slot():
            stream = _EncodeStream(self, request, context)
            try:
                await run_together(stream.send_all(), stream.read_credits(requests))
            finally:
                stream.close()

    async def _encode_prompt(self, request: encoder_pb2.PromptConditionRequest,
                             context: grpc.aio.ServicerContext) -> None:
        """A text-to-video stream: `ready`, the prompt's text context once, then the call ends."""
        if request.mode != str(self.cfg.mode):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"this encoder serves mode {self.cfg.mode!r}, "
                                                                    f"not {request.mode!r}")
        with self.slots.slot():
            started = time.perf_counter()
            try:
                encoded = await asyncio.get_running_loop().run_in_executor(None, self.text_encoder, [request.prompt])
            except ValueError as e:
                raise ServiceError(_INVALID, f"prompt rejected: {e}") from None
            messages = await asyncio.get_running_loop().run_in_executor(
                None, _pack, encoder_pb2.CONDITION_KIND_PROMPT_EMBEDS, 0, "prompt_embeds", encoded.context)
            self.metrics.encoder_request_seconds.labels(request="open").observe(time.perf_counter() - started)
            log_event(log, "prompt encoded", session_id=request.session_id, tokens=encoded.lengths[0],
                      tokens_dropped=encoded.truncated[0], seconds=round(time.perf_counter() - started, 4))
            ready = encoder_pb2.EncodeReady(mode=request.mode, transport=encoder_pb2.TENSOR_TRANSPORT_GRPC,
                                            prompt_tokens_dropped=encoded.truncated[0])
            for message in [encoder_pb2.EncodeResponse(ready=ready), *messages]:
                await write_with_timeout(context, message, self.metrics, self.idle_timeout)

    async def _encode_video(self, first: encoder_pb2.VideoConditionChunk, requests,
                            context: grpc.aio.ServicerContext) -> None:
        """A clip's stream: its chunks, `ready` once it decoded (saying how many latent frames follow), then its
        conditioning latents one block per tensor; then the call ends."""
        if first.mode != str(self.cfg.mode):
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"this encoder serves mode {self.cfg.mode!r}, "
                                                                    f"not {first.mode!r}")
        with self.slots.slot():
            try:
                await self._encode_clip(first, requests, context)
            finally:
                self.trimmer.soon()  # whatever the outcome, the clip's memory goes back to the system

    async def _encode_clip(self, first: encoder_pb2.VideoConditionChunk, requests,
                           context: grpc.aio.ServicerContext) -> None:
        """Receive, decode and encode the clip; send `ready`, then its latents."""
        loop = asyncio.get_running_loop()
        clip = await receive_clip(first, requests, self.idle_timeout, self.metrics)
        started = time.perf_counter()
        try:
            pixels, latent_frames = await loop.run_in_executor(None, self.clips.decode, clip)
        except ValueError as e:
            raise ServiceError(_INVALID, f"clip rejected: {e}") from None
        del clip
        ready = encoder_pb2.EncodeReady(mode=first.mode, latent_frames_per_block=self.clips.frames_per_block,
                                        transport=encoder_pb2.TENSOR_TRANSPORT_GRPC,
                                        video_latent_frames=latent_frames)
        await write_with_timeout(context, encoder_pb2.EncodeResponse(ready=ready), self.metrics,
                                 self.idle_timeout)
        blocks = await loop.run_in_executor(None, self.clips.encode, pixels)
        del pixels
        for b, block in enumerate(blocks):
            for message in await loop.run_in_executor(None, _pack, encoder_pb2.CONDITION_KIND_VIDEO_LATENTS, b,
                                                      "video_latents", block):
                await write_with_timeout(context, message, self.metrics, self.idle_timeout)
        self.metrics.encoder_request_seconds.labels(request="video").observe(time.perf_counter() - started)
        log_event(log, "clip encoded", session_id=first.session_id, latent_frames=latent_frames,
                  seconds=round(time.perf_counter() - started, 4))

    def _check(self, request: encoder_pb2.ImageConditionRequest) -> None:
        models = self.models
        mismatch = grpc.StatusCode.FAILED_PRECONDITION  # the two services run different configs
        if request.mode != models.mode:
            raise ServiceError(mismatch, f"this encoder serves mode {models.mode!r}, not {request.mode!r}")
        if (request.height, request.width) != (models.height, models.width):
            raise ServiceError(mismatch, f"this encoder makes {models.height}x{models.width} conditions, the "
                                         f"request asks for {request.height}x{request.width}: run encoder and "
                                         "decoder with the same config")
        limit = int(self.cfg.limits.max_blocks)
        if not 1 <= request.max_blocks <= limit:
            raise ServiceError(_INVALID, f"max_blocks must be in [1, {limit}] (this config's limit), got "
                                         f"{request.max_blocks}")
        if request.initial_credits > request.max_blocks:
            raise ServiceError(_INVALID, f"initial_credits {request.initial_credits} exceeds max_blocks "
                                         f"{request.max_blocks}")
        transports = set(request.accepted_transports)
        if transports and not transports & {encoder_pb2.TENSOR_TRANSPORT_GRPC,
                                            encoder_pb2.TENSOR_TRANSPORT_UNSPECIFIED}:
            raise ServiceError(_INVALID, "this encoder sends tensors over gRPC only; accept TENSOR_TRANSPORT_GRPC")


def _pack(kind: int, block_index: int, name: str, tensor: torch.Tensor) -> list[encoder_pb2.EncodeResponse]:
    """Response messages of one condition tensor (runs on a worker: the host copy may wait for the device)."""
    return [encoder_pb2.EncodeResponse(tensor=encoder_pb2.ConditionTensor(kind=kind, block_index=block_index,
                                                                          chunk=chunk))
            for chunk in pack_tensor(name, tensor)]


def _encode_block(session, b: int) -> tuple[list[encoder_pb2.EncodeResponse], float]:
    """Encode and pack the next block (on a worker; the host copy waits for the device); also its duration."""
    started = time.perf_counter()
    with record_function(f"encode_block_{b}"):
        messages = _pack(encoder_pb2.CONDITION_KIND_COND_CONCAT, b, "cond_concat", session.next_block())
    return messages, time.perf_counter() - started


class _EncodeStream:
    """State of one Encode stream: the engine's ConditionSession plus credit-based flow control."""

    def __init__(self, service: ConditionEncoderService, request: encoder_pb2.ImageConditionRequest,
                 context: grpc.aio.ServicerContext):
        self.service = service
        self.request = request
        self.context = context
        self.metrics = service.metrics
        self.name = f"encode-{request.session_id or id(self)}"
        self.lane = WorkerLane(self.name[:16])
        self.profiler: torch.profiler.profile | None = None
        self.session = None
        self.credits = request.initial_credits
        self.granted = False  # a credit grant arrived: the decoder's first block is out, prefetch may start
        self.ready: dict[int, list[encoder_pb2.EncodeResponse]] = {}
        self.sent = 0
        self.decoder_done = False  # the decoder half-closed: no more credit will come
        self.changed = asyncio.Condition()
        self.started = time.perf_counter()  # the stream's open and block 0's log events count from here

    async def _send(self, message: encoder_pb2.EncodeResponse) -> None:
        await write_with_timeout(self.context, message, self.metrics, self.service.idle_timeout)

    def _open(self) -> None:
        self.profiler = self.service.profiler.start(self.name)
        with record_function("open_session"):
            self.session = self.service.models.open_session(load_image(self.request.image))

    async def send_all(self) -> None:
        request, models = self.request, self.service.models
        started = self.started
        try:
            await self.lane.run(self._open)
        except ValueError as e:
            raise ServiceError(_INVALID, f"conditioning image rejected: {e}") from None
        self.metrics.encoder_request_seconds.labels(request="open").observe(time.perf_counter() - started)
        log_event(log, "stream opened", session_id=request.session_id, max_blocks=request.max_blocks,
                  open_seconds=round(time.perf_counter() - started, 4))
        await self._send(encoder_pb2.EncodeResponse(ready=encoder_pb2.EncodeReady(
            mode=models.mode, latent_frames_per_block=models.frames_per_block, max_blocks=request.max_blocks,
            transport=encoder_pb2.TENSOR_TRANSPORT_GRPC)))
        for message in await self.lane.run(_pack, encoder_pb2.CONDITION_KIND_VISUAL_CONTEXT, 0, "visual_context",
                                           self.session.visual_context):
            await self._send(message)
        await run_together(self._send_blocks(), self._compute_blocks())
        log_event(log, "stream finished", session_id=request.session_id, blocks=self.sent)

    async def _until(self, predicate, what: str) -> bool:
        """Wait for credit; False if the decoder closed its side and will grant none. A decoder that grants no
        credit for the idle timeout is dropped."""
        async def wait() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: predicate() or self.decoder_done)
        try:
            await within(wait(), self.service.idle_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the decoder granted no credit for "
                                                                  f"{self.service.idle_timeout:g} s ({what})") from None
        return predicate()

    async def _compute_blocks(self) -> None:
        for b in range(self.request.max_blocks):
            if not await self._until(lambda: b < self.credits + self.service.prefetch * self.granted,
                                     f"to compute block {b}"):
                return
            started = time.perf_counter()
            messages, encode_seconds = await self.lane.run(_encode_block, self.session, b)
            self.metrics.block_stage_seconds.labels(stage="encode").observe(encode_seconds)
            self.metrics.encoder_request_seconds.labels(request="block").observe(time.perf_counter() - started)
            if b == 0:  # the first frame's path (benchmarks/services.py reads it)
                self._log_since_start("first block encoded", encode_seconds=round(encode_seconds, 4))
            async with self.changed:
                self.ready[b] = messages
                self.changed.notify_all()

    async def _send_blocks(self) -> None:
        for b in range(self.request.max_blocks):
            if not await self._until(lambda: b < self.credits and b in self.ready, f"to send block {b}"):
                return
            for message in self.ready.pop(b):
                await self._send(message)
            if b == 0:
                self._log_since_start("first block sent")
            self.sent += 1
            self.metrics.blocks_served.inc()

    def _log_since_start(self, event: str, **fields: Any) -> None:
        log_event(log, event, session_id=self.request.session_id,
                  since_start=round(time.perf_counter() - self.started, 4), **fields)

    async def read_credits(self, requests) -> None:
        async for message in requests:
            self.metrics.bytes_received.inc(message.ByteSize())
            kind = message.WhichOneof("request")
            if kind != "credit":
                raise ServiceError(_INVALID, f"after `image` only `credit` requests are allowed, got `{kind}`")
            blocks = message.credit.blocks
            if blocks < 1 or self.credits + blocks > self.request.max_blocks:
                raise ServiceError(_INVALID, f"credit of {blocks} blocks: grants must be at least 1 and add up to "
                                             f"at most max_blocks {self.request.max_blocks} (granted so far: "
                                             f"{self.credits})")
            async with self.changed:
                self.credits += blocks
                self.granted = True
                self.changed.notify_all()
        async with self.changed:
            self.decoder_done = True
            self.changed.notify_all()

    def close(self) -> None:
        """Free the session's state once the work in flight is done (on the lane, which may still be using it).
        Synchronous, so that a second cancellation of the call cannot skip it."""
        self.lane.close(self._free)

    def _free(self) -> None:
        try:
            if self.session is not None:
                self.session.close()
                self.session = None
        finally:
            self.service.profiler.finish(self.profiler, self.name)
            self.profiler = None
