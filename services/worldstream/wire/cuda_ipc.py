"""The same-host GPU data plane (protos/worldstream/v1/data_plane.proto): tensors handed from the encoder process to
the decoder process through a ring of device buffers (slots) mapped once by CUDA IPC, while gRPC carries the control
messages.

* Producer (encoder): `SlotRing` allocates the ring on its GPU and exports each slot once (`message`); `write` puts a
  batch's tensors into a slot, waits on the host until the write is complete on the device and returns the
  `CudaIpcTensors` header to send. The caller writes a slot again only once the stream returned it.
* Consumer (decoder): `SlotReader` checks the ring against the slot size it computes itself, then maps it; `read`
  checks a header against the tensors it expects, copies them (device to device, on the current stream) into
  tensors of its own and returns a `SlotCopy`: the slot may be returned once `await copy.wait()` is done.

Why host waits instead of IPC events: a CUDA IPC event must outlive every use by the other process, and the
encoder's stream may end before the decoder has read its last batch. The slots themselves are safe: torch's
reference counter keeps a slot's memory allocated until the decoder unmaps it.

Handles are the raw bytes of torch's own CUDA IPC (`UntypedStorage._share_cuda_` / `_new_shared_cuda`, private but
unchanged through torch 2.x; the layout is checked), never pickles.
"""
from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import torch

from worldstream.v1 import data_plane_pb2
from .tensors import _FROM_WIRE, _TO_WIRE, WireFormatError

ALIGN = 256  # bytes: every tensor of a slot starts at a multiple of this (any dtype's alignment)
MAX_RING_SLOTS = 4  # per stream: a decoder granting more credit up front gets gRPC (bounds the encoder's memory)
_MAX_HANDLE_BYTES = 4096
_EVENT_HANDLE_BYTES = 64  # sizeof(cudaIpcEventHandle_t)
_REF_COUNTER_NAME = re.compile(rb"/torch_[0-9_]{1,64}")  # at::NewProcessWideShmHandle(): /torch_<pid>_<n>_<n>
_REF_COUNTER_ENTRIES = 10_000  # torch's CUDA_IPC_REF_COUNTER_FILE_SIZE: the counter file's int64 entries
_POLL_SECONDS = 0.0005

# (name, dtype, shape) of each tensor of a slot, in order.
SlotTensors = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]


# ---- what both sides compute ------------------------------------------------------------------------------------

def layout(tensors: SlotTensors) -> tuple[list[int], int]:
    """Each tensor's offset in a slot, and the bytes the slot needs."""
    offsets, end = [], 0
    for _, dtype, shape in tensors:
        offsets.append(end)
        end += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, end


def _view(slot: torch.Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of the slot (uint8 [slot bytes]) at `offset`: a view, no copy."""
    return slot[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)


# ---- negotiation ------------------------------------------------------------------------------------------------

def supported() -> bool:
    """CUDA and torch's CUDA IPC storage sharing are available in this process."""
    return (torch.cuda.is_available() and hasattr(torch.UntypedStorage, "_share_cuda_")
            and hasattr(torch.UntypedStorage, "_new_shared_cuda"))


def cuda_device(device: torch.device) -> torch.device:
    """`device` with its index (cuda -> cuda:<current>)."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(cuda_device(device)).uuid)


def is_local_address(address: str) -> bool:
    """Whether a gRPC target or peer (`127.0.0.1:50052`, `localhost:1`, `[::1]:1`, `dns:///localhost:1`,
    `ipv4:127.0.0.1:5`, `ipv6:%5B::1%5D:5`, `unix:/run/x.sock`) is on this host."""
    address = unquote(address)
    scheme, _, rest = address.partition(":")
    if scheme in ("unix", "unix-abstract"):
        return True
    if scheme in ("ipv4", "ipv6", "dns"):
        address = rest[2:].partition("/")[2] if rest.startswith("//") else rest  # dns://[authority]/host:port
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def offer(device: torch.device, encoder_address: str) -> data_plane_pb2.CudaIpcOffer | None:
    """The decoder's offer, if it can receive through CUDA IPC from the encoder at that address (None: gRPC)."""
    if device.type != "cuda" or not supported() or not is_local_address(encoder_address):
        return None
    return data_plane_pb2.CudaIpcOffer(device_uuid=device_uuid(device))


def accepts(offered: data_plane_pb2.CudaIpcOffer | None, device: torch.device, peer: str, slots: int) -> bool:
    """Whether the encoder on `device` sends through a CUDA IPC ring of `slots` slots to the decoder at `peer` that
    made this offer: only on this host (a handle means nothing elsewhere), on the same GPU, and for a ring of at most
    MAX_RING_SLOTS."""
    return (offered is not None and 1 <= slots <= MAX_RING_SLOTS and device.type == "cuda" and supported()
            and is_local_address(peer) and offered.device_uuid == device_uuid(device))


# ---- messages and their checks (no device needed) ----------------------------------------------------------------

def slot_message(share: tuple, size_bytes: int) -> data_plane_pb2.CudaIpcSlot:
    """torch's `UntypedStorage._share_cuda_()` of a slot -> its message; RuntimeError if this torch's layout is not
    the torch 2.x one (device, handle, size, offset, ref counter, ref counter offset, event handle, event sync)."""
    if not isinstance(share, tuple) or len(share) != 8:
        raise RuntimeError(f"torch {torch.__version__}: UntypedStorage._share_cuda_() returned "
                           f"{type(share).__name__} of {len(share) if isinstance(share, tuple) else '?'} items, not "
                           "torch 2.x's 8; the CUDA IPC data plane needs updating (set transfer.cuda_ipc false)")
    _, handle, storage_bytes, offset, ref_counter, ref_offset, event_handle, event_sync = share
    if not (isinstance(handle, bytes) and isinstance(ref_counter, bytes) and isinstance(event_handle, (bytes, type(None)))
            and all(isinstance(v, int) for v in (storage_bytes, offset, ref_offset))):
        raise RuntimeError(f"torch {torch.__version__}: UntypedStorage._share_cuda_() returned items of types "
                           f"{[type(v).__name__ for v in share]}, not torch 2.x's; the CUDA IPC data plane needs "
                           "updating (set transfer.cuda_ipc false)")
    if storage_bytes != size_bytes:
        raise RuntimeError(f"a slot of {size_bytes} bytes was shared as {storage_bytes} bytes")
    return data_plane_pb2.CudaIpcSlot(size_bytes=storage_bytes, memory_handle=handle, offset_bytes=offset,
                                      ref_counter=ref_counter, ref_counter_offset=ref_offset,
                                      event_handle=event_handle or b"", event_sync_required=bool(event_sync))


def check_ring(ring: data_plane_pb2.CudaIpcRing, slot_bytes: int, slots: int) -> None:
    """Refuse (WireFormatError) a ring that is not the one expected, before anything is mapped."""
    if len(ring.slots) != slots:
        raise WireFormatError(f"a CUDA IPC ring of {len(ring.slots)} slots, expected {slots}")
    for i, slot in enumerate(ring.slots):
        if slot.size_bytes != slot_bytes:
            raise WireFormatError(f"CUDA IPC slot {i} has {slot.size_bytes} bytes, expected {slot_bytes}")
        if not 0 < len(slot.memory_handle) <= _MAX_HANDLE_BYTES:
            raise WireFormatError(f"CUDA IPC slot {i}: a memory handle of {len(slot.memory_handle)} bytes")
        if slot.offset_bytes >= 1 << 48:
            raise WireFormatError(f"CUDA IPC slot {i}: offset {slot.offset_bytes} is beyond any allocation")
        if not _REF_COUNTER_NAME.fullmatch(slot.ref_counter) or slot.ref_counter_offset >= _REF_COUNTER_ENTRIES:
            raise WireFormatError(f"CUDA IPC slot {i}: reference counter {slot.ref_counter[:64]!r} at "
                                  f"{slot.ref_counter_offset} is not one of torch's")
        if slot.event_sync_required and len(slot.event_handle) != _EVENT_HANDLE_BYTES:
            raise WireFormatError(f"CUDA IPC slot {i}: an event handle of {len(slot.event_handle)} bytes, "
                                  f"expected {_EVENT_HANDLE_BYTES}")


def check_tensors(header: data_plane_pb2.CudaIpcTensors, expected: SlotTensors, slot_due: int,
                  slot_bytes: int) -> list[int]:
    """Refuse (WireFormatError) a filled-slot header that does not name the slot due and the expected tensors at
    their offsets; the offsets."""
    if header.slot != slot_due:
        raise WireFormatError(f"CUDA IPC slot {header.slot} while slot {slot_due} is due")
    if len(header.tensors) != len(expected):
        raise WireFormatError(f"{len(header.tensors)} tensors in a CUDA IPC slot, expected {len(expected)} "
                              f"({', '.join(name for name, _, _ in expected)})")
    offsets, end = layout(expected)
    if end > slot_bytes:
        raise WireFormatError(f"the tensors need {end} bytes, more than a slot's {slot_bytes}")
    for tensor, (name, dtype, shape), offset in zip(header.tensors, expected, offsets):
        got = (tensor.name, _FROM_WIRE.get(tensor.dtype), tuple(tensor.shape), tensor.offset_bytes)
        if got != (name, dtype, tuple(shape), offset):
            raise WireFormatError(f"CUDA IPC tensor {tensor.name[:64]!r}: {got[1]} of shape {list(got[2])[:8]} at "
                                  f"byte {got[3]}, expected {name!r}: {dtype} of shape {list(shape)} at byte {offset}")
    return offsets


# ---- producer ---------------------------------------------------------------------------------------------------

class SlotRing:
    """The encoder's ring of one stream: `slots` device buffers of `slot_bytes` each, exported once."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int):
        if not supported() or device.type != "cuda":
            raise RuntimeError(f"CUDA IPC needs a CUDA device, got {device}")
        self.device = cuda_device(device)
        self.slot_bytes = slot_bytes
        torch.cuda.ipc_collect()  # frees the slots of ended streams that their decoders have unmapped since
        with torch.cuda.device(self.device):
            self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(slots)]
            shares = [slot.untyped_storage()._share_cuda_() for slot in self._slots]
        self.message = data_plane_pb2.CudaIpcRing(slots=[slot_message(share, slot_bytes) for share in shares])

    @property
    def slots(self) -> int:
        return len(self.message.slots)

    def write(self, index: int, tensors: Mapping[str, torch.Tensor]) -> data_plane_pb2.CudaIpcTensors:
        """Copy `tensors` (in the order the decoder expects them) into slot `index`; its header, once the copy is
        complete on the device."""
        specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
        offsets, end = layout(specs)
        if end > self.slot_bytes:
            raise ValueError(f"the tensors need {end} bytes, more than a slot's {self.slot_bytes}")
        slot = self._slots[index]
        with torch.cuda.device(self.device):
            for (name, dtype, shape), offset in zip(specs, offsets):
                _view(slot, offset, dtype, shape).copy_(tensors[name])
            torch.cuda.current_stream(self.device).synchronize()  # the header must not leave before the data
        return data_plane_pb2.CudaIpcTensors(slot=index, tensors=[
            data_plane_pb2.CudaIpcTensor(name=name, dtype=_TO_WIRE[dtype], shape=shape, offset_bytes=offset)
            for (name, dtype, shape), offset in zip(specs, offsets)])

    def close(self) -> None:
        """Drop the ring; torch keeps a slot allocated until the decoder has unmapped it too."""
        self._slots.clear()


# ---- consumer ---------------------------------------------------------------------------------------------------

@dataclass
class SlotCopy:
    """The decoder's own copy of a slot's tensors, on its way (the copy runs on the device)."""
    tensors: dict[str, torch.Tensor]
    copied: torch.cuda.Event
    all_finite: torch.Tensor  # pinned host bool, valid once copied

    async def wait(self) -> None:
        """Until the copy is complete (without blocking the event loop); then the slot may be returned."""
        while not self.copied.query():
            await asyncio.sleep(_POLL_SECONDS)

    @property
    def finite(self) -> bool:
        """Whether the floating-point tensors hold no NaN or infinity (after `wait`)."""
        return bool(self.all_finite)


class SlotReader:
    """The decoder's mapping of one stream's ring, checked before it is mapped (WireFormatError)."""

    def __init__(self, ring: data_plane_pb2.CudaIpcRing, device: torch.device, slot_bytes: int, slots: int):
        check_ring(ring, slot_bytes, slots)
        self.device = cuda_device(device)
        self.slot_bytes = slot_bytes
        self._slots: list[torch.Tensor] = []
        with torch.cuda.device(self.device):
            for i, slot in enumerate(ring.slots):
                try:
                    storage = torch.UntypedStorage._new_shared_cuda(
                        self.device.index, slot.memory_handle, slot.size_bytes, slot.offset_bytes, slot.ref_counter,
                        slot.ref_counter_offset, slot.event_handle, slot.event_sync_required)
                except RuntimeError as e:
                    raise WireFormatError(f"CUDA IPC slot {i} could not be mapped ({str(e)[:200]}): are encoder and "
                                          "decoder on one host and GPU, sharing /dev/shm?") from None
                self._slots.append(torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage))

    @property
    def slots(self) -> int:
        return len(self._slots)

    def read(self, header: data_plane_pb2.CudaIpcTensors, expected: SlotTensors, slot_due: int) -> SlotCopy:
        """Check the header, then copy the slot's tensors (queued on the current stream, no host wait)."""
        offsets = check_tensors(header, expected, slot_due, self.slot_bytes)
        slot = self._slots[header.slot]
        with torch.cuda.device(self.device):
            tensors = {name: _view(slot, offset, dtype, shape).clone()
                       for (name, dtype, shape), offset in zip(expected, offsets)}
            all_finite = torch.ones((), dtype=torch.bool, pin_memory=True)
            floats = [tensor for tensor in tensors.values() if tensor.is_floating_point()]
            if floats:
                all_finite.copy_(torch.stack([torch.isfinite(t).all() for t in floats]).all(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        return SlotCopy(tensors, copied, all_finite)

    def close(self) -> None:
        """Unmap the ring (torch waits for the device's queued work first: call it off the event loop)."""
        self._slots.clear()
