"""Decoder-side client of the condition-encoder service.

One `EncoderClient` (one gRPC channel) per decoder process; one `ConditionFeed` (one Encode stream) per session.
The channel reconnects by itself with a short backoff, so sessions opened after an encoder restart succeed
again; a session whose encoder is unreachable fails with UNAVAILABLE after `connect_timeout` seconds.

The decoder trusts nothing the encoder sends: every tensor's name, dtype and shape are checked against what the
session expects from its header, before anything is allocated; a block arrives only within the credit granted
for it; the tensors must be finite. A stream that breaks these rules fails the session with INTERNAL (the
deployment is broken); one that fails or ends early fails it with UNAVAILABLE at once (retry later).
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..serving.aio import within
from ..serving.errors import ServiceError, status_from_rpc_error
from ..serving.metrics import ServiceMetrics
from ..serving.security import ChannelTLS, bearer_metadata, open_channel
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc
from ..wire import MAX_MESSAGE_BYTES, TensorAssembler, WireFormatError

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["ConditionEncoderService"].full_name

_CHANNEL_OPTIONS = [
    # Reconnect quickly after an encoder restart instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Spread Encode streams over every address the target resolves to (e.g. `dns:///encoder:50052`, a headless
    # Service listing each encoder pod); the default pick_first would pin every session to one encoder.
    ("grpc.lb_policy_name", "round_robin"),
    # The encoder sends every tensor in chunks; a larger message breaks the wire format (see `_stream_failure`).
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


_VISUAL_CONTEXT, _PROMPT_EMBEDS, _COND_CONCAT = "visual_context", "prompt_embeds", "cond_concat"
_VIDEO_LATENTS = "video_latents"
VIDEO_CHUNK_BYTES = 1 << 20  # the most clip bytes per `video` request
_TENSOR_NAMES = {encoder_pb2.CONDITION_KIND_VISUAL_CONTEXT: _VISUAL_CONTEXT,
                 encoder_pb2.CONDITION_KIND_PROMPT_EMBEDS: _PROMPT_EMBEDS,
                 encoder_pb2.CONDITION_KIND_COND_CONCAT: _COND_CONCAT}


@dataclass(frozen=True)
class ConditionSpec:
    """The condition tensors a session consumes: their dtype and shapes by name (`DecoderModels.condition_shapes`):
    a context (`visual_context` or `prompt_embeds`), once, and `cond_concat` per block where the model takes one."""
    dtype: torch.dtype
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, models) -> ConditionSpec:
        """The spec of a DecoderModels: its config's dtype, which the encoder (same config) computes in."""
        from ..engine.builders import resolve_dtype

        return cls(resolve_dtype(models.cfg.dtype), dict(models.condition_shapes()))

    @property
    def context(self) -> str:
        return _PROMPT_EMBEDS if _PROMPT_EMBEDS in self.shapes else _VISUAL_CONTEXT

    @property
    def per_block(self) -> bool:
        return _COND_CONCAT in self.shapes

    def expected(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {name: (self.dtype, shape) for name, shape in self.shapes.items()}


@dataclass(frozen=True)
class ClipSpec:
    """The conditioning latents of a clip a session takes: float32 blocks of `block_shape` [1, z, frames per block,
    h, w], at most `max_latents` latent frames in all."""
    block_shape: tuple[int, ...]
    max_latents: int

    @classmethod
    def of(cls, models) -> ClipSpec:
        """The spec of a DecoderModels whose config continues videos."""
        return cls((1, *models.latent_shape[:1], models.frames_per_block, *models.latent_shape[1:]),
                   int(models.cfg.conditioning.max_latents))


class EncoderClient:
    def __init__(self, address: str, metrics: ServiceMetrics, *, connect_timeout: float = 5.0,
                 request_timeout: float = 60.0, window: int = 2, tls: ChannelTLS | None = None,
                 token: str | None = None):
        if window < 1:
            raise ValueError(f"the credit window must be at least 1 block, got {window}")
        self.address = address
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.window = window
        self._metadata = bearer_metadata(token)
        self._channel = open_channel(address, tls, _CHANNEL_OPTIONS)
        self._stub = encoder_pb2_grpc.ConditionEncoderServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def serving(self, timeout: float) -> bool:
        """Whether the encoder answers its health check with SERVING within `timeout` seconds (the decoder's
        readiness; checked on the sessions' own channel, so it sees what they would see)."""
        request = health_pb2.HealthCheckRequest(service=ENCODER_SERVICE)
        try:
            reply = await self._health.Check(request, timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def open(self, session_id: str, mode: str, image: bytes, height: int, width: int, max_blocks: int,
                   spec: ConditionSpec) -> ConditionFeed:
        """Open the Encode stream of a session and wait for the encoder to accept the image; the stream must
        deliver the tensors of `spec`."""
        request = encoder_pb2.ImageConditionRequest(
            session_id=session_id, mode=mode, image=image, height=height, width=width, max_blocks=max_blocks,
            initial_credits=1, accepted_transports=[encoder_pb2.TENSOR_TRANSPORT_GRPC])
        return await self._open(encoder_pb2.EncodeRequest(image=request), max_blocks, request.initial_credits, spec)

    async def open_prompt(self, session_id: str, mode: str, prompt: str, spec: ConditionSpec) -> ConditionFeed:
        """Open the Encode stream of a text-to-video session: its prompt's text context, nothing per block."""
        request = encoder_pb2.PromptConditionRequest(session_id=session_id, mode=mode, prompt=prompt)
        return await self._open(encoder_pb2.EncodeRequest(prompt=request), 0, 0, spec)

    async def open_video(self, session_id: str, mode: str, video: bytes, spec: ClipSpec) -> ClipFeed:
        """Open the Encode stream of a clip to continue: the clip goes in `video` chunks, its conditioning latents
        come back (`ClipFeed.latents`)."""
        chunks = [encoder_pb2.EncodeRequest(video=encoder_pb2.VideoConditionChunk(
            session_id=session_id, mode=mode, data=video[start:start + VIDEO_CHUNK_BYTES],
            total_bytes=len(video) if start == 0 else 0, last=start + VIDEO_CHUNK_BYTES >= len(video)))
            for start in range(0, len(video), VIDEO_CHUNK_BYTES)]
        return await self._started(lambda: ClipFeed(self, self._stub.Encode(metadata=self._metadata), spec), *chunks)

    async def _open(self, request: encoder_pb2.EncodeRequest, blocks: int, credits: int,
                    spec: ConditionSpec) -> ConditionFeed:
        return await self._started(
            lambda: ConditionFeed(self, self._stub.Encode(metadata=self._metadata), blocks, credits, spec), request)

    async def _started(self, new_feed: Callable[[], F], *start: Any) -> F:
        """A new stream's feed, once the encoder accepted its start. The channel must connect first (UNAVAILABLE
        after `connect_timeout`); a feed whose start fails (or is cancelled) is closed."""
        try:
            await within(self._channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"the encoder service at {self.address} is not reachable (waited "
                               f"{self.connect_timeout:g} s); it may be restarting, retry shortly") from None
        feed = new_feed()
        try:
            await feed.start(*start)
        except BaseException:
            feed.close()
            raise
        return feed

    async def close(self) -> None:
        await self._channel.close()


class EncoderStream:
    """What the decoder's streams to the encoder share: the start (the opening request, then the encoder's
    `ready` within the request timeout), the status of a failure meanwhile, and the end."""

    def __init__(self, client: EncoderClient, call: grpc.aio.StreamStreamCall, name: str):
        self.client = client
        self.call = call
        self.name = name  # what the messages call it ("stream", "pair stream")
        self._reader: asyncio.Task | None = None

    async def _ready(self, *requests: Any) -> Any:
        """Send the opening request (or requests, e.g. a clip's chunks); the encoder's `ready` (the response's
        field)."""
        try:
            for request in requests:
                await self.call.write(request)
            first = await within(self.call.read(), self.client.request_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder at {self.client.address} did not answer "
                                                            f"within {self.client.request_timeout:g} s") from None
        except Exception as e:
            raise await self._opening_failure(e) from None
        if first is grpc.aio.EOF or first.WhichOneof("response") != "ready":
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder did not start its {self.name} with `ready`")
        return first.ready

    async def _opening_failure(self, error: Exception) -> ServiceError:
        """The status of a failure while the encoder considers the opening request: its own (the request is
        invalid, it is full, ...) as `_refusal` maps it. A write to a call that has ended raises
        asyncio.InvalidStateError, not the status: then the status is the call's."""
        what = f"encoder service at {self.client.address}"
        if not isinstance(error, grpc.RpcError) and self.call.done():
            code, details = await self.call.code(), await self.call.details()
            if code != grpc.StatusCode.OK:
                error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        if isinstance(error, grpc.RpcError):
            return self._refusal(error, what)
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"the {what} failed ({type(error).__name__}: {error}); "
                                                         "retry later")

    def _refusal(self, error: grpc.RpcError, what: str) -> ServiceError:
        """The status of the encoder's refusal to open the stream."""
        return status_from_rpc_error(error, what)

    def _stream_failure(self, error: Exception) -> ServiceError:
        """The status of any failure of a running stream: UNAVAILABLE (the encoder crashed, restarted, shut down
        or timed out: a new session may succeed). Except a message over the wire format's limit, which only an
        encoder that breaks the format sends (RESOURCE_EXHAUSTED would tell the client the server is full)."""
        if isinstance(error, grpc.RpcError):
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                return ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} sent a message "
                                                              f"over the wire format's {MAX_MESSAGE_BYTES} bytes "
                                                              f"({error.details()}); are both services one version?")
            cause = f"{error.code().name}: {error.details()}"
        else:
            cause = f"{type(error).__name__}: {error}"
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder stream failed ({cause}); retry later")

    def close(self) -> None:
        """End the stream (the encoder frees its state)."""
        if self._reader is not None:
            self._reader.cancel()
        self.call.cancel()


F = TypeVar("F", bound=EncoderStream)


class ConditionFeed(EncoderStream):
    """The condition tensors of one session as they arrive: `context()` once, then `block(b)` in order (models
    with a per-block condition; `max_blocks` is 0 for the others). The stream opens with the credit of block 0
    alone, so that the encoder computes nothing beside the session's first block (its first frame) when both
    share a GPU; taking block b >= 1 raises the credit to b + `window`, so the encoder stays ahead of the session."""

    def __init__(self, client: EncoderClient, call: grpc.aio.StreamStreamCall, max_blocks: int, credits: int,
                 spec: ConditionSpec):
        super().__init__(client, call, "stream")
        self.max_blocks = max_blocks
        self.spec = spec
        self._granted = credits  # blocks the encoder may have sent so far
        self._received = 0  # cond_concat blocks received: the next one must have this index
        self._context: torch.Tensor | None = None
        self.prompt_tokens_dropped = 0  # what the encoder's `ready` says
        self._blocks: dict[int, torch.Tensor] = {}
        self._failure: ServiceError | None = None
        self._changed = asyncio.Condition()
        self._opened_at = 0.0

    async def start(self, request: encoder_pb2.EncodeRequest) -> None:
        self._opened_at = time.perf_counter()
        self.prompt_tokens_dropped = (await self._ready(request)).prompt_tokens_dropped
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assembler = TensorAssembler(expected=self.spec.expected())
        current: tuple[int, int] | None = None  # (kind, block_index) of the tensor being assembled
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    complete = self._context is not None and self._received == self.max_blocks
                    failure = None if complete else ServiceError(
                        grpc.StatusCode.UNAVAILABLE, f"the encoder ended the stream after {self._received} of "
                                                     f"{self.max_blocks} blocks (context received: "
                                                     f"{self._context is not None}); retry later")
                    break
                if message.WhichOneof("response") != "tensor":
                    raise WireFormatError(f"`{message.WhichOneof('response') or 'an empty response'}` after "
                                          "`ready`; only tensors may follow")
                part = message.tensor
                if part.chunk.offset == 0:
                    self._check_due(part)  # before the assembler allocates the tensor
                    current = (part.kind, part.block_index)
                elif (part.kind, part.block_index) != current:
                    raise WireFormatError(f"a chunk of kind {part.kind}, block {part.block_index} inside the tensor "
                                          f"of kind {current[0] if current else None}, block "
                                          f"{current[1] if current else None}")
                done = assembler.add(part.chunk)
                if done is not None:
                    await self._keep(part, done[1])
        except WireFormatError as e:
            failure = ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} broke the "
                                                             f"stream's rules: {e}")
        except Exception as e:
            failure = self._stream_failure(e)
        if failure is not None:
            async with self._changed:
                self._failure = failure
                self._changed.notify_all()

    def _check_due(self, part: encoder_pb2.ConditionTensor) -> None:
        """A new tensor starts: it must be the one due, and a block only within the credit granted for it."""
        name = _TENSOR_NAMES.get(part.kind)
        if name is None:
            raise WireFormatError(f"unknown condition kind {part.kind}")
        if part.chunk.name != name:
            raise WireFormatError(f"a tensor of kind {name} named {part.chunk.name[:64]!r}")
        if name not in self.spec.shapes:
            raise WireFormatError(f"a {name} tensor, which this session does not take")
        if name == self.spec.context:
            if self._context is not None:
                raise WireFormatError(f"a second {name}")
            return
        if self._context is None:
            raise WireFormatError(f"cond_concat before {self.spec.context}")
        if part.block_index != self._received:
            raise WireFormatError(f"cond_concat of block {part.block_index} while block {self._received} is due")
        if part.block_index >= self._granted:
            raise WireFormatError(f"cond_concat of block {part.block_index} without credit (granted: "
                                  f"{self._granted} blocks)")

    async def _keep(self, part: encoder_pb2.ConditionTensor, tensor: torch.Tensor) -> None:
        if not torch.isfinite(tensor).all():
            raise WireFormatError(f"{_TENSOR_NAMES[part.kind]} of block {part.block_index} holds NaN or infinite "
                                  "values")
        async with self._changed:
            if _TENSOR_NAMES[part.kind] == self.spec.context:
                self._context = tensor
            else:
                self._blocks[part.block_index] = tensor
                self._received += 1
            self._changed.notify_all()

    async def _wait(self, ready, what: str) -> None:
        try:
            await within(self._until(lambda: ready() or self._failure is not None), self.client.request_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"the encoder did not deliver {what} within {self.client.request_timeout:g} s"
                               ) from None
        if not ready():
            raise self._failure

    async def _until(self, predicate) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def context(self) -> torch.Tensor:
        """The session's context: CLIP tokens or the prompt's text context."""
        await self._wait(lambda: self._context is not None, f"the {self.spec.context}")
        self.client.metrics.encoder_request_seconds.labels(request="open").observe(
            time.perf_counter() - self._opened_at)
        return self._context

    async def block(self, b: int) -> torch.Tensor:
        """The cond_concat of block b (blocks are taken in order, each once)."""
        started = time.perf_counter()
        credit = min(b + self.client.window, self.max_blocks) if b else 0
        if credit > self._granted:
            await self._grant(credit - self._granted)
        await self._wait(lambda: b in self._blocks, f"the condition of block {b}")
        self.client.metrics.encoder_request_seconds.labels(request="block").observe(time.perf_counter() - started)
        return self._blocks.pop(b)

    def has_block(self, b: int) -> bool:
        """Whether the cond_concat of block b is here (`block(b)` would not wait)."""
        return b in self._blocks

    async def _grant(self, blocks: int) -> None:
        """More credit. A stream that has failed takes none: the blocks already here stay usable, and the next
        one missing fails with the stream's status."""
        self._granted += blocks  # first: a block may arrive before the write returns
        try:
            await self.call.write(encoder_pb2.EncodeRequest(credit=encoder_pb2.CreditGrant(blocks=blocks)))
        except Exception as e:
            async with self._changed:
                self._failure = self._failure or self._stream_failure(e)
                self._changed.notify_all()


class ClipFeed(EncoderStream):
    """The conditioning latents of a clip, read once they are all needed (before the session's first block): the
    encoder's `ready` says how many latent frames come (whole blocks, within `ClipSpec.max_latents`), then one
    tensor per block follows, in order."""

    def __init__(self, client: EncoderClient, call: grpc.aio.StreamStreamCall, spec: ClipSpec):
        super().__init__(client, call, "clip stream")
        self.spec = spec
        self.blocks = 0

    async def start(self, *chunks: encoder_pb2.EncodeRequest) -> None:
        frames, per_block = (await self._ready(*chunks)).video_latent_frames, self.spec.block_shape[2]
        if not 0 < frames <= self.spec.max_latents or frames % per_block:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} announced {frames} "
                                                         f"latent frames of clip; this deployment takes whole blocks of "
                                                         f"{per_block}, at most {self.spec.max_latents}: do both "
                                                         "services run one config?")
        self.blocks = frames // per_block

    async def latents(self) -> torch.Tensor:
        """The clip's conditioning latents, float32 [1, z, T, h, w]."""
        assembler = TensorAssembler(expected={_VIDEO_LATENTS: (torch.float32, self.spec.block_shape)})
        blocks: list[torch.Tensor] = []
        try:
            while len(blocks) < self.blocks:
                message = await within(self.call.read(), self.client.request_timeout)
                if message is grpc.aio.EOF:
                    raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder ended the clip stream after "
                                                                    f"{len(blocks)} of {self.blocks} blocks; retry later")
                if message.WhichOneof("response") != "tensor":
                    raise WireFormatError(f"`{message.WhichOneof('response') or 'an empty response'}` after `ready`")
                part = message.tensor
                if part.kind != encoder_pb2.CONDITION_KIND_VIDEO_LATENTS or part.block_index != len(blocks):
                    raise WireFormatError(f"a tensor of kind {part.kind}, block {part.block_index}, while the clip's "
                                          f"block {len(blocks)} is due")
                done = assembler.add(part.chunk)
                if done is not None:
                    if not torch.isfinite(done[1]).all():
                        raise WireFormatError(f"clip block {len(blocks)} holds NaN or infinite values")
                    blocks.append(done[1])
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder did not deliver the clip's latents within "
                                                            f"{self.client.request_timeout:g} s") from None
        except WireFormatError as e:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} broke the clip "
                                                         f"stream's rules: {e}") from None
        except ServiceError:
            raise
        except Exception as e:
            raise self._stream_failure(e) from None
        return torch.cat(blocks, dim=2)
