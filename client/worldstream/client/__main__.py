"""Streaming client: play a session against a decoder service and write the video.

    python -m worldstream.client --address 127.0.0.1:50051 --image assets/demo.png --mode universal \
        --benchmark --blocks 10 --out out/session.mp4 [--overlay] [--raw] [--pacing lockstep|realtime]
    python -m worldstream.client ... --trajectory traj.json
    python -m worldstream.client ... --interactive          # W/A/S/D move, I/J/K/L look, Esc quits
"""
from __future__ import annotations

import argparse
import math
import sys
import threading
from pathlib import Path

import grpc

from worldstream.api.actions import ACTION_SPACES, get_action_space, planned_actions
from .video import VideoWriter
from .interactive import KeyboardActions, TerminalKeys
from .session import ReceivedBlock, SessionResult, SessionStream, run_session, start_request


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worldstream.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051", help="decoder service host:port")
    parser.add_argument("--image", type=Path, required=True, help="first frame (PNG/JPEG)")
    parser.add_argument("--mode", default="universal", choices=sorted(ACTION_SPACES), help="the server's mode")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trajectory", type=Path, help="trajectory JSON file (worldstream.trajectory.v1)")
    source.add_argument("--benchmark", action="store_true", help="the mode's reference benchmark trajectory")
    source.add_argument("--interactive", action="store_true", help="play with the keyboard in this terminal")
    parser.add_argument("--blocks", type=int, default=10, help="blocks to generate (9 frames, then 12 each)")
    parser.add_argument("--out", type=Path, default=Path("out/session.mp4"), help="video to write")
    parser.add_argument("--overlay", action="store_true", help="draw the applied action on the frames")
    parser.add_argument("--raw", action="store_true", help="receive lossless raw RGB frames instead of JPEG")
    parser.add_argument("--jpeg-quality", type=int, default=0, help="JPEG quality 1-100 (0 = server default)")
    parser.add_argument("--pacing", choices=("lockstep", "realtime"), default=None,
                        help="default: lockstep, realtime for --interactive")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the session")
    parser.add_argument("--benchmark-seed", type=int, default=0, help="seed of the benchmark trajectory")
    parser.add_argument("--window", type=int, default=2, help="LOCKSTEP actions kept in flight")
    args = parser.parse_args(argv)
    if args.blocks < 1:
        parser.error("--blocks must be at least 1")
    args.pacing = args.pacing or ("realtime" if args.interactive else "lockstep")
    return args


class Progress:
    """One status line on stderr, rewritten per block."""

    def __init__(self, total: int, started_at: float):
        self.total = total
        self.started_at = started_at
        self.frames_after_first = 0
        self.first_at: float | None = None

    def update(self, block: ReceivedBlock) -> None:
        if self.first_at is None:
            self.first_at = block.received_at
        else:
            self.frames_after_first += block.frames.shape[0]
        done = block.index + 1
        span = block.received_at - self.first_at
        fps = self.frames_after_first / span if span > 0 else math.nan
        bar = "#" * (20 * done // self.total) + "." * (20 - 20 * done // self.total)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} blocks | block {block.latency * 1000:6.0f} ms | "
                         f"first frame {self.first_at - self.started_at:5.2f} s | {fps:5.1f} FPS ")
        sys.stderr.flush()


def play_interactive(args: argparse.Namespace, writer: VideoWriter) -> SessionResult:
    space = get_action_space(args.mode)
    start = start_request(args.image, args.mode, seed=args.seed, max_blocks=args.blocks,
                          frame_encoding="raw" if args.raw else "jpeg", jpeg_quality=args.jpeg_quality,
                          pacing=args.pacing)
    print(f"keys: {space.key_help()}; Esc quits", file=sys.stderr)
    with TerminalKeys() as keys, SessionStream(args.address, start) as stream:
        controls = KeyboardActions(space, keys)
        result = SessionResult(stream.info, started_at=stream.started_at)
        progress = Progress(stream.info.max_blocks, stream.started_at)
        stop = threading.Event()

        def send_changes() -> None:  # REALTIME: the server samples the latest action per block
            last = None
            while not stop.wait(0.03):
                controls.poll()
                held = controls.held()
                if controls.quit:
                    stream.finish()
                    return
                if held != last:
                    stream.send(space.from_pressed(held))
                    last = held

        stream.send(controls.current())
        sender = None
        if not stream.lockstep:
            sender = threading.Thread(target=send_changes, daemon=True)
            sender.start()
        try:
            for block in stream:
                result.blocks.append(block)
                if stream.lockstep:  # the next action first: the server waits for it
                    action = controls.current()
                    if controls.quit:
                        stream.finish()
                    elif len(stream.sent_at) < stream.info.max_blocks:
                        stream.send(action)
                writer.write(block.frames, block.action)
                progress.update(block)
        finally:
            stop.set()
            if sender is not None:
                sender.join()
        result.end = stream.end
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with VideoWriter(args.out, fps=16, overlay=args.overlay, action_space=get_action_space(args.mode)) as writer:
            if args.interactive:
                result = play_interactive(args, writer)
            else:
                actions = planned_actions(args.mode, args.blocks, args.trajectory, args.benchmark_seed)
                progress: Progress | None = None

                def on_block(block: ReceivedBlock, stream: SessionStream) -> None:
                    nonlocal progress
                    progress = progress or Progress(len(actions), stream.started_at)
                    writer.write(block.frames, block.action)
                    progress.update(block)

                result = run_session(args.address, args.image, args.mode, actions, seed=args.seed,
                                     frame_encoding="raw" if args.raw else "jpeg", jpeg_quality=args.jpeg_quality,
                                     pacing=args.pacing, window=args.window, on_block=on_block)
    except grpc.RpcError as e:
        print(f"\nsession failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (ConnectionError, ValueError) as e:  # unreachable server, bad trajectory file
        print(f"\n{e}", file=sys.stderr)
        return 1
    stats = result.summary()
    print(file=sys.stderr)
    print(f"session {result.info.session_id}: {stats['blocks']} blocks, {stats['frames']} frames of "
          f"{result.info.height}x{result.info.width} in {stats['seconds']:.2f} s; ended: "
          f"{result.end.detail if result.end else 'cancelled'}")
    print(f"time to first frame {stats['time_to_first_frame']:.3f} s | block latency mean "
          f"{stats['latency_mean'] * 1000:.0f} ms, p50 {stats['latency_p50'] * 1000:.0f} ms, max "
          f"{stats['latency_max'] * 1000:.0f} ms | {stats['fps']:.1f} FPS after the first block")
    print(f"video: {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
