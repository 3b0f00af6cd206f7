"""Per-block latency of the block loop (encoder conditioning, denoising steps, cache update, VAE decode).

    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --blocks 30 --runs 3 --with-encoder
    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --set compile=false   # eager
    python benchmarks/block_loop.py --config mg2/universal --set init_seed=0 --set cuda_graphs=false
    python benchmarks/block_loop.py --config mg2/universal_tiny            # CPU smoke run

Full-size configs with `init_seed` use seeded random weights of the real architecture (the published checkpoints
cannot be downloaded here); the arithmetic, and so the timing, is that of the real model. Stage times come from
CUDA events (no host syncs inside the loop); steady state = blocks >= 2, when the KV window is full. Both
sides warm up first, as the services do before SERVING (compile, CUDA graphs, the encoder's steady block).
`--with-encoder` counts the encoder's per-block work in the block time (the services run it in the other
process, on the same GPU). `--profile FILE` writes the kernel table (torch.profiler, sorted by CUDA time) of one
more block to FILE.
"""
from __future__ import annotations

import argparse
import json
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


def spread(values: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (linear interpolation between the sorted values)."""
    if len(values) == 1:
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def run_session(encoder: EncoderModels, decoder: DecoderModels, image: Image.Image, actions, seed: int,
                with_encoder: bool, pipelined: bool) -> list[dict[str, float]]:
    """One session, block by block; per block the stage times in seconds. `block` is the host time from one
    block's frames to the next's (block 0: from its start), as a service delivers them. `pipelined` queues each
    block before waiting for the frames of the one before (the decoder service's loop when the next action is
    there). The encoder's `next_block` runs in the loop either way; `encode` is its host time, and with
    `with_encoder` its device work is waited for (the work both services do per block, one GPU)."""
    conditioning = encoder.open_session(image)
    session = decoder.open_session(conditioning.visual_context, seed=seed, max_blocks=len(actions))
    rows, pending, last = [], None, time.perf_counter()

    def finish(block, encode_s: float) -> None:
        nonlocal last
        out = block.result()
        now = time.perf_counter()
        rows.append({"encode": encode_s, **out.timings, "block": now - last, "frames": out.frames.shape[0]})
        last = now

    for action in actions:
        t0 = time.perf_counter()
        cond = conditioning.next_block()
        if with_encoder:
            cond = cond.cpu()  # as the encoder service sends it: waits for its work
        encode_s = time.perf_counter() - t0
        block = session.launch_block(cond, action)
        if pending is not None:
            finish(*pending)
        pending = (block, encode_s)
        if not pipelined:
            finish(*pending)
            pending = None
    if pending is not None:
        finish(*pending)
    session.close()
    conditioning.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--runs", type=int, default=1, help="sessions measured one after another (fresh each)")
    parser.add_argument("--with-encoder", action="store_true",
                        help="count the encoder's per-block work (the next cond_concat) in the block time")
    parser.add_argument("--one-by-one", action="store_true",
                        help="wait for each block's frames before queuing the next (the device may idle between "
                             "blocks; always so on a CPU, where nothing overlaps)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", metavar="FILE", help="write every block's stage times to FILE")
    parser.add_argument("--profile", metavar="FILE", help="write the kernel table of one more block to FILE")
    parser.add_argument("--sync-check", action="store_true",
                        help="then run blocks 2-3 of a fresh session under CUDA sync debug mode 'error'")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    cuda = str(cfg.device).startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    t0 = time.perf_counter()
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    build_s = time.perf_counter() - t0
    encoder_warm_up_s = encoder.warm_up()  # also computes the image-free steady cond_concat
    decoder_warm_up_s = decoder.warm_up()  # compiles every shape of the loop, captures the CUDA graphs
    image = Image.new("RGB", (int(cfg.video.width), int(cfg.video.height)), (90, 120, 160))
    blocks = args.blocks + bool(args.profile)
    keyboard, mouse = benchmark_trajectory(decoder.action_space, decoder.layout.track_frames(blocks), seed=0)
    all_actions = split_track(decoder.layout, keyboard, mouse)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    encoder.open_session(image).close()
    sync()
    clip_s = time.perf_counter() - t0
    runs = [run_session(encoder, decoder, image, all_actions[:args.blocks], run, args.with_encoder,
                        cuda and not args.one_by_one) for run in range(args.runs)]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")

    print(f"# {args.config} {' '.join(args.overrides)} | {device_name} | torch {torch.__version__} | "
          f"commit {git_commit()} | {time.strftime('%Y-%m-%d')} | block time "
          f"{'includes' if args.with_encoder else 'excludes'} the encoder, blocks "
          f"{'queued one ahead' if cuda and not args.one_by_one else 'one by one'}")
    print(f"build {build_s:.1f} s, warm-up: encoder {encoder_warm_up_s:.1f} s, decoder {decoder_warm_up_s:.1f} s "
          f"(compile + CUDA graphs), CLIP + encoder session {clip_s * 1000:.0f} ms, peak GPU memory {peak:.1f} GiB")
    stages = ["encode", "denoise", "vae_decode", "to_host", "cache_update", "block"]
    print("block | " + " | ".join(f"{s} ms" for s in stages) + " | frames | FPS")
    for b, r in enumerate(runs[-1]):
        print(f"{b} | " + " | ".join(f"{r[s] * 1000:.1f}" for s in stages) + f" | {r['frames']} | "
              f"{r['frames'] / r['block']:.1f}")
    summaries = []
    for run, rows in enumerate(runs):
        steady = rows[2:] or rows  # blocks >= 2: the KV window is full
        summary = {s: spread([r[s] for r in steady]) for s in stages}
        summaries.append(summary)
        block = summary["block"]
        print(f"run {run}, median (p10-p90) of blocks >= 2 | " +
              " | ".join(f"{summary[s]['median'] * 1000:.1f} ({summary[s]['p10'] * 1000:.0f}-"
                         f"{summary[s]['p90'] * 1000:.0f})" for s in stages) +
              f" | FPS {decoder.layout.block_frames / block['median']:.1f} | p90/p10 {block['p90'] / block['p10']:.2f}")
    medians = [m["block"]["median"] for m in summaries]
    print(f"median of the {len(runs)} runs' medians: block {statistics.median(medians) * 1000:.1f} ms, "
          f"{decoder.layout.block_frames / statistics.median(medians):.1f} FPS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "overrides": args.overrides, "device": device_name,
                       "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
                       "with_encoder": args.with_encoder, "build_s": build_s,
                       "warm_up_s": {"encoder": encoder_warm_up_s, "decoder": decoder_warm_up_s},
                       "peak_gib": peak, "runs": runs, "summaries": summaries}, f, indent=1)
    if args.profile:  # one more session, its last block profiled
        conditioning = encoder.open_session(image)
        session = decoder.open_session(conditioning.visual_context, seed=0, max_blocks=blocks)
        for action in all_actions[:args.blocks]:
            session.run_block(conditioning.next_block(), action)
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
        conditioning = encoder.open_session(image)
        check_no_host_sync(decoder, conditioning.visual_context, conditioning.next_block().cpu())


def check_no_host_sync(decoder: DecoderModels, visual_context: torch.Tensor, cond: torch.Tensor) -> None:
    """Blocks 2-3 of a fresh session (the steady ring phases, new caches) must not wait on the device."""
    session = decoder.open_session(visual_context, seed=1, max_blocks=4)
    action = decoder.action_space.idle_action()
    for _ in range(2):
        session.run_block(cond, action)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [session.launch_block(cond, action) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for block in pending:
        block.result()
    session.close()
    print("sync check: blocks 2-3 of a fresh session ran under sync debug mode 'error'")


if __name__ == "__main__":
    main()
