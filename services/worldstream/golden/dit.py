"""Golden checks of the Matrix-Game-2 causal DiT block loop (`mg2_dit_blocks`, `mg2_gta_drive`, `mg2_templerun`).

The file's stored noise draws are replayed through the production block loop; every per-step flow and x0
prediction, the cache-update pass and the block results are compared.
"""
from __future__ import annotations

from typing import Callable

import torch

from worldstream.api.layout import BlockLayout
from ..engine.action_track import ActionTrack
from ..engine.block_loop import BlockDenoiser
from ..engine.scheduler import FlowMatchSchedule
from ..models.causal_wan import ActionConfig, CausalWanModel, DiTConfig
from ..models.checkpoints import load_strict

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]


class ReplayNoise:
    """Hands out the noise tensors the reference drew, in the order the block loop asks for them."""

    def __init__(self, draws: list[torch.Tensor]):
        self.draws = list(draws)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        draw = self.draws.pop(0)
        if draw.shape != like.shape:
            raise ValueError(f"replayed noise has shape {list(draw.shape)}, the loop asked for {list(like.shape)}")
        return draw


def dit_config_from_reference(model_config: dict, clip_dim: int | None = None) -> DiTConfig:
    """Build our config from a reference `config.json` dict (as stored in the golden metadata): model_type `t2v`
    has text cross-attention (text_dim, text_len), `i2v` image cross-attention (clip_dim, which config.json lacks)."""
    action = model_config.get("action_config")
    text = model_config["model_type"] == "t2v"
    return DiTConfig(
        dim=model_config["dim"], ffn_dim=model_config["ffn_dim"], freq_dim=model_config["freq_dim"],
        in_dim=model_config["in_dim"], out_dim=model_config["out_dim"], num_heads=model_config["num_heads"],
        num_layers=model_config["num_layers"], eps=model_config["eps"], clip_dim=None if text else clip_dim,
        text_dim=model_config["text_dim"] if text else None, text_len=model_config["text_len"],
        local_attn_size=model_config["local_attn_size"], sink_size=model_config.get("sink_size", 0),
        action=ActionConfig(**action) if action else None)


def golden_model(t: dict[str, torch.Tensor], cfg: DiTConfig) -> CausalWanModel:
    model = CausalWanModel(cfg)
    load_strict(model, {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}, "golden model.*")
    return model.eval()


def replay_block_loop(t: dict[str, torch.Tensor], pipe: dict, model: CausalWanModel, context: torch.Tensor,
                      block_inputs: Callable[[int], dict], file_layout: Callable[[torch.Tensor], torch.Tensor],
                      before_block: Callable[[int, BlockDenoiser], Pairs] | None = None,
                      output_prefix: torch.Tensor | None = None) -> Pairs:
    """Run the file's blocks through the production block loop, replaying the reference's noise draws, and pair
    the schedule, every step's tensors, each cache-update pass, block result and the output with the file's.

    `block_inputs(b)`: block b's per-block conditioning (`BlockDenoiser.denoise` keywords). `file_layout`: our
    [B, C, F, H, W] latents to the file's layout and back (the identity or a C/F swap: its own inverse).
    `before_block(b, denoiser)`: what runs before block b (conditioning, a prompt switch) and its pairs;
    `output_prefix`: latents the output starts with before the first block's (conditioning).
    """
    schedule = FlowMatchSchedule(shift=pipe["timestep_shift"])
    timesteps = schedule.warp(pipe["denoising_step_list"]) if pipe["warp_denoising_step"] \
        else [float(s) for s in pipe["denoising_step_list"]]
    blocks, steps = pipe["num_blocks"], len(timesteps)
    draws = []
    for b in range(blocks):
        draws.append(file_layout(t[f"block{b}.noise"]))
        draws += [file_layout(t[f"block{b}.step{s}.renoise"]) for s in range(steps - 1)]
    noise = file_layout(t["input.noise"])
    denoiser = BlockDenoiser(model, context, (noise.shape[1], noise.shape[3], noise.shape[4]), timesteps, schedule,
                             pipe["context_noise"], ReplayNoise(draws), pipe["num_frame_per_block"])

    pairs: Pairs = [("schedule.denoising_step_list", torch.tensor(timesteps), t["schedule.denoising_step_list"]),
                    ("schedule.sigmas", schedule.sigmas, t["schedule.sigmas"]),
                    ("schedule.timesteps", schedule.timesteps, t["schedule.timesteps"])]
    outputs = [] if output_prefix is None else [output_prefix]
    for b in range(blocks):
        if before_block is not None:
            pairs += before_block(b, denoiser)
        recorded: dict[str, torch.Tensor] = {}
        latents = denoiser.denoise(b, **block_inputs(b), observe=lambda name, x: recorded.__setitem__(name, x))
        for name, value in recorded.items():
            if name.endswith("noisy_input") and name.startswith("step0"):
                continue  # the replayed noise itself
            pairs.append((f"block{b}.{name}", file_layout(value), t[f"block{b}.{name}"]))
        outputs.append(latents)
    pairs.append(("output.latents", file_layout(torch.cat(outputs, dim=2)), t["output.latents"]))
    return pairs


def check_mg2_blocks(t: dict[str, torch.Tensor], meta: dict) -> Pairs:
    pipe = meta["pipeline"]
    model = golden_model(t, dit_config_from_reference(meta["model_config"], pipe["clip_dim"]))
    action = meta["model_config"]["action_config"]
    stride = action["vae_time_compression_ratio"]
    layout = BlockLayout(pipe["num_frame_per_block"], stride, action["windows_size"] * stride)
    last = pipe["num_blocks"] - 1
    mouse = t.get(f"block{last}.mouse_cond")
    track = ActionTrack.from_full(layout, t[f"block{last}.keyboard_cond"][0], mouse[0] if mouse is not None else None)

    def block_inputs(b: int) -> dict:
        kb_rows, mouse_rows = track.window_rows(b)
        return {"cond_concat": t[f"block{b}.cond_concat"], "keyboard_rows": kb_rows[None],
                "mouse_rows": mouse_rows[None] if mouse_rows is not None else None}

    return replay_block_loop(t, pipe, model, t["input.visual_context"], block_inputs, lambda x: x)


CHECKS = {"mg2_dit_blocks": check_mg2_blocks, "mg2_gta_drive": check_mg2_blocks, "mg2_templerun": check_mg2_blocks}
