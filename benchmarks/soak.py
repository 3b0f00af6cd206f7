"""Soak: N concurrent sessions for M minutes against both services, with random client disconnects and an
encoder restart in the middle.

    python benchmarks/soak.py --sessions 4 --minutes 4 --plot docs/soak.png --json out/soak.json

Starts the encoder and the decoder (real processes, loopback gRPC, the tiny CPU config by default). Each of the
`--sessions` client threads runs LOCKSTEP sessions back to back through the client library: a random length
(2..`--max-blocks` blocks), the mode's benchmark trajectory, two actions in flight; with probability
`--disconnect-rate` it cancels the call at a random point (after a block arrived, or just after sending an
action, while the block runs). Halfway through, the encoder is killed (`--restart kill`: SIGKILL, a crash;
`term`: SIGTERM, a graceful stop) and started again on the same port. Every second it samples RSS and thread
count of both services. At the end it waits for the decoder to release every session and prints sessions
served, failures by status, blocks, and RSS and threads at the start, peak and end; `--plot` draws them over
time (matplotlib PNG), `--json` writes everything.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import statistics
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from worldstream.api.trajectory import planned_actions
from worldstream.client import SessionStream, start_request
from worldstream.serving.processes import ServiceStack

DEMO_IMAGE = Path(__file__).resolve().parents[1] / "services" / "worldstream" / "assets" / "demo.png"
COMPLETED, DISCONNECTED = "completed", "disconnected"  # the other outcomes are gRPC status names
FAILURE_PAUSE = 1.0  # seconds a client waits after a failed session before the next, as a real client backs off


@dataclass
class SessionRecord:
    client: int
    started: float  # seconds since the soak began
    ended: float
    outcome: str  # COMPLETED, DISCONNECTED or the status code name
    blocks: int  # blocks received
    planned: int  # blocks asked for
    first_frame_s: float | None = None
    detail: str = ""


@dataclass
class Sample:
    t: float
    rss_mib: dict[str, float | None]
    threads: dict[str, int | None]
    sessions_active: float | None


@dataclass
class Soak:
    args: dict
    sessions: list[SessionRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    encoder_down: list[float] = field(default_factory=list)  # [killed at, SERVING again at]
    released_s: float | None = None  # after the clients stopped: seconds until the decoder held no session


def proc_status(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, threads) of a live process, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["Threads"])


def sessions_active(metrics_port: int) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("worldstream_decoder_sessions_active "):
            return float(line.split()[1])
    return None


def run_session(address: str, client: int, rng: random.Random, args: argparse.Namespace, t0: float
                ) -> SessionRecord:
    """One session. A planned disconnect cancels the call once `cut` blocks have arrived: at once, or up to
    0.3 s later (two actions are in flight, so the server is computing a block either way)."""
    planned = rng.randint(2, args.max_blocks)
    cut = rng.randrange(planned) if rng.random() < args.disconnect_rate else None
    delay = rng.choice([0.0, rng.uniform(0.0, 0.3)])
    record = SessionRecord(client, time.perf_counter() - t0, 0.0, COMPLETED, 0, planned)
    try:
        start = start_request(DEMO_IMAGE, seed=rng.getrandbits(32), max_blocks=planned)
        with SessionStream(address, start, timeout=args.session_timeout) as stream:
            actions = planned_actions(stream.space, stream.layout, planned, benchmark_seed=rng.getrandbits(16))

            def send_upto(count: int) -> None:
                while len(stream.sent_at) < min(count, planned):
                    stream.send(actions[len(stream.sent_at)])
                if len(stream.sent_at) == planned:
                    stream.finish()

            send_upto(2)
            if cut != 0:
                for block in stream:
                    record.blocks += 1
                    if record.blocks == 1:
                        record.first_frame_s = block.first_frames_at - stream.started_at
                    if record.blocks == cut:
                        break
                    send_upto(record.blocks + 2)
            if cut is not None:
                time.sleep(delay)
                stream.cancel()
                record.outcome = DISCONNECTED
            elif stream.end is None:
                record.outcome, record.detail = "NO_END", "the stream closed without `end`"
    except grpc.RpcError as e:
        record.outcome, record.detail = e.code().name, (e.details() or "")[:300]
    except (ConnectionError, RuntimeError) as e:  # no server reachable; an unexpected response
        record.outcome, record.detail = type(e).__name__, str(e)[:300]
    record.ended = time.perf_counter() - t0
    return record


def client_loop(address: str, client: int, args: argparse.Namespace, t0: float, deadline: float,
                soak: Soak, lock: threading.Lock) -> None:
    rng = random.Random(args.seed * 1000 + client)
    while time.perf_counter() < deadline:
        record = run_session(address, client, rng, args, t0)
        with lock:
            soak.sessions.append(record)
        if record.outcome not in (COMPLETED, DISCONNECTED):
            time.sleep(FAILURE_PAUSE)


def sampler(stack: ServiceStack, t0: float, stop: threading.Event, interval: float, soak: Soak) -> None:
    while not stop.wait(0 if not soak.samples else interval):
        rss, threads = {}, {}
        for name in ("decoder", "encoder"):
            service = getattr(stack, name)
            status = proc_status(service.process.pid) if service and service.process.poll() is None else None
            rss[name], threads[name] = status if status else (None, None)
        soak.samples.append(Sample(time.perf_counter() - t0, rss, threads, sessions_active(stack.decoder_metrics_port)))


def restart_encoder(stack: ServiceStack, how: str, t0: float, soak: Soak) -> None:
    stack.encoder.signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
    soak.encoder_down.append(time.perf_counter() - t0)
    stack.encoder.wait(120)
    stack.start_encoder()  # same port and arguments; returns once it reports SERVING
    soak.encoder_down.append(time.perf_counter() - t0)


def run(args: argparse.Namespace) -> Soak:
    soak = Soak({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    overrides = [arg for item in args.set for arg in ("--set", item)]
    decoder_args = ["--max-sessions", str(args.sessions), "--idle-timeout", "30", *overrides]
    with ServiceStack(args.config, args.log_dir, encoder_args=overrides, decoder_args=decoder_args) as stack:
        lock, stop = threading.Lock(), threading.Event()
        t0 = time.perf_counter()
        deadline = t0 + args.minutes * 60
        sampling = threading.Thread(target=sampler, args=(stack, t0, stop, args.sample_interval, soak), daemon=True)
        sampling.start()
        clients = [threading.Thread(target=client_loop, args=(stack.address, i, args, t0, deadline, soak, lock))
                   for i in range(args.sessions)]
        for thread in clients:
            thread.start()
        if args.restart != "none":
            time.sleep(max(0.0, t0 + args.minutes * 30 - time.perf_counter()))
            print(f"{time.perf_counter() - t0:6.1f} s  encoder restart ({args.restart})", flush=True)
            restart_encoder(stack, args.restart, t0, soak)
            print(f"{time.perf_counter() - t0:6.1f} s  encoder SERVING again", flush=True)
        for thread in clients:
            thread.join()
        clients_done = time.perf_counter()
        while sessions_active(stack.decoder_metrics_port) != 0 and time.perf_counter() - clients_done < 60:
            time.sleep(0.2)
        soak.released_s = time.perf_counter() - clients_done
        time.sleep(args.sample_interval * 3)  # a few samples of the idle services
        stop.set()
        sampling.join()
    return soak


def summary(soak: Soak) -> dict:
    outcomes = collections.Counter(record.outcome for record in soak.sessions)
    down = soak.encoder_down

    def around_restart(record: SessionRecord) -> bool:
        return len(down) == 2 and record.started <= down[1] and record.ended >= down[0]
    failures = {code: {"count": n, "overlapping_restart": sum(1 for r in soak.sessions
                                                              if r.outcome == code and around_restart(r)),
                       "example": next(r.detail for r in soak.sessions if r.outcome == code)}
                for code, n in outcomes.items() if code not in (COMPLETED, DISCONNECTED)}
    first_frames = [r.first_frame_s for r in soak.sessions if r.first_frame_s is not None]
    memory = {}
    for name in ("decoder", "encoder"):
        rss = [s.rss_mib[name] for s in soak.samples if s.rss_mib[name] is not None]
        threads = [s.threads[name] for s in soak.samples if s.threads[name] is not None]
        memory[name] = {"rss_mib": {"start": rss[0], "peak": max(rss), "end": rss[-1]},
                        "threads": {"start": threads[0], "peak": max(threads), "end": threads[-1]}}
    return {"sessions": len(soak.sessions), "completed": outcomes[COMPLETED], "disconnected": outcomes[DISCONNECTED],
            "failures": failures, "blocks": sum(r.blocks for r in soak.sessions),
            "first_frame_s_median": statistics.median(first_frames) if first_frames else None,
            "encoder_down_s": down, "released_s": soak.released_s, "memory": memory}


def plot(soak: Soak, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t / 60 for s in soak.samples]
    fig, (ax_rss, ax_threads, ax_sessions) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    for name, color in (("decoder", "tab:blue"), ("encoder", "tab:orange")):
        ax_rss.plot(minutes, [s.rss_mib[name] for s in soak.samples], color=color, label=name)
        ax_threads.plot(minutes, [s.threads[name] for s in soak.samples], color=color, label=name)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_threads.set_ylabel("threads")
    ended = sorted(soak.sessions, key=lambda r: r.ended)
    kinds = [(COMPLETED, "tab:green"), (DISCONNECTED, "tab:gray")]
    kinds += [(code, color) for code, color in zip(sorted({r.outcome for r in ended} - {COMPLETED, DISCONNECTED}),
                                                  ["tab:red", "tab:purple", "tab:brown", "black"])]
    for kind, color in kinds:
        times = [r.ended / 60 for r in ended if r.outcome == kind]
        ax_sessions.step(times, range(1, len(times) + 1), where="post", color=color, label=kind)
    ax_sessions.set_ylabel("sessions ended (cumulative)")
    ax_sessions.set_xlabel("minutes")
    for ax in (ax_rss, ax_threads, ax_sessions):
        if len(soak.encoder_down) == 2:
            ax.axvspan(soak.encoder_down[0] / 60, soak.encoder_down[1] / 60, color="tab:red", alpha=0.12,
                       label="encoder restarting" if ax is ax_rss else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for both services (repeatable)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent clients (the decoder's --max-sessions)")
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--max-blocks", type=int, default=12, help="each session asks for 2..this many blocks")
    parser.add_argument("--disconnect-rate", type=float, default=0.25, help="share of sessions cancelled midway")
    parser.add_argument("--restart", choices=("kill", "term", "none"), default="kill",
                        help="how the encoder is stopped halfway before it is started again")
    parser.add_argument("--session-timeout", type=float, default=300.0, help="client deadline of one session (s)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between RSS/thread samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=Path("out/soak-logs"))
    parser.add_argument("--plot", type=Path, help="write the RSS / threads / sessions plot here (PNG)")
    parser.add_argument("--json", type=Path, help="write the samples, sessions and summary here")
    args = parser.parse_args()

    soak = run(args)
    result = summary(soak)
    print(json.dumps(result, indent=2))
    if args.plot:
        failed = sum(f["count"] for f in result["failures"].values())
        plot(soak, args.plot, f"soak: {args.config}, {args.sessions} clients, {args.minutes:g} min, encoder "
                              f"{args.restart} at the midpoint - {result['sessions']} sessions: {result['completed']} "
                              f"completed, {result['disconnected']} disconnected, {failed} failed")
        print(f"plot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": result, **asdict(soak)}, indent=1))
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
