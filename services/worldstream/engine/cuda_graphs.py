"""CUDA graphs of the DiT call: one per ring phase and cache set, captured at warm-up, replayed in the block loop.

The compiled DiT still issues ~1200 kernels per call from Python, so on a busy host its time follows the host
(docs/perf_notes.md). A captured graph replays them with one launch. A graph reads its inputs from fixed
buffers and writes the KV caches it was captured with, so a cache set and its graphs belong together:
`DiTGraphPool` holds such sets, a session borrows one for its lifetime and copies its inputs in before each
replay. Capture happens only inside `DiTGraphPool.capturing()` (the decoder's warm-up, before it serves):
capturing while another thread runs CUDA work would break both.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..models.causal_wan import CausalWanModel
from ..models.kv_cache import DiTCaches, RingSlots
from .block_loop import SessionDiT


class GraphedSessionDiT(SessionDiT):
    """A cache set whose DiT call replays a CUDA graph per ring phase (captured on first use while capturing;
    a phase without a graph runs the plain call)."""

    def __init__(self, model: CausalWanModel, caches: DiTCaches, pool: "DiTGraphPool"):
        super().__init__(model, caches)
        self.pool = pool
        self.memory = torch.cuda.graph_pool_handle()  # the graphs of one set run one after another: one pool
        self.graphs: dict[RingSlots, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.inputs: list[torch.Tensor | None] | None = None  # x, t, cond, frame_index, keyboard, mouse

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, start_frame: int,
                 keyboard_rows: torch.Tensor | None, mouse_rows: torch.Tensor | None) -> torch.Tensor:
        slots = self.model.ring_slots(start_frame, x.shape[2])
        captured = self.graphs.get(slots)
        if captured is None and not self.pool.capture:
            return super().__call__(x, t, cond, start_frame, keyboard_rows, mouse_rows)
        self._load(x, t, cond, start_frame, keyboard_rows, mouse_rows)
        if captured is None:
            return self._capture(slots)
        graph, out = captured
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _load(self, x, t, cond, start_frame, keyboard_rows, mouse_rows) -> None:
        """Copy the call's inputs into the graphs' input buffers (device-to-device, asynchronous)."""
        frames = x.shape[2]
        if self.inputs is None:
            index = torch.empty(frames, dtype=torch.int64, device=x.device)
            self.inputs = [None if v is None else torch.empty_like(v, memory_format=torch.contiguous_format)
                           for v in (x, t, cond, index, keyboard_rows, mouse_rows)]
        static_x, static_t, static_cond, static_index, static_kb, static_mouse = self.inputs
        for static, value in ((static_x, x), (static_t, t), (static_cond, cond), (static_kb, keyboard_rows),
                              (static_mouse, mouse_rows)):
            if static is not None:
                static.copy_(value)
        torch.arange(start_frame, start_frame + frames, out=static_index)

    def _capture(self, slots: RingSlots) -> torch.Tensor:
        """Run the call once for real (compiling this phase if needed), then capture it; returns the result."""
        x, t, cond, frame_index, kb, mouse = self.inputs

        def call() -> torch.Tensor:
            return self.model.forward_at(x, t, cond, self.caches, slots, frame_index, kb, mouse)

        main, side = torch.cuda.current_stream(), self.pool.stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            result = call()  # idempotent: the capture below recomputes the same cache writes
        main.wait_stream(side)
        result.record_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory, stream=side):
            out = call()
        self.graphs[slots] = (graph, out)
        return result

    def release(self) -> None:
        self.pool.give_back(self)


class DiTGraphPool:
    """Cache sets with captured graphs, lent to sessions one at a time."""

    def __init__(self, model: CausalWanModel, latent_shape: tuple[int, int, int], context_tokens: int):
        self.model = model
        self.latent_shape = latent_shape
        self.context_tokens = context_tokens
        self.free: list[GraphedSessionDiT] = []
        self.size = 0
        self.capture = False
        self.stream = torch.cuda.Stream()  # capture stream (also runs each phase once before its capture)
        self._lock = threading.Lock()

    def take(self) -> GraphedSessionDiT | None:
        """A free cache set with graphs, or None when all are lent (the session then makes its own caches)."""
        with self._lock:
            return self.free.pop() if self.free else None

    def give_back(self, dit: GraphedSessionDiT) -> None:
        with self._lock:
            self.free.append(dit)

    @contextlib.contextmanager
    def capturing(self, sets: int):
        """Grow the pool to `sets` cache sets; sessions opened inside capture their phases on first use.
        Nothing else may use the GPU from this process meanwhile (warm-up only)."""
        with self._lock:
            while self.size < sets:
                self.free.append(GraphedSessionDiT.create(self.model, 1, self.latent_shape, self.context_tokens,
                                                          pool=self))
                self.size += 1
        self.capture = True
        try:
            yield
        finally:
            self.capture = False
