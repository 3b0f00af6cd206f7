"""Decoder-side client of `ConditionEncoderService.EncodePairs`: one `PairFeed` (one stream) per client clip.

The channel, its health check and its security are the `EncoderClient`'s (one per decoder process). As in the
image path, the decoder trusts nothing the encoder sends: each batch must be the one due, hold the tensors of
its payload in order with the names, dtypes and shapes the stream expects (checked from each tensor's header,
before anything is allocated) and finite values; a stream that breaks these rules fails the clip with
INTERNAL, one that fails or ends early with UNAVAILABLE.

With CUDA IPC (offered in `start.cuda_ipc`, chosen by the encoder in `ready.cuda_ipc`), the ring is checked against
the slot size computed here before it is mapped, each batch's slot header against the payload's spec, and a batch
is copied out of its slot as it arrives; taking it returns the slot (the credit) once the copy is complete.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import grpc
import torch

from ..engine.interpolation import TensorSpec, payload_spec
from ..models.eden import EdenConfig, PairGeometry
from ..serving.aio import within
from ..serving.errors import ServiceError
from ..wire import TensorAssembler, WireFormatError, cuda_ipc
from worldstream.v1 import interpolation_pb2, pair_encoder_pb2
from .client import EncoderClient, EncoderStream
from .pairs import payload_name, payload_value, slot_tensors


@dataclass(frozen=True)
class ReceivedBatch:
    """One batch's payload as it arrived."""
    index: int
    pairs: int
    tensors: dict[str, torch.Tensor]
    encode_seconds: float  # the encoder's work
    transfer_seconds: float  # from the encoder starting to send it to the last chunk here (one host's clock)
    payload_bytes: int
    slot_copy: cuda_ipc.SlotCopy | None = None  # CUDA IPC: the copy of `tensors` out of the encoder's slot


class PairEncoderClient(EncoderClient):
    """The decoder's encoder channel, opening frame-pair streams."""

    async def open_pairs(self, start: pair_encoder_pb2.PairStreamStart, cfg: EdenConfig,
                         device: torch.device) -> PairFeed:
        """Open the EncodePairs stream of a clip and wait for the encoder's `ready`; `device` is the decoder's (where
        CUDA IPC payloads are copied to, if `start` offers it)."""
        return await self._started(lambda: PairFeed(self, self._stub.EncodePairs(metadata=self._metadata), start,
                                                    cfg, device), start)


class PairFeed(EncoderStream):
    """The payloads of one clip's batches as they arrive (`batch(b)`, in order), and the clip's frames on their way
    to the encoder (`send_frame`, `finish`). Taking batch b grants one more batch of credit: the encoder then
    receives the frames of batch b + window."""

    def __init__(self, client: PairEncoderClient, call: grpc.aio.StreamStreamCall,
                 start: pair_encoder_pb2.PairStreamStart, cfg: EdenConfig, device: torch.device):
        super().__init__(client, call, "pair stream")
        self.batch_size = start.batch
        self.payload = payload_name(start.payload)
        self.geometry = PairGeometry(start.height, start.width, cfg.patch_size)
        self.cfg = cfg
        self.device = device
        self._offered_cuda_ipc = start.HasField("cuda_ipc")
        self._ring_slots = start.initial_credits  # one slot per batch of initial credit
        self._slots: cuda_ipc.SlotReader | None = None  # the encoder's ring, mapped (CUDA IPC)
        self._granted = start.initial_credits
        self._frames_sent = 0
        self._total_pairs: int | None = None  # known once the clip's last frame was sent
        self._received: dict[int, ReceivedBatch] = {}
        self._next = 0  # the batch due from the encoder
        self._failure: ServiceError | None = None
        self._changed = asyncio.Condition()
        self._writing = asyncio.Lock()  # frames and credits share the request stream

    async def start(self, start: pair_encoder_pb2.PairStreamStart) -> None:
        ready = await self._ready(pair_encoder_pb2.EncodePairsRequest(start=start))
        if (ready.payload, ready.batch) != (payload_value(self.payload), self.batch_size):
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder's pair stream has payload {ready.payload} "
                                                         f"and batch {ready.batch}, not what was asked")
        if ready.HasField("cuda_ipc"):
            await self._map_ring(ready.cuda_ipc)
        self._reader = asyncio.create_task(self._read())

    @property
    def cuda_ipc(self) -> bool:
        """Whether the payloads arrive through CUDA IPC."""
        return self._slots is not None

    async def _map_ring(self, ring) -> None:
        """Check the encoder's ring (only if this decoder offered CUDA IPC) and map it, off the event loop."""
        try:
            if not self._offered_cuda_ipc:
                raise WireFormatError("it chose CUDA IPC, which this decoder did not offer")
            _, slot_bytes = cuda_ipc.layout(slot_tensors(self.payload, self.batch_size, self.geometry, self.cfg))
            self._slots = await asyncio.get_running_loop().run_in_executor(
                None, cuda_ipc.SlotReader, ring, self.device, slot_bytes, self._ring_slots)
        except WireFormatError as e:
            raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} broke the pair "
                                                         f"stream's rules: {e}") from None

    def _refusal(self, error: grpc.RpcError, what: str) -> ServiceError:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return ServiceError(grpc.StatusCode.INTERNAL, f"the {what} does not serve frame pairs: run it with this "
                                                          "decoder's (eden) config")
        return super()._refusal(error, what)

    def close(self) -> None:
        super().close()
        if self._slots is not None:  # unmapping waits for the device: not on the event loop
            slots, self._slots = self._slots, None
            asyncio.get_running_loop().run_in_executor(None, slots.close)

    # -- towards the encoder --

    async def send_frame(self, data: bytes) -> None:
        """Forward the clip's next frame once its batch has credit (the caller reads no further meanwhile)."""
        index = self._frames_sent
        await self._until(lambda: index <= self._granted * self.batch_size or self._failure is not None)
        if self._failure is not None:
            raise self._failure
        async with self._changed:
            self._frames_sent += 1  # first: the batch it completes may arrive before the write returns
            self._changed.notify_all()
        await self._write(pair_encoder_pb2.EncodePairsRequest(frame=interpolation_pb2.ClipFrame(data=data)))

    async def finish(self) -> None:
        """The clip ends with the frames sent so far: half-close."""
        self._total_pairs = max(0, self._frames_sent - 1)
        async with self._writing:
            try:
                await self.call.done_writing()
            except Exception as e:
                await self._fail(self._stream_failure(e))
        async with self._changed:
            self._changed.notify_all()

    async def _write(self, message: pair_encoder_pb2.EncodePairsRequest) -> None:
        async with self._writing:
            try:
                await self.call.write(message)
            except Exception as e:
                await self._fail(self._stream_failure(e))
                raise self._failure from None

    async def _grant(self) -> None:
        if self._total_pairs is not None:
            return  # every frame is sent (and the request stream closed)
        async with self._changed:
            self._granted += 1  # first: a frame may wait for it
            self._changed.notify_all()
        try:
            await self._write(pair_encoder_pb2.EncodePairsRequest(credit=pair_encoder_pb2.PairCredit(batches=1)))
        except ServiceError:
            pass  # the failure is the stream's; the batches already here stay usable

    # -- from the encoder --

    async def batch(self, b: int) -> ReceivedBatch | None:
        """The payload of batch b (batches are taken in order, each once); None once the clip has no batch b."""
        def ready() -> bool:
            return b in self._received or self._failure is not None or self._past_end(b)
        # The client's pace is not the encoder's fault: its time starts once the batch's frames are sent.
        last_frame = (b + 1) * self.batch_size
        await self._until(lambda: self._frames_sent > last_frame or self._total_pairs is not None or ready())
        try:
            await within(self._until(ready), self.client.request_timeout)
        except asyncio.TimeoutError:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder did not deliver batch {b} within "
                                                            f"{self.client.request_timeout:g} s") from None
        if b in self._received:
            batch = self._received.pop(b)
            if batch.slot_copy is not None:
                await batch.slot_copy.wait()  # the slot is returned with the credit: the copy must be complete
                if not batch.slot_copy.finite:
                    raise ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} broke the "
                                                                 f"pair stream's rules: batch {b} holds NaN or "
                                                                 "infinite values")
            await self._grant()
            return batch
        if self._past_end(b):
            return None
        raise self._failure

    def _past_end(self, b: int) -> bool:
        return self._total_pairs is not None and b * self.batch_size >= self._total_pairs

    async def _until(self, predicate) -> None:
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def _fail(self, failure: ServiceError) -> None:
        async with self._changed:
            self._failure = self._failure or failure
            self._changed.notify_all()

    def _stream_failure(self, error: Exception) -> ServiceError:
        if isinstance(error, grpc.RpcError):
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:  # the client's frame: its message says which
                return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, error.details())
            cause = f"{error.code().name}: {error.details()}"
        else:
            cause = f"{type(error).__name__}: {error}"
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder's pair stream failed ({cause}); retry later")

    async def _read(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    if self._total_pairs is None or self._next * self.batch_size < self._total_pairs:
                        raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the encoder ended the pair stream after "
                                                                        f"{self._next} batches; retry later")
                    return
                if message.WhichOneof("response") != "batch":
                    raise WireFormatError(f"`{message.WhichOneof('response') or 'an empty response'}` where a batch "
                                          "header is due")
                batch = await self._read_batch(message)
                async with self._changed:
                    self._received[batch.index] = batch
                    self._next += 1
                    self._changed.notify_all()
        except WireFormatError as e:
            failure = ServiceError(grpc.StatusCode.INTERNAL, f"the encoder at {self.client.address} broke the pair "
                                                             f"stream's rules: {e}")
        except ServiceError as e:
            failure = e
        except Exception as e:
            failure = self._stream_failure(e)
        await self._fail(failure)

    async def _read_batch(self, message: pair_encoder_pb2.EncodePairsResponse) -> ReceivedBatch:
        """The tensors that follow a batch header, checked against the payload's spec."""
        header = message.batch
        if header.batch_index != self._next:
            raise WireFormatError(f"batch {header.batch_index} while batch {self._next} is due")
        if not 1 <= header.pairs <= self.batch_size:
            raise WireFormatError(f"a batch of {header.pairs} pairs in a stream of batches of {self.batch_size}")
        last_frame = self._next * self.batch_size + header.pairs
        if last_frame >= self._frames_sent:  # also catches a batch after a short (last) one
            raise WireFormatError(f"batch {self._next} of {header.pairs} pairs before its frames were sent")
        if header.pairs < self.batch_size and last_frame != self._total_pairs:
            raise WireFormatError(f"a short batch of {header.pairs} pairs that is not the clip's last")
        payload_bytes = message.ByteSize()
        tensors: dict[str, torch.Tensor] = {}
        slot_copy = None
        if self._slots is not None:
            slot_message = await self.call.read()
            if slot_message is grpc.aio.EOF or slot_message.WhichOneof("response") != "cuda_ipc":
                raise WireFormatError(f"the CUDA IPC slot of batch {self._next} did not follow its header")
            slot_copy = self._slots.read(slot_message.cuda_ipc,
                                         slot_tensors(self.payload, header.pairs, self.geometry, self.cfg),
                                         slot_due=self._next % self._slots.slots)
            tensors = slot_copy.tensors
            payload_bytes += slot_message.ByteSize()
        else:
            for spec in payload_spec(self.payload, header.pairs, self.geometry, self.cfg):
                tensor, size = await self._read_tensor(spec)
                tensors[spec.name] = tensor
                payload_bytes += size
        transfer = time.time() - header.send_time.ToNanoseconds() / 1e9
        return ReceivedBatch(header.batch_index, header.pairs, tensors, header.encode_seconds, max(0.0, transfer),
                             payload_bytes, slot_copy)

    async def _read_tensor(self, spec: TensorSpec) -> tuple[torch.Tensor, int]:
        if spec.shape is None:  # variable length: bounded, checked once complete
            assembler = TensorAssembler(max_tensor_bytes=spec.max_elements * spec.dtype.itemsize)
        else:
            assembler = TensorAssembler(max_tensor_bytes=math.prod(spec.shape) * spec.dtype.itemsize,
                                        expected={spec.name: (spec.dtype, spec.shape)})
        size = 0
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF or message.WhichOneof("response") != "tensor":
                raise WireFormatError(f"the payload ended before its tensor {spec.name!r} was complete")
            chunk = message.tensor
            if chunk.offset == 0 and chunk.name != spec.name:
                raise WireFormatError(f"tensor {chunk.name[:64]!r} where {spec.name!r} is due")
            size += message.ByteSize()
            done = assembler.add(chunk)
            if done is not None:
                break
        tensor = done[1]
        try:
            spec.check(tensor.dtype, tuple(tensor.shape))
        except ValueError as e:
            raise WireFormatError(str(e)) from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WireFormatError(f"tensor {spec.name!r} holds NaN or infinite values")
        return tensor, size
