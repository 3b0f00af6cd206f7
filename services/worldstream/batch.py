"""Batch front-end: image + action trajectory -> mp4, in one process, through the same block loop the services run.

    worldstream batch --config mg2/universal_tiny --blocks 10 --out out/batch.mp4 --overlay
    worldstream batch --config mg2/universal --blocks 50 --profile out/trace.json

`--profile` writes a Chrome trace (chrome://tracing, Perfetto) with nested tags: conditioning per block,
block_<b> > data_preparation / denoise_step_<s>_t<t> / cache_update / vae_decode, and to_host.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile, record_function

from worldstream.api.spaces import BlockAction, get_action_space
from worldstream.api.trajectory import load_trajectory, planned_actions
from worldstream.client.video import VideoWriter

from .engine.config import config_from_args
from .engine.action_track import config_layout
from .engine.encoder import EncoderModels
from .engine.generator import DecoderModels
from .media import load_image


def generate(cfg: DictConfig, image_path: Path, actions: list[BlockAction], out: Path, seed: int, overlay: bool,
             profile_path: Path | None = None) -> dict[str, float]:
    encoder_models, decoder_models = EncoderModels.build(cfg), DecoderModels.build(cfg)
    if cfg.compile:
        decoder_models.warm_up()  # compile every shape now, outside the timings and the trace
    image = load_image(image_path)
    profiler = contextlib.nullcontext()
    if profile_path is not None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        profiler = profile(activities=activities, record_shapes=False)
    started = time.perf_counter()
    latencies, first_frame = [], None
    with profiler as prof, VideoWriter(out, fps=int(cfg.video.fps), overlay=overlay,
                                       action_space=decoder_models.action_space) as writer:
        with record_function("session_setup"):
            conditioning = encoder_models.open_session(image)
            session = decoder_models.open_session(conditioning.visual_context, seed=seed, max_blocks=len(actions))
        try:
            for action in actions:
                t0 = time.perf_counter()
                with record_function("conditioning"):
                    cond = conditioning.next_block()
                result = session.run_block(cond, action)
                latencies.append(time.perf_counter() - t0)
                first_frame = first_frame or time.perf_counter() - started
                writer.write(result.frames.numpy(), action)
        finally:
            session.close()
            conditioning.close()
    if profile_path is not None:
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(profile_path))
    total = time.perf_counter() - started
    frames = decoder_models.layout.track_frames(len(actions))
    return {"blocks": len(actions), "frames": frames, "seconds": total, "fps": frames / total,
            "time_to_first_frame": first_frame or 0.0, "mean_block_latency": sum(latencies) / len(latencies)}


def run(args: argparse.Namespace) -> int:
    """`worldstream batch` (its flags: `cli.add_batch_arguments`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    try:
        space, layout = get_action_space(str(cfg.mode)), config_layout(cfg)
        trajectory = load_trajectory(args.trajectory, space, layout) if args.trajectory else None
        actions = planned_actions(space, layout, args.blocks, trajectory, args.benchmark_seed)
    except ValueError as err:
        raise SystemExit(f"worldstream batch: error: {err}") from None
    stats = generate(cfg, args.image, actions, args.out, args.seed, args.overlay, args.profile)
    print(f"wrote {args.out} ({stats['frames']} frames, {stats['blocks']} blocks) in {stats['seconds']:.1f} s: "
          f"{stats['fps']:.1f} FPS, first block after {stats['time_to_first_frame']:.2f} s, "
          f"{stats['mean_block_latency'] * 1000:.0f} ms per block")
    if args.profile:
        print(f"trace: {args.profile}")
    return 0
