"""Batch front-end: image + action trajectory (or a prompt) -> mp4, in one process, through the same block loop the
services run.

    worldstream batch --config mg2/universal_tiny --blocks 10 --out out/batch.mp4 --overlay
    worldstream batch --config mg2/universal --blocks 50 --profile out/trace.json
    worldstream batch --config selfforcing/t2v_tiny --prompt "a red fox runs through snow" --blocks 7 --out out/t2v.mp4

`--profile` writes a Chrome trace (chrome://tracing, Perfetto) with nested tags: conditioning per block,
block_<b> > data_preparation / denoise_step_<s>_t<t> / cache_update / vae_decode, and to_host.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile, record_function

from worldstream.api.spaces import BlockAction, get_action_space
from worldstream.api.trajectory import load_trajectory, planned_actions
from worldstream.client.video import VideoWriter

from .engine.action_track import config_layout
from .engine.builders import dit_config
from .engine.config import config_from_args
from .engine.encoder import EncoderModels
from .engine.generator import DecoderModels, session_block_limit
from .engine.text import build_text_encoder, check_prompt
from .media import load_image

log = logging.getLogger("worldstream.batch")
DEFAULT_BLOCKS = 10


class ImageConditioning:
    """Matrix-Game-2: the encoder side's CLIP tokens and per-block cond_concat of an image, and planned actions."""

    def __init__(self, cfg: DictConfig, image_path: Path, actions: list[BlockAction]):
        self.models = EncoderModels.build(cfg)
        self.image = load_image(image_path)
        self.actions = actions
        self.session = None

    def open(self) -> torch.Tensor:
        self.session = self.models.open_session(self.image)
        return self.session.visual_context

    def block(self, b: int) -> tuple[torch.Tensor, BlockAction]:
        return self.session.next_block(), self.actions[b]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class PromptConditioning:
    """Text-to-video: the prompt's text context (UMT5), nothing per block."""

    def __init__(self, cfg: DictConfig, prompt: str):
        self.encoder = build_text_encoder(cfg)
        self.prompt = prompt

    def open(self) -> torch.Tensor:
        encoded = self.encoder([self.prompt])
        if encoded.truncated[0]:
            log.warning("the prompt was truncated to %d tokens (%d dropped), as the reference truncates it",
                        encoded.lengths[0], encoded.truncated[0])
        return encoded.context

    def block(self, b: int) -> tuple[None, None]:
        return None, None

    def close(self) -> None:
        pass


def generate(cfg: DictConfig, conditioning: ImageConditioning | PromptConditioning, blocks: int, out: Path,
             seed: int, overlay: bool, profile_path: Path | None = None) -> dict[str, float]:
    decoder_models = DecoderModels.build(cfg)
    if cfg.compile:
        decoder_models.warm_up()  # compile every shape now, outside the timings and the trace
    profiler = contextlib.nullcontext()
    if profile_path is not None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        profiler = profile(activities=activities, record_shapes=False)
    started = time.perf_counter()
    latencies, first_frame = [], None
    with profiler as prof, VideoWriter(out, fps=int(cfg.video.fps), overlay=overlay,
                                       action_space=decoder_models.action_space) as writer:
        with record_function("session_setup"):
            context = conditioning.open()
            session = decoder_models.open_session(context, seed=seed, max_blocks=blocks)
        try:
            for b in range(blocks):
                t0 = time.perf_counter()
                with record_function("conditioning"):
                    cond, action = conditioning.block(b)
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
    frames = decoder_models.layout.track_frames(blocks)
    return {"blocks": blocks, "frames": frames, "seconds": total, "fps": frames / total,
            "time_to_first_frame": first_frame or 0.0, "mean_block_latency": sum(latencies) / len(latencies)}


def run(args: argparse.Namespace) -> int:
    """`worldstream batch` (its flags: `cli.add_batch_arguments`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    try:
        limit, why = session_block_limit(cfg)
        blocks = min(DEFAULT_BLOCKS, limit) if args.blocks is None else args.blocks
        if not 1 <= blocks <= limit:
            raise ValueError(f"--blocks {blocks}: a session of {args.config} has 1 to {limit} blocks ({why})")
        conditioning = _conditioning(cfg, args, blocks)
    except ValueError as err:
        raise SystemExit(f"worldstream batch: error: {err}") from None
    stats = generate(cfg, conditioning(), blocks, args.out, args.seed, args.overlay, args.profile)
    print(f"wrote {args.out} ({stats['frames']} frames, {stats['blocks']} blocks) in {stats['seconds']:.1f} s: "
          f"{stats['fps']:.1f} FPS, first block after {stats['time_to_first_frame']:.2f} s, "
          f"{stats['mean_block_latency'] * 1000:.0f} ms per block")
    if args.profile:
        print(f"trace: {args.profile}")
    return 0


def _conditioning(cfg: DictConfig, args: argparse.Namespace,
                  blocks: int) -> Callable[[], ImageConditioning | PromptConditioning]:
    """Check the flags against what the config's model takes (a prompt, or an image and actions) before any model
    is loaded; returns what builds the session's conditioning."""
    if dit_config(cfg).text_dim is not None:
        if args.prompt is None:
            raise ValueError(f"{args.config} is a text-to-video config: give --prompt")
        if args.trajectory or args.overlay:
            raise ValueError(f"{args.config} is a text-to-video config: it takes no actions (--trajectory, --overlay)")
        check_prompt(args.prompt)
        return functools.partial(PromptConditioning, cfg, args.prompt)
    if args.prompt is not None:
        raise ValueError(f"{args.config} generates from an image and actions, not a prompt: drop --prompt or use a "
                         "text-to-video config such as selfforcing/t2v_tiny")
    space, layout = get_action_space(str(cfg.mode)), config_layout(cfg)
    trajectory = load_trajectory(args.trajectory, space, layout) if args.trajectory else None
    actions = planned_actions(space, layout, blocks, trajectory, args.benchmark_seed)
    return functools.partial(ImageConditioning, cfg, args.image, actions)
