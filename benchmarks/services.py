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
its stages), time to SERVING and GPU memory. For each single session it also prints the first frame's path from
the services' own logs (--log-dir: encoder.log, decoder.log, matched by session id): when the decoder had the
encoder's context, opened its generation session and sent `info`, when the encoder had encoded and sent block 0
(from its stream's start; that start on the decoder's clock comes from the two logs' timestamps, to a few ms),
and when the decoder sent the first frames.

`--profile-dir DIR` has each service write a torch.profiler Chrome trace of a session (DIR/encoder, DIR/decoder;
one session at a time is traced). Profiling inflates every time the benchmark reports (the profiler's own start
falls in the encoder's open and the decoder's session set-up: ~1.4 s each on a CPU): use it to see where time goes,
not to measure.
"""
from __future__ import annotations

import argparse
import datetime
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
# the log events of a session's first frame path, per service (decoder/sessions.py, encoder/server.py)
PATH_EVENTS = {"decoder": ("session opened", "first frames sent"),
               "encoder": ("stream opened", "first block encoded", "first block sent")}
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
        session_id = stream.info.session_id
        actions = planned_actions(stream.space, stream.layout, blocks)
        result = stream.play(actions, window=2)
    arrivals = [b.received_at for b in result.blocks]
    # first frame: block 0's first frames (sent ahead of the block as they are decoded); first block: all of it
    return {"session_id": session_id, "first_frame_s": result.time_to_first_frame,
            "first_block_s": arrivals[0] - result.started_at, "info_s": info_s, "fps": result.fps,
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


def session_events(log_path: Path) -> dict[tuple[str, str], dict]:
    """A service log's events that name a session, by (session id, event); the first of each. Lines that are not
    JSON objects (e.g. a library's warnings) are skipped."""
    events: dict[tuple[str, str], dict] = {}
    for line in log_path.read_text(errors="replace").splitlines() if log_path.exists() else []:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "session_id" in entry:
            events.setdefault((entry["session_id"], entry.get("event")), entry)
    return events


def first_frame_path(session_id: str, logs: dict[str, dict[tuple[str, str], dict]]) -> dict[str, float] | None:
    """Where a session's time to its first frames went, in seconds, from the services' logs: on the decoder's clock
    from the start request's arrival, on the encoder's from its stream's start. None if an event is missing."""
    found = {(service, event): logs[service].get((session_id, event))
             for service, events in PATH_EVENTS.items() for event in events}
    if None in found.values():
        return None
    opened, first_frames = found["decoder", "session opened"], found["decoder", "first frames sent"]
    encoded, sent = found["encoder", "first block encoded"], found["encoder", "first block sent"]

    def wall(entry: dict) -> float:  # the log line's timestamp (milliseconds)
        return datetime.datetime.fromisoformat(entry["ts"]).timestamp()
    decoder_start, encoder_start = wall(opened) - opened["info_seconds"], wall(encoded) - encoded["since_start"]
    return {"encoder_stream_start_s": round(encoder_start - decoder_start, 4),
            "encoder_ready_s": opened["encoder_ready_seconds"], "context_s": opened["context_seconds"],
            "session_setup_s": opened["generation_seconds"], "info_sent_s": opened["info_seconds"],
            "encoder_open_s": found["encoder", "stream opened"]["open_seconds"],
            "encoder_block0_encoded_s": encoded["since_start"], "encoder_block0_encode_s": encoded["encode_seconds"],
            "encoder_block0_sent_s": sent["since_start"], "first_frames_sent_s": first_frames["seconds"]}


def report_first_frame_path(name: str, path: dict[str, float] | None) -> None:
    if path is None:
        print(f"{name} first-frame path: not in the logs (events {PATH_EVENTS})")
        return
    t = {key: f"{seconds * 1000:.0f}" for key, seconds in path.items()}
    print(f"{name} first-frame path (ms): decoder start -> encoder stream start ~{t['encoder_stream_start_s']} (log "
          f"timestamps), encoder ready {t['encoder_ready_s']} (encoder open {t['encoder_open_s']}), context "
          f"{t['context_s']}, decoder session set-up {t['session_setup_s']}, info sent at {t['info_sent_s']}; encoder "
          f"block 0 encoded at {t['encoder_block0_encoded_s']} (encode {t['encoder_block0_encode_s']}), sent at "
          f"{t['encoder_block0_sent_s']} after its stream start (~"
          f"{(path['encoder_stream_start_s'] + path['encoder_block0_sent_s']) * 1000:.0f} after decoder start); "
          f"first frames sent at {t['first_frames_sent_s']}")


def ms(s: dict[str, float]) -> str:
    return f"{s['median'] * 1000:.1f} ({s['p10'] * 1000:.0f}-{s['p90'] * 1000:.0f})"


def report_run(name: str, run: dict) -> dict:
    steady = slice(2, None)  # blocks >= 2
    stages = {s: spread([st.get(s, 0.0) for st in run["stages"][steady]]) for s in SERVER_STAGES}
    interval = spread(run["intervals"][1:])  # arrivals of blocks >= 2
    image_free = run["intervals"][IMAGE_FREE_BLOCK - 1:]
    late = spread(image_free) if image_free else None  # a run shorter than that has none
    first = run["stages"][0]
    print(f"{name} | first frame {run['first_frame_s'] * 1000:.0f} ms, first block {run['first_block_s'] * 1000:.0f} "
          f"ms (info {run['info_s'] * 1000:.0f}, block 0: "
          + ", ".join(f"{s} {first.get(s, 0.0) * 1000:.0f}" for s in SERVER_STAGES) + ") | "
          + " | ".join(f"{s} {ms(stages[s])}" for s in SERVER_STAGES)
          + f" | interval {ms(interval)}, p90/p10 {interval['p90'] / interval['p10']:.2f}"
          + (f" (blocks >= {IMAGE_FREE_BLOCK}: {ms(late)}, {late['p90'] / late['p10']:.2f})" if late else "")
          + f" | {run['fps']:.1f} FPS")
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
    parser.add_argument("--profile-dir", type=Path,
                        help="the services write a Chrome trace per session into DIR/encoder and DIR/decoder "
                             "(inflates the times)")
    args = parser.parse_args()
    if args.blocks < 3:
        parser.error("--blocks must be at least 3: the steady-state figures are over blocks >= 2")

    max_sessions = max([1, *args.sessions])
    profile = {service: ["--profile-dir", str(args.profile_dir / service)] if args.profile_dir else []
               for service in ("encoder", "decoder")}
    stack = ServiceStack(args.config, args.log_dir, args.overrides, encoder_args=profile["encoder"],
                         decoder_args=["--max-sessions", str(max_sessions), *profile["decoder"]], startup_timeout=900)
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
        logs = {service: session_events(args.log_dir / f"{service}.log") for service in PATH_EVENTS}
        record["summaries"] = []
        for r, run in enumerate(runs):
            run["first_frame_path"] = first_frame_path(run["session_id"], logs)
            record["summaries"].append(report_run(f"run {r}", run))
            report_first_frame_path(f"run {r}", run["first_frame_path"])
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
