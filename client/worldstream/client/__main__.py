"""worldstream-client: play sessions of a world model served by a decoder service, or interpolate a video.

    worldstream-client play --address 127.0.0.1:50051 --image my.png --benchmark --blocks 10 \
        --out out/session.mp4 [--overlay] [--raw] [--pacing lockstep|realtime]
    worldstream-client play ... --trajectory universal_demo     # a bundled trajectory, or a .json path
    worldstream-client play ... --interactive                   # W/A/S/D move, I/J/K/L look, Esc quits
    worldstream-client play --prompt "a red fox runs through snow" --blocks 7 --out out/t2v.mp4  # text-to-video
    worldstream-client play --prompt "a fox in snow" --prompt "the fox dives" --switch-at 4 --blocks 8  # LongLive
    worldstream-client play --prompt "a fox in snow" --interactive  # LongLive: type a prompt + Enter to switch
    worldstream-client play --video clip.mp4 --prompt "what the clip shows" --prompt "what happens next" --blocks 4
    worldstream-client play ... --tls-ca ca.pem [--tls-cert me.pem --tls-key me.key]  # TLS; --tls: system roots
    worldstream-client interpolate --address 127.0.0.1:50051 --video in.mp4 --factor 2 --out out.mp4 \
        [--batch K] [--payload tokens|frames]                   # against an EDEN deployment

The mode, its action space, the frame size and the frame rate come from the server's `SessionInfo`.
"""
from __future__ import annotations

import argparse
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc

from worldstream.api.trajectory import parse_trajectory, planned_actions, read_trajectory
from worldstream.v1 import session_pb2
from .interactive import KeyboardActions, PromptLines, TerminalKeys
from .interpolate import add_arguments as add_interpolate_arguments
from .session import ReceivedBlock, SessionResult, SessionStream, start_request, video_bytes
from .tls import add_tls_channel_arguments, channel_tls_from_args
from .video import VideoWriter, import_av

BUNDLED_TRAJECTORIES = Path(__file__).resolve().parent / "trajectories"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="worldstream-client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    play = commands.add_parser("play", help="stream a session and write its video",
                               description="Stream a session from a decoder service and write its video.")
    play.set_defaults(run=run_play)
    play.add_argument("--address", default="127.0.0.1:50051", help="decoder service host:port")
    start = play.add_mutually_exclusive_group(required=True)
    start.add_argument("--image", type=Path, help="first frame (PNG/JPEG), for image-and-action models")
    start.add_argument("--prompt", action="append",
                       help="text prompt, for text-to-video models (no actions); repeat it with --switch-at to "
                            "switch prompts (LongLive), and with --video the first one describes the clip")
    source = play.add_mutually_exclusive_group()
    source.add_argument("--trajectory", help="trajectory JSON file (worldstream.trajectory.v1) or the name of a "
                                             f"bundled one ({', '.join(bundled_trajectories())})")
    source.add_argument("--benchmark", action="store_true", help="the mode's reference benchmark trajectory")
    source.add_argument("--interactive", action="store_true", help="play with the keyboard in this terminal")
    play.add_argument("--switch-at", type=int, action="append", metavar="BLOCK",
                      help="block where the next --prompt takes over (repeat: one per prompt after the first)")
    play.add_argument("--video", type=Path, help="a clip to continue (LongLive): give its --prompt, then the one "
                                                 "of what follows")
    play.add_argument("--blocks", type=int, default=10, help="blocks to generate")
    play.add_argument("--out", type=Path, default=Path("out/session.mp4"), help="video to write")
    play.add_argument("--overlay", action="store_true", help="draw the applied action on the frames")
    play.add_argument("--raw", action="store_true", help="receive lossless raw RGB frames instead of JPEG")
    play.add_argument("--jpeg-quality", type=int, default=0, help="JPEG quality 1-100 (0 = server default)")
    play.add_argument("--pacing", choices=("lockstep", "realtime"), default=None,
                      help="default: lockstep, realtime for --interactive")
    play.add_argument("--seed", type=int, default=0, help="noise seed of the session")
    play.add_argument("--benchmark-seed", type=int, default=0, help="seed of the benchmark trajectory")
    play.add_argument("--window", type=int, default=2, help="LOCKSTEP actions kept in flight")
    add_tls_channel_arguments(play, what="the decoder service")
    add_interpolate_arguments(commands)
    args = parser.parse_args(argv)
    if args.command == "play":
        if args.blocks < 1:
            play.error("--blocks must be at least 1")
        if args.prompt is not None:
            _check_prompts(play, args)
        elif args.switch_at or args.video:
            play.error("--switch-at and --video are for text-to-video sessions: give --prompt")
        if args.image is not None and not (args.trajectory or args.benchmark or args.interactive):
            play.error("an --image session needs its actions: --trajectory, --benchmark or --interactive")
        args.pacing = args.pacing or ("realtime" if args.interactive else "lockstep")
    return args


def _check_prompts(play: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A --prompt session's flags, as `worldstream batch` takes them: one prompt (two with --video: the clip's,
    then what follows), plus one per --switch-at, at increasing blocks after the first."""
    if args.trajectory or args.benchmark or args.overlay:
        play.error("a --prompt session takes no actions: drop --trajectory, --benchmark and --overlay")
    switch_at = args.switch_at or []
    if args.interactive and switch_at:
        play.error("--interactive switches prompts as you type them: drop --switch-at (or --interactive)")
    video = args.video is not None
    expected = 1 + video + len(switch_at)
    if len(args.prompt) != expected:
        play.error(f"{len(args.prompt)} --prompt for {len(switch_at)} --switch-at" + (" and --video" if video else "")
                   + f": give {expected} (one" + (" for the clip, one for what follows" if video else "")
                   + " plus one per switch)")
    if switch_at != sorted(set(switch_at)) or not all(0 < b < args.blocks for b in switch_at):
        play.error(f"--switch-at {' '.join(map(str, switch_at))}: give increasing block indices in "
                   f"[1, {args.blocks - 1}], one per prompt after the first")


def bundled_trajectories() -> list[str]:
    return sorted(path.stem for path in BUNDLED_TRAJECTORIES.glob("*.json"))


def trajectory_path(name: str) -> Path:
    """A trajectory file given as a path or as the name of a bundled one."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = BUNDLED_TRAJECTORIES / f"{name}.json"
    if bundled.is_file():
        return bundled
    raise ValueError(f"no trajectory file {name!r}: give a path or a bundled name ({', '.join(bundled_trajectories())})")


class Progress:
    """One status line on stderr, rewritten per block."""

    def __init__(self, total: int, started_at: float):
        self.total = total
        self.started_at = started_at
        self.frames_after_first = 0
        self.first_at: float | None = None  # block 0's arrival (the FPS counts from there)
        self.first_frames_at = math.nan  # its first frames' arrival

    def update(self, block: ReceivedBlock) -> None:
        if self.first_at is None:
            self.first_at, self.first_frames_at = block.received_at, block.first_frames_at
        else:
            self.frames_after_first += block.frames.shape[0]
        done = block.index + 1
        span = block.received_at - self.first_at
        fps = self.frames_after_first / span if span > 0 else math.nan
        bar = "#" * (20 * done // self.total) + "." * (20 - 20 * done // self.total)
        sys.stderr.write(f"\r[{bar}] {done}/{self.total} blocks | block {block.latency * 1000:6.0f} ms | "
                         f"first frame {self.first_frames_at - self.started_at:5.2f} s | {fps:5.1f} FPS ")
        sys.stderr.flush()


def play_interactive(stream: SessionStream, controls: KeyboardActions, writer: VideoWriter) -> SessionResult:
    print(f"keys: {stream.space.key_help()}; Esc quits", file=sys.stderr)
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
                stream.send(stream.space.from_pressed(held))
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


def play_prompts_interactive(stream: SessionStream, lines: PromptLines, writer: VideoWriter) -> SessionResult:
    """A text-to-video session whose prompt switches as lines are typed (REALTIME: at the next block once
    encoded; LOCKSTEP: at the block of the next action, sent as each block arrives)."""
    print("type a new prompt and press Enter to switch to it; Ctrl-D ends the session", file=sys.stderr)
    result = SessionResult(stream.info, started_at=stream.started_at)
    on_block = writing(writer, Progress(stream.info.max_blocks, stream.started_at))

    def switch(prompt: str) -> None:
        try:
            stream.switch_prompt(prompt)
        except RuntimeError:  # the session is finishing
            return

    lines.start(switch, stream.finish)
    if stream.lockstep:
        stream.send(session_pb2.Action())
    for block in stream:
        result.blocks.append(block)
        if stream.lockstep and len(stream.sent_at) < stream.info.max_blocks:
            try:
                stream.send(session_pb2.Action())
            except RuntimeError:  # Ctrl-D: the blocks already asked for still come
                pass
        on_block(block, stream)
    result.end = stream.end
    result.video_frames = stream.video_frames
    return result


def writing(writer: VideoWriter, progress: Progress) -> Callable[[ReceivedBlock, SessionStream], None]:
    """The per-block callback of a planned session: write the block's frames (after a continued clip's
    reconstruction, which precedes block 0), show progress and where prompt switches took effect."""
    def on_block(block: ReceivedBlock, stream: SessionStream) -> None:
        if block.index == 0 and stream.video_frames is not None:
            writer.write(stream.video_frames)
        writer.write(block.frames, block.action)
        if block.switched is not None:
            sys.stderr.write(f"\nprompt switch #{block.switched.switch_count} took effect at block {block.index}\n")
        progress.update(block)
    return on_block


def run_play(args: argparse.Namespace) -> int:
    try:
        # Everything that can fail locally fails before the server spends anything on a session.
        import_av()
        document = read_trajectory(trajectory_path(args.trajectory)) if args.trajectory else None
        prompts = list(args.prompt or [])
        video = None if args.video is None else video_bytes(args.video)
        clip_prompt = prompts.pop(0) if video is not None else ""
        lines = PromptLines() if args.interactive and prompts else None
        terminal = TerminalKeys() if args.interactive and not prompts else None
        start = start_request(args.image, prompt=prompts[0] if prompts else "", seed=args.seed,
                              max_blocks=args.blocks, frame_encoding="raw" if args.raw else "jpeg",
                              jpeg_quality=args.jpeg_quality, pacing=args.pacing, video=video,
                              video_prompt=clip_prompt)
        del video  # the start holds it
        with SessionStream(args.address, start, tls=channel_tls_from_args(args)) as stream, \
                VideoWriter(args.out, fps=stream.info.fps, overlay=args.overlay, action_space=stream.space) as writer:
            if terminal is not None:
                with terminal:
                    result = play_interactive(stream, KeyboardActions(stream.space, terminal), writer)
            elif lines is not None:
                result = play_prompts_interactive(stream, lines, writer)
            elif prompts:
                result = stream.play([session_pb2.Action()] * args.blocks, window=args.window,
                                     on_block=writing(writer, Progress(args.blocks, stream.started_at)),
                                     switches=list(zip(args.switch_at or [], prompts[1:])))
            else:
                # The trajectory is checked against the action space the server announced.
                trajectory = None if document is None else parse_trajectory(document, stream.space, stream.layout,
                                                                            args.trajectory)
                actions = planned_actions(stream.space, stream.layout, args.blocks, trajectory, args.benchmark_seed)
                result = stream.play(actions, window=args.window,
                                     on_block=writing(writer, Progress(len(actions), stream.started_at)))
    except grpc.RpcError as e:
        print(f"\nsession failed: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as e:  # unreachable server, bad file, no PyAV, no terminal
        print(f"\n{e}", file=sys.stderr)
        return 1
    stats = result.summary()
    print(file=sys.stderr)
    print(f"session {result.info.session_id} ({result.info.mode}): {stats['blocks']} blocks, {stats['frames']} "
          f"frames of {result.info.height}x{result.info.width} in {stats['seconds']:.2f} s; ended: "
          f"{result.end.detail if result.end else 'cancelled'}")
    print(f"time to first frame {stats['time_to_first_frame']:.3f} s | block latency mean "
          f"{stats['latency_mean'] * 1000:.0f} ms, p50 {stats['latency_p50'] * 1000:.0f} ms, max "
          f"{stats['latency_max'] * 1000:.0f} ms | {stats['fps']:.1f} FPS after the first block")
    if result.video_frames is not None:
        print(f"the clip as the model reconstructs it ({result.video_frames.shape[0]} frames) comes first in the "
              "video")
    if result.switches:
        print("prompt switches took effect at blocks " + ", ".join(str(s.block_index) for s in result.switches))
    if result.info.prompt_tokens_dropped:
        print(f"the prompt was truncated to the model's 512 tokens: {result.info.prompt_tokens_dropped} tokens "
              "dropped")
    print(f"video: {args.out.resolve()} ({result.info.fps} fps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
