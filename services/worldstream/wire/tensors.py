"""Tensor <-> `worldstream.v1.TensorChunk` codec: raw little-endian bytes plus a small header, never pickle.

See `protos/worldstream/v1/tensor.proto` for the chunking rules. Decoding trusts nothing in a chunk: sizes
are checked against the header and against a configurable cap before any memory is allocated.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Iterator, Mapping

import torch

from worldstream.v1 import tensor_pb2

# Largest message of a chunked tensor stream: a sender's limit and a receiver's. Chunks of DEFAULT_MAX_CHUNK_BYTES
# data leave 4 KiB for the header (a name of at most MAX_NAME_BYTES, MAX_NDIM sizes) and an enclosing message.
MAX_MESSAGE_BYTES = 1 << 20
DEFAULT_MAX_CHUNK_BYTES = MAX_MESSAGE_BYTES - (4 << 10)
# Largest tensor a receiver accepts unless told otherwise (a 12-frame 352x640 RGB block is 8.1 MB).
DEFAULT_MAX_TENSOR_BYTES = 256 << 20
MAX_NAME_BYTES = 1024
MAX_NDIM = 16

_TO_WIRE = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_WIRE = {wire: dtype for dtype, wire in _TO_WIRE.items()}

# The wire is little-endian and the codec copies native bytes; refuse to run where that would be wrong.
if sys.byteorder != "little":
    raise ImportError("worldstream.wire supports little-endian hosts only")


class WireFormatError(ValueError):
    """A chunk stream that does not follow the TensorChunk rules (or exceeds the receiver's limits)."""


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as one contiguous row-major byte buffer on the host (at most one copy)."""
    host = tensor.detach().contiguous().cpu()  # contiguous first: a strided device tensor crosses once
    # A byte view works for every dtype, bfloat16 included (numpy has no bfloat16).
    return memoryview(host.reshape(-1).view(torch.uint8).numpy())


def pack_tensor(name: str, tensor: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
                ) -> Iterator[tensor_pb2.TensorChunk]:
    """Split one tensor (any device, any layout) into TensorChunk messages of at most `max_chunk_bytes` data.

    Arguments are checked and a device tensor is copied to the host right away; the chunks are built lazily.
    A contiguous CPU tensor is read in place, so it must not be modified until the iterator is exhausted.
    """
    if not name or len(name.encode()) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {name!r}")
    if tensor.dtype not in _TO_WIRE:
        raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no wire representation")
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    header = tensor_pb2.TensorChunk(name=name, dtype=_TO_WIRE[tensor.dtype], shape=tensor.shape)
    return _chunks(header, _tensor_bytes(tensor), max_chunk_bytes)


def _chunks(header: tensor_pb2.TensorChunk, data: memoryview, max_chunk_bytes: int
            ) -> Iterator[tensor_pb2.TensorChunk]:
    total = len(data)
    header.total_bytes = total
    header.data = bytes(data[:max_chunk_bytes])
    yield header
    for start in range(max_chunk_bytes, total, max_chunk_bytes):
        yield tensor_pb2.TensorChunk(offset=start, data=bytes(data[start:start + max_chunk_bytes]))


def pack_tensors(tensors: Mapping[str, torch.Tensor], max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
                 ) -> Iterator[tensor_pb2.TensorChunk]:
    """Chunks of every tensor of `tensors`, one tensor after another."""
    for name, tensor in tensors.items():
        yield from pack_tensor(name, tensor, max_chunk_bytes)


class _Pending:
    """A tensor whose header has arrived and whose bytes are being filled in."""

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], total_bytes: int):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.buffer = bytearray(total_bytes)
        self.received = 0

    def write(self, data: bytes) -> None:
        end = self.received + len(data)
        if end > len(self.buffer):
            raise WireFormatError(f"tensor {self.name!r}: chunk ends at byte {end}, past total_bytes "
                                  f"{len(self.buffer)}")
        memoryview(self.buffer)[self.received:end] = data
        self.received = end

    @property
    def complete(self) -> bool:
        return self.received == len(self.buffer)

    def tensor(self) -> torch.Tensor:
        if not self.buffer:
            return torch.empty(self.shape, dtype=self.dtype)
        if self.dtype == torch.bool:
            # Any non-zero byte is true; reading other byte values as torch.bool would be undefined.
            return torch.frombuffer(self.buffer, dtype=torch.uint8).ne(0).reshape(self.shape)
        return torch.frombuffer(self.buffer, dtype=self.dtype).reshape(self.shape)


class TensorAssembler:
    """Rebuilds (name, tensor) pairs from TensorChunk messages sent by `pack_tensor` / `pack_tensors`.

    Chunks of one tensor must arrive in order and tensors one after another. Decoded tensors live on the CPU
    and own their (writable) memory. A receiver that knows what it expects passes `expected` (name -> (dtype,
    shape)): any other name, dtype or shape is refused from the header, before its bytes are allocated.
    """

    def __init__(self, max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
                 expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None):
        self.max_tensor_bytes = max_tensor_bytes
        self.expected = None if expected is None else {name: (dtype, tuple(shape))
                                                       for name, (dtype, shape) in expected.items()}
        self._pending: _Pending | None = None

    @property
    def in_progress(self) -> bool:
        """True while a tensor has been started but not completed."""
        return self._pending is not None

    def add(self, chunk: tensor_pb2.TensorChunk) -> tuple[str, torch.Tensor] | None:
        """Consume one chunk; return (name, tensor) when it completes a tensor, else None."""
        if chunk.offset == 0:
            if self._pending is not None:
                raise WireFormatError(f"tensor {self._pending.name!r} is incomplete "
                                      f"({self._pending.received} of {len(self._pending.buffer)} bytes) but a "
                                      f"new tensor {chunk.name[:MAX_NAME_BYTES]!r} started")  # unchecked yet
            self._pending = self._start(chunk)
        else:
            self._continue(chunk)
        self._pending.write(chunk.data)
        if not self._pending.complete:
            return None
        done, self._pending = self._pending, None
        return done.name, done.tensor()

    def assemble(self, chunks: Iterable[tensor_pb2.TensorChunk]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield every tensor of a finite chunk stream; a stream ending mid-tensor is an error."""
        for chunk in chunks:
            result = self.add(chunk)
            if result is not None:
                yield result
        self.finish()

    def finish(self) -> None:
        """Raise if the stream ended in the middle of a tensor."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            raise WireFormatError(f"stream ended inside tensor {pending.name!r}: {pending.received} of "
                                  f"{len(pending.buffer)} bytes received")

    def _start(self, chunk: tensor_pb2.TensorChunk) -> _Pending:
        name = chunk.name
        if not name:
            raise WireFormatError("first chunk of a tensor has no name")
        if len(name.encode()) > MAX_NAME_BYTES:  # also keeps the messages below short
            raise WireFormatError(f"tensor name of {len(name.encode())} bytes; at most {MAX_NAME_BYTES}")
        dtype = _FROM_WIRE.get(chunk.dtype)
        if dtype is None:
            raise WireFormatError(f"tensor {name!r}: unknown or unset dtype {chunk.dtype}")
        shape = tuple(chunk.shape)
        if len(shape) > MAX_NDIM or any(size < 0 for size in shape):
            raise WireFormatError(f"tensor {name!r}: invalid shape {list(shape)}")
        if self.expected is not None:
            if name not in self.expected:
                raise WireFormatError(f"unexpected tensor {name[:64]!r}; expected one of {sorted(self.expected)}")
            if (dtype, shape) != self.expected[name]:
                want_dtype, want_shape = self.expected[name]
                raise WireFormatError(f"tensor {name!r}: {dtype} of shape {list(shape)[:MAX_NDIM]}, expected "
                                      f"{want_dtype} of shape {list(want_shape)}")
        if chunk.total_bytes > self.max_tensor_bytes:
            raise WireFormatError(f"tensor {name!r}: total_bytes {chunk.total_bytes} exceeds the limit of "
                                  f"{self.max_tensor_bytes}")
        expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for hostile shapes
        if expected != chunk.total_bytes:
            raise WireFormatError(f"tensor {name!r}: shape {list(shape)} of {dtype} needs {expected} bytes, "
                                  f"header says total_bytes {chunk.total_bytes}")
        return _Pending(name, dtype, shape, chunk.total_bytes)

    def _continue(self, chunk: tensor_pb2.TensorChunk) -> None:
        pending = self._pending
        if pending is None:
            raise WireFormatError(f"chunk at offset {chunk.offset} arrived with no tensor in progress")
        if chunk.name or chunk.dtype or len(chunk.shape) or chunk.total_bytes:
            raise WireFormatError(f"continuation chunk of tensor {pending.name!r} carries header fields")
        if chunk.offset != pending.received:
            raise WireFormatError(f"tensor {pending.name!r}: chunk offset {chunk.offset}, expected "
                                  f"{pending.received}")
        if not chunk.data:
            raise WireFormatError(f"tensor {pending.name!r}: empty continuation chunk")


def unpack_tensors(chunks: Iterable[tensor_pb2.TensorChunk], max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
                   ) -> dict[str, torch.Tensor]:
    """All tensors of a finite chunk stream, by name; duplicate names are an error."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in TensorAssembler(max_tensor_bytes).assemble(chunks):
        if name in tensors:
            raise WireFormatError(f"tensor {name!r} appears twice")
        tensors[name] = tensor
    return tensors
