"""Golden check of the Self-Forcing T2V causal DiT block loop (`selfforcing_t2v_blocks`).

The same production block loop as the Matrix-Game-2 checks, in the T2V configuration: text cross-attention on the
file's prompt embeddings, no per-block conditioning, the global KV cache (21 latent frames, never rolling). The
file stores latents as [B, F, C, H, W]; ours are [B, C, F, H, W].
"""
from __future__ import annotations

import torch

from .dit import Pairs, dit_config_from_reference, golden_model, replay_block_loop


def frames_second(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] <-> [B, F, C, H, W]."""
    return x.transpose(1, 2)


def check_selfforcing_blocks(t: dict[str, torch.Tensor], meta: dict) -> Pairs:
    model = golden_model(t, dit_config_from_reference(meta["model_config"]))
    return replay_block_loop(t, meta["pipeline"], model, t["input.prompt_embeds"], lambda b: {}, frames_second)


CHECKS = {"selfforcing_t2v_blocks": check_selfforcing_blocks}
