"""End to end through the services: both on one GPU, a client playing the reference benchmark trajectory.

    python benchmarks/services.py --config mg2/universal --set init_seed=0 --blocks 30 --runs 3 \
        --sessions 1 2 4 --restart --json out/services.json

Starts the encoder and the decoder service (real processes, loopback gRPC; each reports SERVING once its
models are loaded and warmed up), runs `--runs` LOCKSTEP sessions one after another with the mode's benchmark
trajectory (JPEG frames, 2 actions in flight, as `worldstream.client --benchmark`), then for each count of
`--sessions` above 1 that many sessions at once, and tears the services down. `--restart` then starts the
decoder once more: with the compile cache the first start filled (TORCHINDUCTOR_CACHE_DIR, default under
/tmp), that is the warm-restart time. Prints per-stage server times (median, p10-p90 over blocks >= 2), the
client's block interval and FPS, first frame (block 0's first frames, sent ahead of the block) and first block (with
its stages), time to SERVING and GPU memory.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from worldstream.api.trajectory import planned_actions
from worldstream.client import SessionStream, start_request
from worldstream.serving.processes import ServiceStack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from block_loop import git_commit, spread  # noqa: E402  (the engine benchmark's helpers)

DEMO_IMAGE = Path(__file__).resolve().parents[1] / "services" / "worldstream" / "assets" / "demo.png"
IMAGE_FREE_BLOCK = 10  # from this block on the encoder does no work (engine/conditioning.py)
SERVER_STAGES = ["action_wait", "condition_wait", "denoise", "vae_decode", "to_host", "cache_update", "frame_encode"]


def gpu_memory_mib() -> dict[str, float]:
    """GPU memory in use (nvidia-smi): per process id, and "gpu" for the whole device; {} without nvidia-smi."""
    def query(what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return [[field.strip() for field in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    try:
        used = {pid: float(mib) for pid, mib in query("compute-apps=pid,used_memory")}
        used["gpu"] = float(query("gpu=memory.used")[0][0])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}
    return used


def start_timed(process_start) -> float:
    started = time.perf_counter()
    process_start()
    return time.perf_counter() - started


def play(address: str, blocks: int, seed: int) -> dict:
    """One LOCKSTEP session with the benchmark trajectory; client-side times and the server's stage times."""
    start = start_request(DEMO_IMAGE, seed=seed, max_blocks=blocks, pacing="lockstep")
    with SessionStream(address, start) as stream:
        info_s = time.perf_counter() - stream.started_at  # image decode, CLIP, cache set-up on both sides
        actions = planned_actions(stream.space, stream.layout, blocks)
        result = stream.play(actions, window=2)
    arrivals = [b.received_at for b in result.blocks]
    # first frame: block 0's first frames (sent ahead of the block as they are decoded); first block: all of it
    return {"first_frame_s": result.time_to_first_frame, "first_block_s": arrivals[0] - result.started_at,
            "info_s": info_s, "fps": result.fps,
            "intervals": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "frames": [b.frames.shape[0] for b in result.blocks],
            "stages": [b.stage_seconds for b in result.blocks], "latency": [b.latency for b in result.blocks]}


def play_together(address: str, sessions: int, blocks: int) -> list[dict]:
    results: list[dict | BaseException] = [None] * sessions

    def one(i: int) -> None:
        try:
            results[i] = play(address, blocks, seed=i)
        except BaseException as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def ms(s: dict[str, float]) -> str:
    return f"{s['median'] * 1000:.1f} ({s['p10'] * 1000:.0f}-{s['p90'] * 1000:.0f})"


def report_run(name: str, run: dict) -> dict:
    steady = slice(2, None)  # blocks >= 2
    stages = {s: spread([st.get(s, 0.0) for st in run["stages"][steady]]) for s in SERVER_STAGES}
    interval = spread(run["intervals"][1:])  # arrivals of blocks >= 2
    late = spread(run["intervals"][IMAGE_FREE_BLOCK - 1:] or run["intervals"])
    first = run["stages"][0]
    print(f"{name} | first frame {run['first_frame_s'] * 1000:.0f} ms, first block {run['first_block_s'] * 1000:.0f} "
          f"ms (info {run['info_s'] * 1000:.0f}, block 0: "
          + ", ".join(f"{s} {first.get(s, 0.0) * 1000:.0f}" for s in SERVER_STAGES) + ") | "
          + " | ".join(f"{s} {ms(stages[s])}" for s in SERVER_STAGES)
          + f" | interval {ms(interval)}, p90/p10 {interval['p90'] / interval['p10']:.2f} (blocks >= "
            f"{IMAGE_FREE_BLOCK}: {ms(late)}, {late['p90'] / late['p10']:.2f}) | {run['fps']:.1f} FPS")
    return {"stages": stages, "interval": interval, "interval_image_free": late, "fps": run["fps"],
            "first_frame_s": run["first_frame_s"], "first_block_s": run["first_block_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3, help="single sessions, one after another")
    parser.add_argument("--sessions", type=int, nargs="*", default=[], help="concurrent session counts (> 1)")
    parser.add_argument("--restart", action="store_true", help="then restart the decoder (warm compile cache)")
    parser.add_argument("--log-dir", type=Path, default=Path("out/services-bench"))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    max_sessions = max([1, *args.sessions])
    stack = ServiceStack(args.config, args.log_dir, args.overrides,
                         decoder_args=["--max-sessions", str(max_sessions)], startup_timeout=900)
    record: dict = {"config": args.config, "overrides": args.overrides, "commit": git_commit(),
                    "date": time.strftime("%Y-%m-%d"), "blocks": args.blocks}
    print(f"# {args.config} {' '.join(args.overrides)} | commit {record['commit']} | {record['date']} | "
          f"{args.blocks} blocks, LOCKSTEP, JPEG")
    try:
        record["encoder_serving_s"] = start_timed(stack.start_encoder)
        record["decoder_serving_s"] = start_timed(stack.start_decoder)
        print(f"time to SERVING: encoder {record['encoder_serving_s']:.1f} s, decoder {record['decoder_serving_s']:.1f} s"
              f" (--max-sessions {max_sessions})")
        runs = [play(stack.address, args.blocks, seed=r) for r in range(args.runs)]
        record["memory_mib"] = gpu_memory_mib()
        record["runs"] = runs
        record["summaries"] = [report_run(f"run {r}", run) for r, run in enumerate(runs)]
        fps = [s["fps"] for s in record["summaries"]]
        ratio = [s["interval"]["p90"] / s["interval"]["p10"] for s in record["summaries"]]
        print(f"one session: median of {len(runs)} runs {statistics.median(fps):.1f} FPS (runs: "
              f"{', '.join(f'{f:.1f}' for f in fps)}), interval p90/p10 {', '.join(f'{r:.2f}' for r in ratio)}, "
              f"first frame {statistics.median(r['first_frame_s'] for r in runs) * 1000:.0f} ms; GPU memory "
              f"{record['memory_mib'] or 'n/a'} MiB")
        record["concurrent"] = {}
        for n in (n for n in args.sessions if n > 1):
            together = play_together(stack.address, n, args.blocks)
            summaries = [report_run(f"{n} sessions, #{i}", run) for i, run in enumerate(together)]
            record["concurrent"][n] = {"runs": together, "summaries": summaries, "memory_mib": gpu_memory_mib()}
            each = [s["fps"] for s in summaries]
            print(f"{n} sessions at once: {min(each):.1f}-{max(each):.1f} FPS each, {sum(each):.1f} together, first "
                  f"frame {max(r['first_frame_s'] for r in together) * 1000:.0f} ms at most")
        if args.restart:
            stack.decoder.stop()
            record["decoder_restart_serving_s"] = start_timed(stack.start_decoder)
            print(f"decoder restart to SERVING (warm compile cache): {record['decoder_restart_serving_s']:.1f} s")
    finally:
        stack.close()
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
