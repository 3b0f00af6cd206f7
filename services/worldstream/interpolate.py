"""Batch front-end of frame interpolation: video in, interpolated video out, in one process, through the same core
the services run (`engine.interpolation`), so it gives the frames a client gets from the services.

    worldstream interpolate --config eden/interpolate_tiny --video in.mp4 --factor 2 --out out.mp4 [--batch K]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from worldstream.client.interpolate import OutputClip, read_video
from worldstream.client.video import VideoWriter

from .engine.config import add_config_arguments, config_from_args


def interpolated_clip(interpolator, frames: Iterator[np.ndarray], *, factor: int, batch: int, seed: int,
                      payload: str, sink) -> int:
    """Interpolate uint8 RGB frames [H, W, 3] with an `EdenInterpolator`; the output clip goes frame by frame to
    `sink`. Returns the number of pairs."""
    import torch

    from .engine.interpolation import interpolate_frames

    clip = OutputClip(factor, sink)

    def inputs() -> Iterator[torch.Tensor]:
        for frame in frames:
            clip.add_input(frame)
            yield torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)

    pairs = 0
    for result in interpolate_frames(interpolator, inputs(), factor=factor, batch=batch, seed=seed, payload=payload):
        for i, new in enumerate(result.frames.numpy()):
            for k, frame in enumerate(new):
                clip.add_new((result.first_pair + i) * factor + k + 1, frame)
        pairs += result.frames.shape[0]
    clip.finish()
    return pairs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--video", type=Path, required=True, help="input video (anything PyAV reads)")
    parser.add_argument("--factor", type=int, choices=(2, 4), default=2, help="output frames per input interval")
    parser.add_argument("--out", type=Path, default=Path("out/interpolated.mp4"), help="video to write (fps x factor)")
    parser.add_argument("--batch", type=int, default=0, help="frame pairs per forward, K (0 = the config's limit)")
    parser.add_argument("--payload", help="run the split's payload in between, as the services do: tokens_fp32, "
                                          "tokens_bf16, frames or frames_jpeg (default: the config's transfer.payload)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")


def run(args: argparse.Namespace) -> int:
    from .engine.eden import EdenInterpolator
    from .engine.interpolation import PAYLOADS

    cfg = config_from_args(args)
    if cfg.family != "eden":
        raise SystemExit(f"worldstream interpolate: error: {args.config} is a {cfg.family} config; use an eden one")
    if args.payload not in (None, *PAYLOADS):
        raise SystemExit(f"worldstream interpolate: error: --payload {args.payload!r}: use one of {PAYLOADS}")
    interpolator = EdenInterpolator(cfg)
    batch = args.batch or interpolator.max_pairs
    frames, fps, _ = read_video(args.video)
    started = time.perf_counter()
    try:
        with VideoWriter(args.out, fps=fps * args.factor) as writer:
            pairs = interpolated_clip(interpolator, frames, factor=args.factor, batch=batch, seed=args.seed,
                                      payload=args.payload or str(cfg.transfer.payload),
                                      sink=lambda frame: writer.write(frame[None]))
    except ValueError as err:
        raise SystemExit(f"worldstream interpolate: error: {err}") from None
    seconds = time.perf_counter() - started
    print(f"wrote {args.out} ({writer.frames_written} frames at {float(fps * args.factor):g} fps): {pairs} pairs in "
          f"{seconds:.1f} s, {pairs / seconds:.2f} pairs/s")
    return 0
