"""Per-block latency of the block loop (encoder conditioning, denoising steps, cache update, VAE decode).

    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --blocks 10
    python benchmarks/block_loop.py --config mg2/universal_tiny            # CPU smoke run

Full-size configs with `init_seed` use seeded random weights of the real architecture (the published checkpoints
cannot be downloaded here); the arithmetic, and so the timing, is that of the real model. Stage times come from
CUDA events (no host syncs inside the loop); steady state = blocks >= 2, when the KV window is full.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from PIL import Image

from worldstream.actions import benchmark_trajectory, split_track
from worldstream.engine.config import load_config
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    cuda = str(cfg.device).startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    t0 = time.perf_counter()
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    build_s = time.perf_counter() - t0
    image = Image.new("RGB", (int(cfg.video.width), int(cfg.video.height)), (90, 120, 160))
    keyboard, mouse = benchmark_trajectory(str(cfg.mode), 12 * args.blocks - 3, seed=0)
    actions = split_track(keyboard, mouse)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    conditioning = encoder.open_session(image)
    sync()
    clip_s = time.perf_counter() - t0
    session = decoder.open_session(conditioning.visual_context, seed=0, max_blocks=args.blocks)
    rows = []
    for b, action in enumerate(actions):
        t0 = time.perf_counter()
        cond = conditioning.next_block()
        sync()
        t1 = time.perf_counter()
        out = session.run_block(cond, action)
        t2 = time.perf_counter()
        rows.append({"encode": t1 - t0, **out.timings, "block": t2 - t1, "frames": out.frames.shape[0]})
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")

    print(f"# {args.config} {' '.join(args.overrides)} | {device_name} | torch {torch.__version__} | "
          f"commit {git_commit()} | {time.strftime('%Y-%m-%d')}")
    print(f"build {build_s:.1f} s, session setup (CLIP + caches) {clip_s * 1000:.0f} ms, peak GPU memory {peak:.1f} GiB")
    stages = ["encode", "denoise", "cache_update", "vae_decode", "to_host", "block"]
    print("block | " + " | ".join(f"{s} ms" for s in stages) + " | frames | FPS")
    for b, r in enumerate(rows):
        print(f"{b} | " + " | ".join(f"{r[s] * 1000:.1f}" for s in stages) + f" | {r['frames']} | "
              f"{r['frames'] / r['block']:.1f}")
    steady = rows[2:] or rows
    med = {s: statistics.median(r[s] for r in steady) for s in stages}
    print("median (blocks >= 2) | " + " | ".join(f"{med[s] * 1000:.1f}" for s in stages) +
          f" | 12 | {12 / med['block']:.1f}")
    session.close()


if __name__ == "__main__":
    main()
