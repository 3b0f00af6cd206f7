"""Encoder side of a world model: Wan VAE encoder + CLIP visual tower, producing a session's conditioning.

Mostly stateless: per session it keeps only the VAE encoder's causal conv caches, so that the conditioning
latents are encoded block by block, ahead of need, instead of the whole padded video up front.
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig
from PIL import Image

from ..models.clip import CLIPVisionTower, clip_visual_state_dict
from ..models.wan_vae import WanVAEEncoder, split_vae_state_dict
from .builders import building, channels_last_convs, load_weights, resolve_device, resolve_dtype
from .conditioning import CondConcatStream, SteadyCondConcat, preprocess_image


class EncoderModels:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.mode = str(cfg.mode)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype)
        self.height, self.width = int(cfg.video.height), int(cfg.video.width)
        self.frames_per_block = int(cfg.pipeline.frames_per_block)
        with building(self.device, self.dtype):
            vae = WanVAEEncoder(**cfg.vae)
            clip = CLIPVisionTower(image_size=cfg.clip.image_size, patch_size=cfg.clip.patch_size, dim=cfg.clip.dim,
                                   mlp_ratio=cfg.clip.mlp_ratio, num_heads=cfg.clip.num_heads,
                                   num_layers=cfg.clip.num_layers)
        self.vae = load_weights(vae, cfg, cfg.checkpoints.vae, select=lambda sd: split_vae_state_dict(sd)[0],
                                seed_offset=3).eval()
        self.clip = load_weights(clip, cfg, cfg.checkpoints.clip, select=clip_visual_state_dict,
                                 seed_offset=4).eval()
        self.steady = SteadyCondConcat.of_config(dict(cfg.vae), self.frames_per_block)
        if cfg.compile:
            # A session's first frame waits for CLIP and the block-0 VAE encode. Static shapes: CLIP has one;
            # the encoder a few (first chunks, caches filling; full-rate or reduced-rate only), all made at
            # warm-up, which runs on to the steady block.
            channels_last_convs(self.vae)
            trunk = self.vae.encoder
            trunk.full_rate = torch.compile(trunk.full_rate, dynamic=False)
            trunk.reduced_rate = torch.compile(trunk.reduced_rate, dynamic=False)
            self.clip.compile(dynamic=False)

    @classmethod
    def build(cls, cfg: DictConfig) -> "EncoderModels":
        return cls(cfg)

    def open_session(self, image: Image.Image) -> "ConditionSession":
        return ConditionSession(self, image)

    def warm_up(self, blocks: int = 2) -> float:
        """Encode a grey picture so that lazy start-up work is not paid by the first session, and (if `blocks`
        > 0) on to the steady block, which every session then gets without encoding; returns seconds."""
        start = time.perf_counter()
        if blocks > 0:
            session = self.open_session(Image.new("RGB", (self.width, self.height), (128, 128, 128)))
            try:
                for _ in range(max(blocks, self.steady.block + 1)):
                    session.next_block()
            finally:
                session.close()
        return time.perf_counter() - start


class ConditionSession:
    """One session's conditioning: CLIP tokens once, then `cond_concat` block after block."""

    @torch.no_grad()
    def __init__(self, models: EncoderModels, image: Image.Image):
        self.models = models
        pixels = preprocess_image(image, models.height, models.width).to(models.device, models.dtype)
        self.visual_context = models.clip.encode_video(pixels[:, :, None])  # [1, n_ctx, clip_dim]
        self.stream = CondConcatStream(models.vae, pixels, models.frames_per_block, models.steady)

    @property
    def block_index(self) -> int:
        return self.stream.block_index

    @torch.no_grad()
    def next_block(self) -> torch.Tensor:
        """The next block's cond_concat in the models' dtype (what the decoder computes in)."""
        return self.stream.next_block().to(self.models.dtype)

    def close(self) -> None:
        self.stream = None
