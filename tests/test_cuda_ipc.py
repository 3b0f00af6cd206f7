"""The same-host CUDA IPC data plane (wire/cuda_ipc.py, data_plane.proto).

On any machine: the negotiation falls back to gRPC (CPU, another host, another GPU, FRAMES_JPEG), the messages are
protobuf of raw bytes and numbers (no pickles), and every header is checked before anything is mapped or read.
On a GPU (`pytest -q tests/test_cuda_ipc.py` there): two real processes hand tensors over through a ring of slots
and get identical values, and the interpolation through both services gives the same frames with CUDA IPC as with
gRPC bytes, with only control bytes on the wire.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor

from worldstream.v1 import data_plane_pb2, tensor_pb2
from worldstream.wire import WireFormatError, cuda_ipc

TORCH_SHARE = (0, b"\x02\x00" + bytes(64), 4096, 512, b"/torch_123_456_7", 3, bytes(64), True)  # as torch 2.x's


# ---- negotiation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, local", [
    ("127.0.0.1:50052", True), ("localhost:1", True), ("[::1]:50052", True), ("dns:///localhost:5", True),
    ("ipv4:127.0.0.1:40000", True), ("ipv6:%5B::1%5D:40000", True), ("unix:/run/encoder.sock", True),
    ("unix:///run/encoder.sock", True), ("127.0.0.1", True),
    ("10.0.0.7:50052", False), ("encoder:50052", False), ("dns:///encoder.svc:50052", False),
    ("ipv4:192.168.1.2:40000", False), ("ipv6:%5B2001:db8::1%5D:1", False), ("", False)])
def test_local_addresses(address, local):
    assert cuda_ipc.is_local_address(address) is local


def test_no_offer_and_no_acceptance_without_cuda():
    assert cuda_ipc.offer(torch.device("cpu"), "127.0.0.1:50052") is None
    offered = data_plane_pb2.CudaIpcOffer(device_uuid="GPU-1")
    assert not cuda_ipc.accepts(offered, torch.device("cpu"), "ipv4:127.0.0.1:40000", slots=2)
    assert not cuda_ipc.accepts(None, torch.device("cpu"), "ipv4:127.0.0.1:40000", slots=2)


def test_offered_only_on_one_host_and_accepted_only_on_the_same_gpu(monkeypatch):
    monkeypatch.setattr(cuda_ipc, "supported", lambda: True)
    monkeypatch.setattr(cuda_ipc, "device_uuid", lambda device: f"GPU-{device.index}")
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert cuda_ipc.offer(gpu0, "10.0.0.7:50052") is None  # the encoder is on another host
    offered = cuda_ipc.offer(gpu0, "127.0.0.1:50052")
    assert offered.device_uuid == "GPU-0"
    assert cuda_ipc.accepts(offered, gpu0, "ipv4:127.0.0.1:40000", slots=2)
    assert cuda_ipc.accepts(offered, gpu0, "unix:/run/encoder.sock", slots=cuda_ipc.MAX_RING_SLOTS)
    assert not cuda_ipc.accepts(offered, gpu1, "ipv4:127.0.0.1:40000", slots=2)  # another GPU
    assert not cuda_ipc.accepts(offered, gpu0, "ipv4:10.0.0.9:40000", slots=2)  # a handle never leaves the host
    assert not cuda_ipc.accepts(None, gpu0, "ipv4:127.0.0.1:40000", slots=2)  # not offered
    # one slot per batch of initial credit: a decoder asking for more than the bound gets gRPC
    assert not cuda_ipc.accepts(offered, gpu0, "ipv4:127.0.0.1:40000", slots=cuda_ipc.MAX_RING_SLOTS + 1)


def test_layout_aligns_every_tensor():
    offsets, total = cuda_ipc.layout([("a", torch.float32, (3, 5)), ("b", torch.uint8, (0,)),
                                      ("c", torch.bfloat16, (300,)), ("d", torch.int64, ())])
    assert offsets == [0, 256, 256, 1024] and total == 1280  # 600 bytes of bfloat16 take 768
    assert all(offset % cuda_ipc.ALIGN == 0 for offset in offsets)


# ---- messages: raw bytes, checked --------------------------------------------------------------------------------

def test_messages_hold_only_bytes_and_numbers():
    """No field can carry a pickle that something would load: bytes are handles given to CUDA, never parsed here."""
    allowed = {FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_UINT64,
               FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_BOOL,
               FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE}
    for message in data_plane_pb2.DESCRIPTOR.message_types_by_name.values():
        for field in message.fields:
            assert field.type in allowed, (message.name, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                assert field.message_type.file is data_plane_pb2.DESCRIPTOR
    source = Path(cuda_ipc.__file__).read_text()
    assert not re.search(r"\bpickle\b|torch\.load|ForkingPickler|reduce_tensor", source)


def test_slot_message_of_torchs_share():
    slot = cuda_ipc.slot_message(TORCH_SHARE, 4096)
    parsed = data_plane_pb2.CudaIpcSlot.FromString(slot.SerializeToString())
    assert (parsed.size_bytes, parsed.offset_bytes, parsed.ref_counter, parsed.ref_counter_offset) == (
        4096, 512, b"/torch_123_456_7", 3)
    assert parsed.memory_handle == TORCH_SHARE[1] and parsed.event_sync_required
    cuda_ipc.check_ring(data_plane_pb2.CudaIpcRing(slots=[parsed]), 4096, 1)


@pytest.mark.parametrize("share, message", [
    (TORCH_SHARE[:7], "7 items, not torch 2.x's 8"),
    (TORCH_SHARE[:1] + ("handle",) + TORCH_SHARE[2:], "items of types"),
    (TORCH_SHARE[:2] + (8192,) + TORCH_SHARE[3:], "shared as 8192 bytes")])
def test_another_torch_layout_is_refused(share, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        cuda_ipc.slot_message(share, 4096)


def ring(**changes) -> data_plane_pb2.CudaIpcRing:
    slot = cuda_ipc.slot_message(TORCH_SHARE, 4096)
    for name, value in changes.items():
        setattr(slot, name, value)
    return data_plane_pb2.CudaIpcRing(slots=[slot, cuda_ipc.slot_message(TORCH_SHARE, 4096)])


@pytest.mark.parametrize("changes, slots, message", [
    ({}, 3, "a CUDA IPC ring of 2 slots, expected 3"),
    ({"size_bytes": 1 << 40}, 2, "slot 0 has 1099511627776 bytes, expected 4096"),
    ({"memory_handle": b""}, 2, "a memory handle of 0 bytes"),
    ({"memory_handle": bytes(5000)}, 2, "a memory handle of 5000 bytes"),
    ({"offset_bytes": 1 << 50}, 2, "beyond any allocation"),
    ({"ref_counter": b"/etc/passwd"}, 2, "is not one of torch's"),
    ({"ref_counter": b"/torch_1_2_3/../../x"}, 2, "is not one of torch's"),
    ({"ref_counter_offset": 10_000}, 2, "is not one of torch's"),
    ({"event_handle": bytes(3)}, 2, "an event handle of 3 bytes, expected 64")])
def test_a_bad_ring_is_refused_before_it_is_mapped(changes, slots, message):
    with pytest.raises(WireFormatError, match=re.escape(message)):
        cuda_ipc.check_ring(ring(**changes), 4096, slots)


EXPECTED = [("cond_dit", torch.float32, (2, 2, 4, 8)), ("difference", torch.float32, (2, 1)),
            ("frames", torch.uint8, (3, 3, 32, 32))]


def header(slot: int = 1, **changes) -> data_plane_pb2.CudaIpcTensors:
    offsets, _ = cuda_ipc.layout(EXPECTED)
    tensors = [data_plane_pb2.CudaIpcTensor(name=name, dtype=dtype, shape=shape, offset_bytes=offset)
               for (name, _, shape), dtype, offset in zip(EXPECTED, (tensor_pb2.DTYPE_FLOAT32,) * 2 +
                                                          (tensor_pb2.DTYPE_UINT8,), offsets)]
    for field, value in changes.items():
        index, name = field.split(".")
        if name == "shape":
            del tensors[int(index)].shape[:]
            tensors[int(index)].shape.extend(value)
        else:
            setattr(tensors[int(index)], name, value)
    return data_plane_pb2.CudaIpcTensors(slot=slot, tensors=tensors)


def test_a_good_header_gives_the_offsets():
    offsets = cuda_ipc.check_tensors(header(), EXPECTED, slot_due=1, slot_bytes=16384)
    assert offsets == cuda_ipc.layout(EXPECTED)[0]


@pytest.mark.parametrize("message_of, match", [
    (lambda: header(slot=0), "CUDA IPC slot 0 while slot 1 is due"),
    (lambda: header(slot=7), "CUDA IPC slot 7 while slot 1 is due"),
    (lambda: data_plane_pb2.CudaIpcTensors(slot=1, tensors=header().tensors[:2]), "2 tensors in a CUDA IPC slot"),
    (lambda: header(**{"0.name": "cond_dec"}), "'cond_dec': torch.float32"),
    (lambda: header(**{"0.dtype": tensor_pb2.DTYPE_BFLOAT16}), "torch.bfloat16 of shape [2, 2, 4, 8]"),
    (lambda: header(**{"2.dtype": 99}), "None of shape"),
    (lambda: header(**{"2.shape": [3, 3, 32, 33]}), "of shape [3, 3, 32, 33]"),
    (lambda: header(**{"2.shape": [1 << 40, 1 << 40]}), "expected 'frames'"),
    (lambda: header(**{"1.offset_bytes": 1 << 45}), "at byte 35184372088832, expected 'difference'")])
def test_a_bad_header_is_refused_before_the_slot_is_read(message_of, match):
    with pytest.raises(WireFormatError, match=re.escape(match)):
        cuda_ipc.check_tensors(message_of(), EXPECTED, slot_due=1, slot_bytes=16384)


def test_tensors_larger_than_the_slot_are_refused():
    with pytest.raises(WireFormatError, match="more than a slot's 4096"):
        cuda_ipc.check_tensors(header(), EXPECTED, slot_due=1, slot_bytes=4096)


def test_cpu_pair_stream_falls_back_to_grpc():
    """An encoder on the CPU answers an offer with gRPC bytes (no ring in `ready`)."""
    from worldstream.encoder.pairs import PairEncoderService
    from worldstream.engine.config import load_config
    from worldstream.engine.eden import build_eden_patchify
    from worldstream.serving.metrics import ServiceMetrics
    from worldstream.v1 import interpolation_pb2, pair_encoder_pb2

    cfg = load_config("eden/interpolate_tiny", [])
    service = PairEncoderService(cfg, ServiceMetrics("test_cuda_ipc"), warm_up=False)
    service.patchify = build_eden_patchify(cfg)
    start = pair_encoder_pb2.PairStreamStart(
        stream_id="s", height=64, width=96, payload=interpolation_pb2.PAIR_PAYLOAD_FRAMES, batch=2, initial_credits=2,
        cuda_ipc=data_plane_pb2.CudaIpcOffer(device_uuid="GPU-0"))
    assert not service._checked(start, "ipv4:127.0.0.1:40000").cuda_ipc


def clip(frames: int, height: int = 40, width: int = 72) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], axis=-1)
    return [np.clip(np.roll(base, 3 * t, axis=1) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            for t in range(frames)]


def decoder_transports(stack) -> set[str]:
    """The payload transports the stack's decoder used, from its log."""
    return {json.loads(line)["transport"] for line in stack.decoder.log().splitlines() if '"payload transport"' in line}


def test_services_fall_back_to_grpc_on_the_cpu(tmp_path):
    """transfer.cuda_ipc on a CPU decoder: no offer, the payload travels over gRPC, the clip is served."""
    from worldstream.client.interpolate import interpolate
    from worldstream.serving.processes import ServiceStack

    overrides = ["device=cpu", "transfer.cuda_ipc=true"]
    with ServiceStack("eden/interpolate_tiny", tmp_path, overrides, startup_timeout=120) as stack:
        result = interpolate(stack.address, clip(3), batch=2, payload="frames", frame_encoding="raw", keep=True)
        assert decoder_transports(stack) == {"grpc"}
    assert result.frames.shape == (5, 40, 72, 3)
    assert result.payload_bytes > 3 * 3 * 64 * 96  # the padded frames themselves


# ---- on a GPU: two processes -------------------------------------------------------------------------------------

SLOTS, ROUNDS = 2, 7
ROUND_TENSORS = [("a", torch.float32, (3, 5)), ("b", torch.bfloat16, (7, 9)), ("c", torch.uint8, (2, 3, 40))]
ROUND_BYTES = cuda_ipc.layout(ROUND_TENSORS)[1]


def round_tensors(b: int) -> dict[str, torch.Tensor]:
    """Batch b's tensors (the last one holds a NaN), the same in both processes."""
    generator = torch.Generator().manual_seed(b)
    tensors = {"a": torch.randn(3, 5, generator=generator), "b": torch.randn(7, 9, generator=generator).bfloat16(),
               "c": torch.randint(0, 256, (2, 3, 40), generator=generator, dtype=torch.uint8)}
    if b == ROUNDS - 1:
        tensors["a"][1, 2] = float("nan")
    return tensors


def producer(conn) -> None:
    """The encoder's side, in its own process: only protobuf bytes cross the pipe."""
    ring = cuda_ipc.SlotRing(torch.device("cuda"), ROUND_BYTES, SLOTS)
    conn.send_bytes(ring.message.SerializeToString())
    for b in range(ROUNDS):
        if b >= SLOTS:
            assert conn.recv_bytes() == b"returned"  # the slot of batch b - SLOTS
        tensors = {name: tensor.cuda() for name, tensor in round_tensors(b).items()}
        conn.send_bytes(ring.write(b % SLOTS, tensors).SerializeToString())
    for _ in range(SLOTS):
        assert conn.recv_bytes() == b"returned"
    ring.close()
    conn.send_bytes(b"closed")


@pytest.mark.gpu
def test_two_processes_hand_tensors_over_a_ring():
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=producer, args=(theirs,))
    process.start()
    try:
        ring = data_plane_pb2.CudaIpcRing.FromString(ours.recv_bytes())
        reader = cuda_ipc.SlotReader(ring, torch.device("cuda"), ROUND_BYTES, SLOTS)
        for b in range(ROUNDS):
            header = data_plane_pb2.CudaIpcTensors.FromString(ours.recv_bytes())
            copy = reader.read(header, ROUND_TENSORS, slot_due=b % SLOTS)
            asyncio.run(copy.wait())
            ours.send_bytes(b"returned")
            expected = round_tensors(b)
            for name, tensor in copy.tensors.items():
                assert tensor.device.type == "cuda"
                assert torch.equal(tensor.cpu().view(torch.uint8), expected[name].view(torch.uint8)), (b, name)
            assert copy.finite is (b != ROUNDS - 1)
        assert ours.recv_bytes() == b"closed"  # the encoder dropped its ring while the decoder still maps it
        assert torch.equal(copy.tensors["c"].cpu(), round_tensors(ROUNDS - 1)["c"])  # our copies are our own
        reader.close()
        process.join(60)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()


# ---- on a GPU: through both services -----------------------------------------------------------------------------

@pytest.mark.gpu
def test_services_give_the_same_frames_over_cuda_ipc_as_over_grpc(tmp_path):
    from worldstream.client.interpolate import interpolate
    from worldstream.serving.processes import ServiceStack

    frames = clip(8)  # 7 pairs: batches of 3, 3 and 1
    results = {}
    for transport in ("grpc", "cuda_ipc"):
        overrides = ["device=cuda", f"transfer.cuda_ipc={str(transport == 'cuda_ipc').lower()}"]
        with ServiceStack("eden/interpolate_tiny", tmp_path / transport, overrides, startup_timeout=300) as stack:
            results[transport] = {
                (payload, factor): interpolate(stack.address, frames, factor=factor, batch=3, payload=payload,
                                               frame_encoding="raw", seed=5, keep=True)
                for payload in ("tokens", "tokens-bf16", "frames") for factor in (2, 4)}
            used = decoder_transports(stack)
        assert used == {transport}
    for key, over_grpc in results["grpc"].items():
        over_ipc = results["cuda_ipc"][key]
        assert np.array_equal(over_ipc.frames, over_grpc.frames), key
        assert over_ipc.payload_bytes < 1024 * len(over_ipc.batches) < over_grpc.payload_bytes, key
