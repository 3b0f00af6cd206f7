"""The C allocator's policy of a service process: memory that held large requests (uploaded images) goes back to
the operating system once they are gone, so that a stream of large requests, rejected or not, does not grow the
process.

glibc's defaults keep it, in two ways. After the first large buffer is freed, glibc raises its mmap threshold to
that buffer's size, so the next ones come from malloc's heaps, which are rarely trimmed. And gRPC receives a
message in buffers of a few MB, spread over the heaps (arenas) of its threads, where they stay as free memory that
only those threads reuse: five concurrent 30 MB messages leave ~150 MB behind.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Buffers at least this large are mapped on their own and unmapped when freed. Smaller ones, such as the ~1 MiB
# chunks of the tensor wire format and a raw-RGB block of 8.1 MB, stay in the heaps, where they are reused without
# page faults (see docs/benchmarks.md, wire codec).
MMAP_THRESHOLD_BYTES = 8 << 20
# Free memory at the top of a heap beyond this is returned to the system as it is freed (glibc's own rule: twice
# the mmap threshold). A thread's heap is 64 MiB at most and `malloc_trim` does not shrink its top, so a larger
# value would keep what gRPC's threads received large messages in. The price: a loop that frees more than this
# every round (the wire codec benchmark on 8 MB of frames) page-faults it back in.
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
# A received message this large is worth a `HeapTrimmer.soon()`.
LARGE_MESSAGE_BYTES = 1 << 20


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt, libc.malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def return_large_buffers() -> bool:
    """Set the thresholds above; False where the C library is not glibc (nothing known to do)."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


class HeapTrimmer:
    """Returns the free memory inside malloc's heaps to the system (`malloc_trim`, ~20 ms with a few hundred MB
    to return), on a worker thread, once no large request has come for `interval` seconds: a burst of them shares
    one trim, after the last (during a burst the memory they leave is reused, and bounded by their concurrency)."""

    def __init__(self, interval: float = 1.0):
        self.interval = interval
        self._libc = _glibc()
        self._due: float | None = None

    def soon(self) -> None:
        """Trim `interval` seconds from now, or later if asked again meanwhile (call on the event loop)."""
        if self._libc is None:
            return
        loop = asyncio.get_running_loop()
        if self._due is None:
            loop.call_later(self.interval, self._when_due)
        self._due = loop.time() + self.interval

    def _when_due(self) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._due:  # asked again meanwhile
            loop.call_at(self._due, self._when_due)
            return
        self._due = None
        loop.run_in_executor(None, self._libc.malloc_trim, 0)
