"""Text-to-video block loop (Self-Forcing, LongLive) in one process: per-block stage times, FPS, the first block,
a prompt switch's re-cache (LongLive), peak memory.

    python benchmarks/text_loop.py --config selfforcing/t2v --set init_seed=0 --blocks 7 --runs 3
    python benchmarks/text_loop.py --config longlive/interactive --set init_seed=0 --blocks 12 --switch-at 6

The prompt's text context is random (UMT5 output shape, zero rows past --prompt-tokens): the text encoder runs in
the encoder service and is timed on its own there. Warm-up (compile, CUDA graphs) is excluded and reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
    return f"{1000 * statistics.median(values):.1f} ms (p10 {1000 * pick(0.1):.1f}, p90 {1000 * pick(0.9):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="selfforcing/t2v_tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--switch-at", type=int, help="switch to a second prompt before this block (LongLive)")
    parser.add_argument("--prompt-tokens", type=int, default=40, help="non-padding rows of the random context")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    start = time.perf_counter()
    models = DecoderModels(cfg)
    warm = models.warm_up()
    build = time.perf_counter() - start
    cuda = models.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def context(seed: int) -> torch.Tensor:
        shape = models.context_shape
        ctx = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) / 4
        ctx[:, args.prompt_tokens:] = 0
        return ctx.to(models.device)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for run in range(args.runs):
        session = models.open_session(context(1), seed=run, max_blocks=args.blocks)
        rows = []
        t_start = time.perf_counter()
        for b in range(args.blocks):
            if args.switch_at is not None and b == args.switch_at:
                session.switch_prompt(context(2))
            t0 = time.perf_counter()
            out = session.run_block()
            sync()
            rows.append({"block": time.perf_counter() - t0, "since_start": time.perf_counter() - t_start,
                         "frames": int(out.frames.shape[0]), **out.timings})
        session.close()
        runs.append(rows)

    steady = [r["block"] for rows in runs for r in rows[1:] if "recache" not in r]
    frames = [r["frames"] for r in runs[0]]
    print(f"config {args.config}, device {models.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, torch {torch.__version__}")
    print(f"build {build:.1f} s (warm-up {warm:.1f} s)")
    print(f"first block (9 frames, from open): {spread([rows[0]['since_start'] for rows in runs])}")
    print(f"steady block ({frames[-1]} frames): {spread(steady)}; FPS {frames[-1] / statistics.median(steady):.1f}")
    stages = sorted({k for rows in runs for r in rows for k in r} - {"block", "since_start", "frames"})
    for stage in stages:
        print(f"  {stage}: {spread([r[stage] for rows in runs for r in rows[1:] if stage in r])}")
    if cuda:
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "build_s": build, "warm_up_s": warm, "runs": runs}, f)


if __name__ == "__main__":
    main()
