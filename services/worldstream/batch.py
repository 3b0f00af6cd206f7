"""Batch front-end: image + action trajectory (or a prompt) -> mp4, in one process, through the same block loop the
services run.

    worldstream batch --config mg2/universal_tiny --blocks 10 --out out/batch.mp4 --overlay
    worldstream batch --config mg2/universal --blocks 50 --profile out/trace.json
    worldstream batch --config selfforcing/t2v_tiny --prompt "a red fox runs through snow" --blocks 7 --out out/t2v.mp4
    worldstream batch --config longlive/interactive_tiny --prompt "a fox in snow" --prompt "the fox dives" \
        --switch-at 4 --blocks 8 --out out/switch.mp4
    worldstream batch --config longlive/interactive_tiny --video clip.mp4 --prompt "what the clip shows" \
        --prompt "what happens next" --blocks 4 --out out/continued.mp4

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
from .engine.clips import build_vae_encoder, conditioning_latents, conditioning_pixel_frames, decode_clip, encode_clip
from .engine.config import config_from_args
from .engine.encoder import EncoderModels
from .engine.generator import DecoderModels, GenerationSession, session_block_limit
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

    def start(self, session: GenerationSession) -> None:
        return None

    def block(self, b: int, session: GenerationSession) -> tuple[torch.Tensor, BlockAction]:
        return self.session.next_block(), self.actions[b]

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


class PromptConditioning:
    """Text-to-video: the prompts' text contexts (UMT5), nothing per block. The first prompt starts the session,
    the next ones take over at their `switch_blocks` (LongLive); with `clip` (pixels, `clips.decode_clip`) the
    session first continues the clip, described by the first prompt, under the second."""

    def __init__(self, cfg: DictConfig, prompts: list[str], switch_blocks: list[int],
                 clip: torch.Tensor | None = None):
        self.encoder = build_text_encoder(cfg)
        self.prompts = prompts
        self.switch_blocks = switch_blocks
        self.clip_latents = None
        if clip is not None:
            self.clip_latents = encode_clip(build_vae_encoder(cfg), clip, int(cfg.pipeline.frames_per_block),
                                            int(cfg.conditioning.max_latents))
        self.contexts: list[torch.Tensor] = []
        self.switch_to: dict[int, torch.Tensor] = {}

    def open(self) -> torch.Tensor:
        # One encoder call per prompt, as the encoder service makes them: a batch of prompts rounds differently
        # (its matrix products have another shape), and sessions must give the batch CLI's frames.
        encoded = [self.encoder([prompt]) for prompt in self.prompts]
        for prompt, each in zip(self.prompts, encoded):
            if each.truncated[0]:
                log.warning("the prompt %r was truncated to %d tokens (%d dropped), as the reference truncates it",
                            prompt[:40], each.lengths[0], each.truncated[0])
        self.contexts = [each.context for each in encoded]
        switched = self.contexts[len(self.contexts) - len(self.switch_blocks):]
        self.switch_to = dict(zip(self.switch_blocks, switched))
        return self.contexts[0]

    def start(self, session: GenerationSession) -> torch.Tensor | None:
        """The clip's frames, as the session reconstructs them, when there is one."""
        if self.clip_latents is None:
            return None
        return session.condition_on_video(self.clip_latents, self.contexts[1])

    def block(self, b: int, session: GenerationSession) -> tuple[None, None]:
        if b in self.switch_to:
            session.switch_prompt(self.switch_to[b])
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
            with record_function("session_setup"):
                lead = conditioning.start(session)
            if lead is not None:
                writer.write(lead.numpy())
            for b in range(blocks):
                t0 = time.perf_counter()
                with record_function("conditioning"):
                    cond, action = conditioning.block(b, session)
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
    frames = writer.frames_written
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
        if not args.prompt:
            raise ValueError(f"{args.config} is a text-to-video config: give --prompt")
        if args.trajectory or args.overlay:
            raise ValueError(f"{args.config} is a text-to-video config: it takes no actions (--trajectory, --overlay)")
        for prompt in args.prompt:
            check_prompt(prompt)
        switch_blocks = args.switch_at or []
        _check_switches(cfg, args, blocks, switch_blocks)
        clip = None
        if args.video is not None:
            clip = decode_clip(args.video, int(cfg.video.fps), int(cfg.video.height), int(cfg.video.width),
                               conditioning_pixel_frames(int(cfg.conditioning.max_latents)))
            conditioning_latents(clip.shape[2], int(cfg.pipeline.frames_per_block), int(cfg.conditioning.max_latents))
        return functools.partial(PromptConditioning, cfg, args.prompt, switch_blocks, clip)
    if args.prompt or args.switch_at or args.video:
        raise ValueError(f"{args.config} generates from an image and actions, not prompts: drop --prompt, "
                         "--switch-at and --video or use a text-to-video config such as selfforcing/t2v_tiny")
    space, layout = get_action_space(str(cfg.mode)), config_layout(cfg)
    trajectory = load_trajectory(args.trajectory, space, layout) if args.trajectory else None
    actions = planned_actions(space, layout, blocks, trajectory, args.benchmark_seed)
    return functools.partial(ImageConditioning, cfg, args.image, actions)


def _check_switches(cfg: DictConfig, args: argparse.Namespace, blocks: int, switch_blocks: list[int]) -> None:
    """The prompts fit the session: one (two with --video: the clip's, then the video's), plus one per switch."""
    video = args.video is not None
    if video and "conditioning" not in cfg:
        raise ValueError(f"{args.config} does not continue videos (--video); use a LongLive config such as "
                         "longlive/interactive_tiny")
    expected = 1 + video + len(switch_blocks)
    if len(args.prompt) != expected:
        raise ValueError(f"{len(args.prompt)} --prompt for {len(switch_blocks)} --switch-at"
                         + (" and --video" if video else "") + f": give {expected} (one"
                         + (" for the clip, one for what follows" if video else "") + " plus one per switch)")
    if switch_blocks and "global_sink" not in cfg.pipeline:
        raise ValueError(f"{args.config} cannot switch prompts (--switch-at); use a LongLive config such as "
                         "longlive/interactive_tiny")
    if switch_blocks != sorted(set(switch_blocks)) or not all(0 < b < blocks for b in switch_blocks):
        raise ValueError(f"--switch-at {' '.join(map(str, switch_blocks))}: give increasing block indices in "
                         f"[1, {blocks - 1}], one per prompt after the first")
