"""Decoder side of a world model: the causal DiT, its per-session caches, the block loop and streaming VAE decode.

`DecoderModels` is built once per process; `GenerationSession` is one user's stream. Batch and streaming
front-ends both call `GenerationSession.run_block` (or `launch_block`) block after block: one core, two front-ends. The same code
runs every configuration of the causal DiT: Matrix-Game-2 sessions start from CLIP tokens and take a
`cond_concat` and an action per block; text-to-video sessions (Self-Forcing, LongLive) start from a prompt's text
context and take nothing per block. LongLive sessions may switch prompts between blocks (`switch_prompt`), and a
text-to-video session may continue a video (`condition_on_video`).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from torch.profiler import record_function

from worldstream.api.spaces import ACTION_SPACES, ActionSpace, BlockAction
from ..models.causal_wan import ROPE_MAX_FRAMES
from ..models.kv_cache import recache_phases, session_phases
from ..models.wan_vae import VAEDecodeStream, WanVAEDecoder, split_vae_state_dict
from .action_track import ActionTrack, config_layout
from .block_loop import BlockDenoiser, GaussianNoise, NoiseSource
from .cuda_graphs import DiTGraphPool
from .builders import (build_dit, building, channels_last_convs, dit_config, load_weights, resolve_device,
                       resolve_dtype)
from .scheduler import FlowMatchSchedule


@dataclass
class BlockOutput:
    index: int
    frames: torch.Tensor  # uint8 [T, H, W, 3] on the CPU
    latents: torch.Tensor  # [1, 16, n, h, w] on the model's device
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage ("recache" after a switch)
    switched: bool = False  # the first block under a prompt given by `switch_prompt`


class StageClock:
    """Stage durations without host syncs: CUDA events on a GPU (read once the block is on the host)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> int:
        """Mark the end of stage `name` (a stage may end several times: its durations add up); returns the
        mark's index (for `wait`)."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))
        return len(self.marks) - 1

    def wait(self, mark: int = -1) -> None:
        """Wait until mark `mark` (the last by default) is reached on the device. Sessions share the device's
        stream, so this waits for this block's work up to there (and whatever was queued before it), never for
        work queued after it."""
        if self.cuda and self.marks:
            self.marks[mark][1].synchronize()

    def durations(self) -> dict[str, float]:
        """Seconds between consecutive marks, named by the later one and added up per name (call after
        `wait`)."""
        out: dict[str, float] = {}
        for (_, start), (name, end) in zip(self.marks, self.marks[1:]):
            out[name] = out.get(name, 0.0) + (start.elapsed_time(end) / 1000.0 if self.cuda else end - start)
        return out


@dataclass
class PendingBlock:
    """A block whose device work is queued. Its frames reach the host latent by latent, each latent's before
    the next one's decode and before the block's cache update: `wait_part(i)` waits for latent i's frames,
    `result()` for the whole block (its frames, the parts' in order, and its stage timings)."""
    index: int
    latents: torch.Tensor  # [1, 16, n, h, w] on the model's device
    parts: list[tuple[torch.Tensor, int]]  # per latent: uint8 frames [t, H, W, 3] on the host, complete at mark
    clock: StageClock
    switched: bool

    @property
    def part_count(self) -> int:
        return len(self.parts)

    def wait_part(self, i: int) -> torch.Tensor:
        """The frames of the block's latent i once they are on the host (1 for a stream's first latent, else 4)."""
        frames, mark = self.parts[i]
        self.clock.wait(mark)
        return frames

    def result(self) -> BlockOutput:
        self.clock.wait()
        frames = torch.cat([frames for frames, _ in self.parts])
        return BlockOutput(self.index, frames, self.latents, self.clock.durations(), self.switched)


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoded video [1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the same device.

    Same conversion as the reference drivers: ((x + 1) * 127.5) clipped to [0, 255], then truncated.
    """
    return ((video[0].float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0)


def build_vae_decoder(cfg: DictConfig) -> WanVAEDecoder:
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.vae_decoder_dtype)
    with building(device, dtype):
        decoder = WanVAEDecoder(**cfg.vae)
    decoder = load_weights(decoder, cfg, cfg.checkpoints.vae, select=lambda sd: split_vae_state_dict(sd)[1],
                           seed_offset=2).eval()
    if cfg.compile:
        channels_last_convs(decoder)
        # The trunk decodes one latent frame per call; static shapes give a graph for each of a stream's
        # first latents (their caches are still filling) and one for all later ones, all made at warm-up.
        decoder.decoder.compile(dynamic=False)
    return decoder


def session_block_limit(cfg: DictConfig) -> tuple[int, str]:
    """Blocks a session of this config may have, and why: `limits.max_blocks`, or fewer where the KV cache never
    rolls (Self-Forcing's global cache of 21 latent frames: 7 blocks)."""
    limit = int(cfg.limits.max_blocks)
    frames_per_block = int(cfg.pipeline.frames_per_block)
    cached = dit_config(cfg).cache_policy().max_frames
    if cached is not None and cached // frames_per_block < limit:
        blocks = cached // frames_per_block
        return blocks, (f"the global KV cache holds {cached} latent frames, {blocks} blocks of {frames_per_block}; "
                        "a config with a rolling window (dit.local_attn_size) allows longer sessions")
    return limit, f"limits.max_blocks is {limit}"


class DecoderModels:
    """Everything a decoder process loads once: DiT + VAE decoder + the schedule of the mode."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mode = str(cfg.mode)
        self.device = resolve_device(cfg.device)
        # Matrix-Game-2 modes take an action per block; text-to-video takes none.
        self.action_space: ActionSpace | None = ACTION_SPACES[self.mode] if dit_config(cfg).action else None
        self.layout = config_layout(cfg)
        self.dit = build_dit(cfg)
        self.vae = build_vae_decoder(cfg)
        pipe = cfg.pipeline
        self.schedule = FlowMatchSchedule(shift=float(pipe.timestep_shift))
        steps = list(pipe.denoising_step_list)
        self.timesteps = self.schedule.warp(steps) if pipe.warp_denoising_step else [float(s) for s in steps]
        self.frames_per_block = int(pipe.frames_per_block)
        self.latent_shape = (int(cfg.dit.out_dim), int(cfg.video.height) // 8, int(cfg.video.width) // 8)
        self.max_blocks, self.block_limit = session_block_limit(cfg)
        # LongLive's configs say whether a prompt switch keeps the frame sink; the others cannot switch
        self.global_sink: bool | None = bool(pipe.global_sink) if "global_sink" in pipe else None
        sink = self.dit.cfg.sink_size
        if sink % self.frames_per_block:
            # (the reference's recompute protection would keep a block's first, noisy keys in the sink)
            raise ValueError(f"dit.sink_size ({sink}) must be a multiple of pipeline.frames_per_block "
                             f"({self.frames_per_block}): no block may straddle the frame sink")
        # CUDA graphs of the DiT call (captured by `warm_up`); on a CPU every call runs op by op.
        self.dit_graphs = (DiTGraphPool(self.dit, self.latent_shape, self.context_shape[1])
                           if self.device.type == "cuda" and cfg.cuda_graphs else None)
        # Sessions share the device's stream. On a GPU one at a time queues its work there, so that a block's
        # kernels stand together on it and its stage events time that session's work, not another's kernels queued
        # in between. A CPU runs the work as it is queued: there sessions run side by side (two tiny sessions on 2
        # cores: 9.4 FPS together side by side, 7.0 one at a time), and their stage times include each other's.
        self.enqueuing: contextlib.AbstractContextManager = (
            threading.Lock() if self.device.type == "cuda" else contextlib.nullcontext())

    @property
    def text_to_video(self) -> bool:
        return self.dit.cfg.text_dim is not None

    @property
    def switches_prompts(self) -> bool:
        """Sessions may switch prompts between blocks (LongLive: a frame-sink window and its re-cache)."""
        return self.global_sink is not None and self.text_to_video

    @property
    def continues_videos(self) -> bool:
        """Sessions may start by continuing a video (`condition_on_video`): text-to-video configs with a
        `conditioning` section (its clip limits)."""
        return self.text_to_video and "conditioning" in self.cfg

    @property
    def context_shape(self) -> tuple[int, int, int]:
        """A session's cross-attention context: CLIP tokens [1, 257, clip_dim] or a prompt's text context
        [1, text_len, text_dim]."""
        dit = self.dit.cfg
        if self.text_to_video:
            return 1, dit.text_len, dit.text_dim
        clip = self.cfg.clip
        return 1, 1 + (int(clip.image_size) // int(clip.patch_size)) ** 2, dit.clip_dim

    def condition_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the conditioning tensors a session consumes (what the encoder side produces): the context
        (`visual_context` or `prompt_embeds`) and, where the model takes one, the per-block `cond_concat`."""
        shapes: dict[str, tuple[int, ...]] = {
            "prompt_embeds" if self.text_to_video else "visual_context": self.context_shape}
        cond_channels = self.dit.cfg.cond_channels
        if cond_channels:
            _, height, width = self.latent_shape
            shapes["cond_concat"] = (1, cond_channels, self.frames_per_block, height, width)
        return shapes

    def warm_up(self, blocks: int | None = None, sessions: int = 1) -> float:
        """Run throwaway sessions on neutral conditioning so that lazy start-up work (CUDA context, kernel
        selection, torch.compile, CUDA graph capture) happens here and not in a user's first blocks. Returns
        the seconds it took.

        By default it runs through every cache phase of a session (3 blocks at 3 frames per block in a rolling
        window of 6, all 7 of a global cache of 21 frames): every shape the compiled block loop takes, including
        the VAE decoder's first-latent cache shapes. Where sessions switch prompts, it switches before the blocks
        that give every shape of the re-cache too (LongLive: before blocks 1 to 7 of 8). With CUDA graphs, each
        of the `sessions` concurrent sessions gets a cache set with a graph per phase; later sessions beyond that
        many run the DiT without graphs (re-caches never use graphs)."""
        start = time.perf_counter()
        policy = self.dit.cache_policy
        switch_before = (set(recache_phases(policy, self.frames_per_block, self.global_sink).values())
                         if self.switches_prompts else set())
        if blocks is None:
            blocks = max([len(session_phases(policy, self.frames_per_block)), *(b + 1 for b in switch_before)])
        blocks = min(blocks, self.max_blocks)
        if blocks > 0:
            dtype = resolve_dtype(self.cfg.dtype)
            context = torch.zeros(self.context_shape, device=self.device, dtype=dtype)
            cond_shape = self.condition_shapes().get("cond_concat")
            cond = torch.zeros(cond_shape, device=self.device, dtype=dtype) if cond_shape else None
            action = self.action_space.idle_action() if self.action_space else None
            if self.dit_graphs is None:
                capturing, sessions = contextlib.nullcontext(), 1  # one session warms up everything else
            else:
                capturing = self.dit_graphs.capturing(sessions)
            with capturing, contextlib.ExitStack() as opened:
                throwaway = [self.open_session(context, seed=0, max_blocks=blocks) for _ in range(sessions)]
                for session in throwaway:
                    opened.callback(session.close)
                for b in range(blocks):
                    for session in throwaway:
                        if b in switch_before:
                            session.switch_prompt(context)
                        session.run_block(cond, action)
        return time.perf_counter() - start

    @classmethod
    def build(cls, cfg: DictConfig) -> "DecoderModels":
        return cls(cfg)

    def open_session(self, context: torch.Tensor, seed: int, max_blocks: int,
                     noise: NoiseSource | None = None) -> "GenerationSession":
        """A session on `context` (see `context_shape`: CLIP tokens, or a prompt's text context, whose rows
        past text_len are refused and missing rows zero-padded)."""
        if not 1 <= max_blocks <= self.max_blocks:
            raise ValueError(f"max_blocks must be in [1, {self.max_blocks}] for this config ({self.block_limit}), "
                             f"got {max_blocks}")
        self.check_context(context)
        with self.enqueuing:  # the caches' set-up
            return GenerationSession(self, context, seed, max_blocks, noise)

    def check_context(self, context: torch.Tensor) -> None:
        """ValueError unless `context` fits `context_shape` (a text context may have fewer rows)."""
        expected = self.context_shape
        if context.dim() != 3 or context.shape[0] != 1 or context.shape[2] != expected[2] or (
                context.shape[1] != expected[1] and not self.text_to_video):
            raise ValueError(f"the session context has shape {list(context.shape)}; this model takes "
                             f"{list(expected)}" + (" (fewer rows are zero-padded)" if self.text_to_video else ""))


class GenerationSession:
    def __init__(self, models: DecoderModels, context: torch.Tensor, seed: int, max_blocks: int,
                 noise: NoiseSource | None = None):
        self.models = models
        self.max_blocks = max_blocks
        self.block_index = 0
        device = models.device
        # Host memory: actions arrive there; each block's window goes to the device by `_to_device`.
        self.track = (ActionTrack.for_space(models.action_space, models.layout, max_blocks)
                      if models.action_space is not None else None)
        self.takes_cond = models.dit.cfg.cond_channels > 0
        self.denoiser = BlockDenoiser(models.dit, context, models.latent_shape, models.timesteps,
                                      models.schedule, float(models.cfg.pipeline.context_noise),
                                      noise or GaussianNoise(seed, device), models.frames_per_block,
                                      models.dit_graphs.take() if models.dit_graphs else None)
        self.vae = VAEDecodeStream(models.vae)
        self.closed = False
        self.next_context: torch.Tensor | None = None  # a switched prompt the next block starts with

    @property
    def finished(self) -> bool:
        return self.block_index >= self.max_blocks

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError("session is closed")
        if self.finished:
            raise IndexError(f"session already produced its {self.max_blocks} blocks: no block is left for {what}")

    def switch_prompt(self, context: torch.Tensor) -> None:
        """Generate from the next block on under `context` (another prompt's text context). That block first
        re-caches the frames the window holds under it (LongLive's `_recache_after_switch`, a "recache" stage
        in its timings) and says `switched`. Before the first block it only replaces the session's prompt; a
        later call before the same block replaces the one before."""
        self._check_open("the new prompt")
        models = self.models
        if not models.switches_prompts:
            raise ValueError("this model generates from an image and actions, not prompts" if not
                             models.text_to_video else f"a {models.cfg.family} session cannot switch prompts: the "
                             "switch re-caches a rolling window with a frame sink (LongLive configs)")
        models.check_context(context)
        self.next_context = context

    @torch.no_grad()
    def condition_on_video(self, latents: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Continue a video (spec §4.4): before the first block, cache its conditioning latents [1, 16, T, h, w]
        (T whole blocks, `clips.encode_clip`) under the session's prompt, one block of latents per call at
        t = context_noise, then generate under `context` (the second prompt: cross-attention only, no re-cache).
        The streaming VAE decoder decodes the latents first, so that the first block's frames continue them.
        Returns that reconstruction of the video, uint8 [1 + 4·(T - 1), H, W, 3] on the CPU."""
        self._check_open("the video")
        models = self.models
        if self.block_index or self.denoiser.frames_cached:
            raise RuntimeError("a session is conditioned on a video before its first block, once")
        if not models.text_to_video:
            raise ValueError("this model generates from an image and actions; video conditioning is for "
                             "text-to-video configs")
        models.check_context(context)
        channels, height, width = models.latent_shape
        if latents.dim() != 5 or latents.shape[0] != 1 or latents.shape[1] != channels or \
                tuple(latents.shape[3:]) != (height, width):
            raise ValueError(f"conditioning latents have shape {list(latents.shape)}; this model takes "
                             f"[1, {channels}, T, {height}, {width}]")
        frames = latents.shape[2] + self.max_blocks * models.frames_per_block
        reach = min(ROPE_MAX_FRAMES, models.dit.cache_policy.max_frames or ROPE_MAX_FRAMES)
        if frames > reach:
            raise ValueError(f"{latents.shape[2]} latent frames of conditioning and {self.max_blocks} blocks make "
                             f"{frames} latent frames; a session of this config reaches {reach}")
        with models.enqueuing:
            self.denoiser.condition(self._to_device(latents))
            self.denoiser.set_context(context)
            video = video_to_uint8(self.vae.decode(latents.to(models.device, models.vae.conv2.weight.dtype)))
        return video.cpu()  # (waits for the device: outside the lock, which only orders the queueing)

    def launch_block(self, cond_concat: torch.Tensor | None = None, action: BlockAction | None = None
                     ) -> PendingBlock:
        """Queue the device work of the next block, free of host syncs; `result()` of the answer waits for its
        frames (`wait_part` for each latent's). A caller may queue the next block before it waits, so that the
        device never idles between blocks. The frames are queued before the cache update (same stream: the next
        block still sees the updated caches), so that they do not wait for it. (Running the VAE decode on a
        second stream beside the next block's DiT steps was measured on an H200: both are GPU-bound, and the
        services lost 5 FPS.)

        `cond_concat` and `action`: the block's conditioning where the model takes them (Matrix-Game-2), None
        where it does not (text-to-video)."""
        self._check_open("another block")
        if (cond_concat is not None) != self.takes_cond or (action is not None) != (self.track is not None):
            raise ValueError("this model takes a cond_concat and an action per block" if self.takes_cond else
                             "this model (text-to-video) takes no per-block cond_concat or action")
        b = self.block_index
        clock = StageClock(self.models.device)
        switched = self.next_context is not None and self.denoiser.frames_cached > 0
        with self.models.enqueuing, record_function(f"block_{b}"):
            with record_function("data_preparation"):
                keyboard = mouse = None
                if self.track is not None:
                    self.track.write_block(b, action)
                    keyboard, mouse = (self._to_device(rows) for rows in self.track.window_rows(b))
                    keyboard, mouse = keyboard[None], None if mouse is None else mouse[None]
                cond_concat = self._to_device(cond_concat)
            clock.mark("start")
            if self.next_context is not None:
                self.denoiser.switch_context(self.next_context, self.models.global_sink)
                self.next_context = None
                if switched:  # (before anything is cached, a switch only sets the context)
                    clock.mark("recache")
            parts: list[tuple[torch.Tensor, int]] = []
            latents = self.denoiser.denoise(b, cond_concat, keyboard, mouse, clock=clock,
                                            before_cache_update=lambda x0: parts.extend(self._frames(x0, clock)))
        self.block_index += 1
        return PendingBlock(b, latents, parts, clock, switched)

    def _frames(self, latents: torch.Tensor, clock: StageClock) -> list[tuple[torch.Tensor, int]]:
        """Queue the VAE decode of a block's latents one at a time, each one's frames then copied to the host;
        returns each latent's frames and the clock mark at which they are there."""
        latents = latents.to(self.models.vae.conv2.weight.dtype)
        parts = []
        for i in range(latents.shape[2]):
            with record_function("vae_decode"):
                video = self.vae.decode(latents[:, :, i:i + 1])
            clock.mark("vae_decode")
            with record_function("to_host"):
                frames = video_to_uint8(video).to("cpu", non_blocking=True)
            parts.append((frames, clock.mark("to_host")))
        return parts

    def _to_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Move host inputs to the model's device through pinned memory: an asynchronous copy (a copy from
        pageable memory would synchronise). Each block stages its own pinned buffer, so no copy races a write."""
        if tensor is None or tensor.device == self.models.device:
            return tensor
        if self.models.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.models.device, non_blocking=True)
        return tensor.to(self.models.device)

    def run_block(self, cond_concat: torch.Tensor | None = None, action: BlockAction | None = None) -> BlockOutput:
        """The next block, its frames on the host."""
        return self.launch_block(cond_concat, action).result()

    def close(self) -> None:
        """Free the session's device state (caches, decoder cache) at once; idempotent."""
        if not self.closed:
            self.closed = True
            self.denoiser.release()
            self.vae = None
