"""Decoder-side client of the condition-encoder service.

One `EncoderClient` (one gRPC channel) per decoder process; one `ConditionFeed` (one Encode stream) per session.
The channel reconnects by itself with a short backoff, so sessions opened after an encoder restart succeed
again; a session whose encoder is unreachable fails with UNAVAILABLE after `connect_timeout` seconds.
"""
from __future__ import annotations

import asyncio
import time

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..serving.aio import within
from ..serving.errors import ServiceError, status_from_rpc_error
from ..serving.metrics import ServiceMetrics
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc
from ..wire import DEFAULT_MAX_CHUNK_BYTES, TensorAssembler, WireFormatError

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["ConditionEncoderService"].full_name

_CHANNEL_OPTIONS = [
    # Reconnect quickly after an encoder restart instead of backing off for minutes.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # Spread Encode streams over every address the target resolves to (e.g. `dns:///encoder:50052`, a headless
    # Service listing each encoder pod); the default pick_first would pin every session to one encoder.
    ("grpc.lb_policy_name", "round_robin"),
    ("grpc.max_receive_message_length", 4 * DEFAULT_MAX_CHUNK_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class EncoderClient:
    def __init__(self, address: str, metrics: ServiceMetrics, *, connect_timeout: float = 5.0,
                 request_timeout: float = 60.0, window: int = 2):
        if window < 1:
            raise ValueError(f"the credit window must be at least 1 block, got {window}")
        self.address = address
        self.metrics = metrics
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.window = window
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
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

    async def open(self, session_id: str, mode: str, image: bytes, height: int, width: int, max_blocks: int
                   ) -> ConditionFeed:
        """Open the Encode stream of a session and wait for the encoder to accept the image."""
        try:
            await within(self._channel.channel_ready(), self.connect_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                               f"the encoder service at {self.address} is not reachable (waited "
                               f"{self.connect_timeout:g} s); it may be restarting, retry shortly") from None
        request = encoder_pb2.ImageConditionRequest(
            session_id=session_id, mode=mode, image=image, height=height, width=width, max_blocks=max_blocks,
            initial_credits=min(self.window, max_blocks), accepted_transports=[encoder_pb2.TENSOR_TRANSPORT_GRPC])
        feed = ConditionFeed(self, self._stub.Encode(), max_blocks)
        try:
            await feed.start(request)
        except BaseException:
            feed.close()
            raise
        return feed

    async def close(self) -> None:
        await self._channel.close()


class ConditionFeed:
    """The condition tensors of one session as they arrive: `visual_context()` once, then `block(b)` in order.
    Taking block b grants the encoder one more credit, so it stays `window` blocks ahead of the session."""

    def __init__(self, client: EncoderClient, call: grpc.aio.StreamStreamCall, max_blocks: int):
        self.client = client
        self.call = call
        self.max_blocks = max_blocks
        self._visual_context: torch.Tensor | None = None
        self._blocks: dict[int, torch.Tensor] = {}
        self._failure: ServiceError | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task | None = None
        self._opened_at = 0.0

    async def start(self, request: encoder_pb2.ImageConditionRequest) -> None:
        self._opened_at = time.perf_counter()
        try:
            await self.call.write(encoder_pb2.EncodeRequest(image=request))
            first = await within(self.call.read(), self.client.request_timeout)
        except grpc.RpcError as e:
            raise status_from_rpc_error(e, f"encoder service at {self.client.address}") from None
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder at {self.client.address} did not answer "
                                                            f"within {self.client.request_timeout:g} s") from None
        if first is grpc.aio.EOF or first.WhichOneof("response") != "ready":
            raise ServiceError(grpc.StatusCode.INTERNAL, "the encoder did not start its stream with `ready`")
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assembler = TensorAssembler()
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    return
                part = message.tensor
                done = assembler.add(part.chunk)
                if done is None:
                    continue
                async with self._changed:
                    if part.kind == encoder_pb2.CONDITION_KIND_VISUAL_CONTEXT:
                        self._visual_context = done[1]
                    elif part.kind == encoder_pb2.CONDITION_KIND_COND_CONCAT:
                        self._blocks[part.block_index] = done[1]
                    else:
                        raise WireFormatError(f"unknown condition kind {part.kind}")
                    self._changed.notify_all()
        except grpc.RpcError as e:
            failure = status_from_rpc_error(e, "the encoder stream")
        except WireFormatError as e:
            failure = ServiceError(grpc.StatusCode.INTERNAL, f"the encoder sent a malformed tensor: {e}")
        async with self._changed:
            self._failure = failure
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

    async def visual_context(self) -> torch.Tensor:
        await self._wait(lambda: self._visual_context is not None, "the CLIP tokens")
        self.client.metrics.encoder_request_seconds.labels(request="open").observe(
            time.perf_counter() - self._opened_at)
        return self._visual_context

    async def block(self, b: int) -> torch.Tensor:
        """The cond_concat of block b (blocks are taken in order, each once)."""
        started = time.perf_counter()
        await self._wait(lambda: b in self._blocks, f"the condition of block {b}")
        self.client.metrics.encoder_request_seconds.labels(request="block").observe(time.perf_counter() - started)
        if b + self.client.window < self.max_blocks:
            try:
                await self.call.write(encoder_pb2.EncodeRequest(credit=encoder_pb2.CreditGrant(blocks=1)))
            except grpc.RpcError as e:
                raise status_from_rpc_error(e, "the encoder stream") from None
        return self._blocks.pop(b)

    def close(self) -> None:
        """End the stream (the encoder frees the session's state)."""
        if self._reader is not None:
            self._reader.cancel()
        self.call.cancel()
