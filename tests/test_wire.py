"""TensorChunk wire codec: bit-exact round trips and rejection of malformed chunk streams."""
from __future__ import annotations

import pytest
import torch

from worldstream.v1 import tensor_pb2
from worldstream.wire import (DEFAULT_MAX_CHUNK_BYTES, TensorAssembler, WireFormatError, pack_tensor,
                              pack_tensors, unpack_tensors)

_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view of the element bits, so NaN payloads and -0.0 compare exactly."""
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8)
    return tensor.contiguous().view(_SAME_SIZE_INT[tensor.element_size()])


def _assert_bit_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(_bits(actual), _bits(expected))


def _round_trip(tensor: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> torch.Tensor:
    # Through the serialized form, as on the network.
    wire = [chunk.SerializeToString() for chunk in pack_tensor("t", tensor, max_chunk_bytes)]
    decoded = unpack_tensors(tensor_pb2.TensorChunk.FromString(raw) for raw in wire)
    assert list(decoded) == ["t"]
    return decoded["t"]


def _sample(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if dtype == torch.bool:
        return torch.rand(5, 7, generator=gen) > 0.5
    if dtype.is_floating_point:
        values = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 1e3
        values[0, :4] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
        return values.to(dtype)
    info = torch.iinfo(dtype)
    values = torch.randint(info.min, info.max, (5, 7), generator=gen, dtype=dtype)
    values[0, 0], values[0, 1] = info.min, info.max
    return values


ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_every_dtype(dtype):
    tensor = _sample(dtype)
    _assert_bit_exact(_round_trip(tensor), tensor)
    _assert_bit_exact(_round_trip(tensor, max_chunk_bytes=3), tensor)  # chunks split elements


def test_decoded_tensor_is_writable_and_owned():
    decoded = _round_trip(torch.arange(6, dtype=torch.float32))
    decoded.add_(1)  # a read-only buffer would have made this unsafe
    assert decoded.tolist() == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded"])
def test_non_contiguous(view):
    base = torch.randn(6, 10, dtype=torch.bfloat16)
    tensor = {"transposed": base.t(), "sliced": base[1::2, 3:9:2],
              "expanded": base[:1].expand(4, 10)}[view]
    assert not tensor.is_contiguous()
    _assert_bit_exact(_round_trip(tensor, max_chunk_bytes=16), tensor)


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (0, 0)])
def test_empty_tensor_is_one_chunk_without_data(shape):
    tensor = torch.empty(shape, dtype=torch.float16)
    chunks = list(pack_tensor("empty", tensor))
    assert len(chunks) == 1 and chunks[0].total_bytes == 0 and chunks[0].data == b""
    _assert_bit_exact(_round_trip(tensor), tensor)


def test_scalar():
    tensor = torch.tensor(-2.5, dtype=torch.float64)
    chunks = list(pack_tensor("s", tensor))
    assert len(chunks) == 1 and list(chunks[0].shape) == []
    _assert_bit_exact(_round_trip(tensor), tensor)


def test_large_tensor_is_split_below_message_limit():
    tensor = torch.randn(3, 1024, 1024)  # 12 MiB
    chunks = list(pack_tensor("big", tensor))
    assert len(chunks) == -(-tensor.numel() * 4 // DEFAULT_MAX_CHUNK_BYTES)
    assert all(chunk.ByteSize() <= 1 << 20 for chunk in chunks)
    assert [chunk.offset for chunk in chunks] == [i * DEFAULT_MAX_CHUNK_BYTES for i in range(len(chunks))]
    assert all(not chunk.name and not chunk.shape for chunk in chunks[1:])
    _assert_bit_exact(unpack_tensors(chunks)["big"], tensor)


def test_many_small_chunks():
    tensor = torch.randint(0, 255, (12, 35, 64, 3), dtype=torch.uint8)
    chunks = list(pack_tensor("frames", tensor, max_chunk_bytes=1000))
    assert len(chunks) == -(-tensor.numel() // 1000)
    _assert_bit_exact(unpack_tensors(chunks)["frames"], tensor)


def test_pack_unpack_dict_and_incremental_assembly():
    tensors = {"cond": torch.randn(1, 20, 3, 4, 8).bfloat16(), "empty": torch.empty(0, 3),
               "step": torch.tensor(3), "mask": torch.tensor([True, False, True])}
    chunks = list(pack_tensors(tensors, max_chunk_bytes=64))
    decoded = unpack_tensors(chunks)
    assert list(decoded) == list(tensors)
    for name, tensor in tensors.items():
        _assert_bit_exact(decoded[name], tensor)
    assembler = TensorAssembler()
    completed = [assembler.add(chunk) for chunk in chunks]
    assert [item[0] for item in completed if item is not None] == list(tensors)
    assert not assembler.in_progress


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dtype"):
        pack_tensor("c", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="name"):
        pack_tensor("", torch.zeros(2))
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        pack_tensor("z", torch.zeros(2), max_chunk_bytes=0)


def _chunks(tensor=None, max_chunk_bytes=8):
    tensor = torch.arange(8, dtype=torch.float32) if tensor is None else tensor
    return list(pack_tensor("x", tensor, max_chunk_bytes))  # 32 bytes -> 4 chunks of 8


def _corrupt(kind: str) -> list:
    chunks = _chunks()
    if kind == "unset dtype":
        chunks[0].dtype = tensor_pb2.DTYPE_UNSPECIFIED
    elif kind == "unknown dtype":
        chunks[0].dtype = 99
    elif kind == "size mismatch":
        chunks[0].total_bytes = 28
    elif kind == "shape mismatch":
        chunks[0].shape[:] = [9]
    elif kind == "negative dim":
        chunks[0].shape[:] = [-1, -8]
    elif kind == "oversize":
        chunks[0].shape[:] = [1 << 40]
        chunks[0].total_bytes = 4 << 40
    elif kind == "out-of-order offset":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    elif kind == "duplicated chunk":
        chunks.insert(2, chunks[1])
    elif kind == "missing chunk":
        del chunks[2]
    elif kind == "truncated stream":
        del chunks[-1]
    elif kind == "overflowing data":
        chunks[-1].data = chunks[-1].data + b"\0"
    elif kind == "header on continuation":
        chunks[1].name = "x"
    elif kind == "continuation without header":
        del chunks[0]
    elif kind == "empty continuation":
        chunks.insert(1, tensor_pb2.TensorChunk(offset=8))
    elif kind == "new tensor before completion":
        chunks[2:2] = _chunks()
    elif kind == "no name":
        chunks[0].name = ""
    elif kind == "duplicate name":
        chunks += _chunks()
    return chunks


CORRUPTIONS = ["unset dtype", "unknown dtype", "size mismatch", "shape mismatch", "negative dim", "oversize",
               "out-of-order offset", "duplicated chunk", "missing chunk", "truncated stream", "overflowing data",
               "header on continuation", "continuation without header", "empty continuation",
               "new tensor before completion", "no name", "duplicate name"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupted_streams_raise(kind):
    with pytest.raises(WireFormatError):
        unpack_tensors(_corrupt(kind))


def test_size_cap_is_configurable_and_checked_before_allocation():
    chunks = _chunks(torch.zeros(1024, dtype=torch.uint8), max_chunk_bytes=512)
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        unpack_tensors(chunks, max_tensor_bytes=1023)
    assert unpack_tensors(chunks, max_tensor_bytes=1024)["x"].numel() == 1024


def test_wire_format_error_is_a_value_error():
    assert issubclass(WireFormatError, ValueError)
