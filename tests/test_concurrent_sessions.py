"""Sessions of one DecoderModels driven from several threads at once (the decoder service's worker lanes). On a GPU
each block's work is queued with no other session's in between, so its stage times are that session's own; a CPU
runs the sessions side by side."""
from __future__ import annotations

import contextlib
import threading

import torch

from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels

BLOCKS = 2


def test_a_blocks_work_is_queued_with_no_other_sessions_in_between():
    """With the GPU's lock, given here to a CPU model (where each mark is a host clock reading as the work runs)."""
    models = DecoderModels(load_config("mg2/universal_tiny"))
    assert isinstance(models.enqueuing, contextlib.nullcontext)  # a CPU runs the sessions side by side
    models.enqueuing = threading.Lock()
    context = torch.zeros(models.context_shape)
    cond = torch.zeros(models.condition_shapes()["cond_concat"])
    spans: dict[int, list[tuple[float, float]]] = {0: [], 1: []}  # per session: each block's first and last mark
    start = threading.Barrier(2)

    def play(seed: int) -> None:
        session = models.open_session(context, seed=seed, max_blocks=BLOCKS)
        start.wait()
        for _ in range(BLOCKS):
            pending = session.launch_block(cond, models.action_space.idle_action())
            marks = [at for _, at in pending.clock.marks]
            spans[seed].append((marks[0], marks[-1]))
            pending.result()
        session.close()

    threads = [threading.Thread(target=play, args=(seed,)) for seed in spans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(blocks) == BLOCKS for blocks in spans.values())
    for first, last in spans[0]:
        for other_first, other_last in spans[1]:
            assert last <= other_first or other_last <= first, (spans, "two sessions' blocks ran interleaved")
