"""Per-block latency of the block loop (encoder conditioning, denoising steps, cache update, VAE decode).

    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --blocks 10
    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --set compile=false   # eager
    python benchmarks/block_loop.py --config mg2/universal_tiny            # CPU smoke run

Full-size configs with `init_seed` use seeded random weights of the real architecture (the published checkpoints
cannot be downloaded here); the arithmetic, and so the timing, is that of the real model. Stage times come from
CUDA events (no host syncs inside the loop); steady state = blocks >= 2, when the KV window is full.
With `compile: true` the build includes the compile warm-up (paid once per process). `--profile FILE` writes
the kernel table (torch.profiler, sorted by CUDA time) of the last block to FILE.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from worldstream.api.benchmark import benchmark_trajectory
from worldstream.api.trajectory import split_track
from worldstream.engine.config import load_config
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels


def git_commit() -> str:
    """Short commit of the checkout, plus " dirty" when tracked files differ from it; "unknown" outside a repo."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], capture_output=True).returncode != 0
    except OSError:
        return "unknown"
    return commit.stdout.strip() + (" dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--profile", metavar="FILE", help="write the last block's kernel table to FILE")
    parser.add_argument("--sync-check", action="store_true",
                        help="then run blocks 2-3 of a fresh session under CUDA sync debug mode 'error'")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    cuda = str(cfg.device).startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    t0 = time.perf_counter()
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    build_s = time.perf_counter() - t0
    warm_up_s = decoder.warm_up() if cfg.compile else 0.0  # compiles every shape of the loop
    image = Image.new("RGB", (int(cfg.video.width), int(cfg.video.height)), (90, 120, 160))
    blocks = args.blocks + bool(args.profile)
    keyboard, mouse = benchmark_trajectory(decoder.action_space, decoder.layout.track_frames(blocks), seed=0)
    all_actions = split_track(decoder.layout, keyboard, mouse)
    actions = all_actions[:args.blocks]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    conditioning = encoder.open_session(image)
    sync()
    clip_s = time.perf_counter() - t0
    session = decoder.open_session(conditioning.visual_context, seed=0, max_blocks=blocks)
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
    print(f"build {build_s:.1f} s (compile warm-up {warm_up_s:.1f} s), session setup (CLIP + caches) "
          f"{clip_s * 1000:.0f} ms, peak GPU memory {peak:.1f} GiB")
    stages = ["encode", "denoise", "cache_update", "vae_decode", "to_host", "block"]
    print("block | " + " | ".join(f"{s} ms" for s in stages) + " | frames | FPS")
    for b, r in enumerate(rows):
        print(f"{b} | " + " | ".join(f"{r[s] * 1000:.1f}" for s in stages) + f" | {r['frames']} | "
              f"{r['frames'] / r['block']:.1f}")
    steady = rows[2:] or rows
    med = {s: statistics.median(r[s] for r in steady) for s in stages}
    print("median (blocks >= 2) | " + " | ".join(f"{med[s] * 1000:.1f}" for s in stages) +
          f" | {decoder.layout.block_frames} | {decoder.layout.block_frames / med['block']:.1f}")
    if args.profile:  # one more block, outside the timed ones
        cond = conditioning.next_block()
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            session.run_block(cond, all_actions[args.blocks])
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                          row_limit=50, max_name_column_width=100)
        with open(args.profile, "w") as f:
            f.write(table)
        print(f"kernel table of block {args.blocks} -> {args.profile}")
    session.close()
    if args.sync_check and cuda:
        check_no_host_sync(decoder, conditioning.visual_context, cond.cpu())


def check_no_host_sync(decoder: DecoderModels, visual_context: torch.Tensor, cond: torch.Tensor) -> None:
    """Blocks 2-3 of a fresh session (the steady ring phases, new caches) must not wait on the device."""
    session = decoder.open_session(visual_context, seed=1, max_blocks=4)
    action = decoder.action_space.idle_action()
    for _ in range(2):
        session.generate(cond, action)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            session.generate(cond, action)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    session.close()
    print("sync check: blocks 2-3 of a fresh session ran under sync debug mode 'error'")


if __name__ == "__main__":
    main()
