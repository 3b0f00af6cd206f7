"""Golden check for the CLIP visual tower (`clip_visual`: `CLIPModel.encode_video` at a tiny size)."""
from __future__ import annotations

import torch

from worldstream.models.clip import CLIPVisionTower, clip_visual_state_dict

# The configuration switches the tower implements; any other value would need a different architecture.
_FIXED_CONFIG = {"vision_pool": "token", "activation": "gelu", "pre_norm": True, "post_norm": False,
                 "use_31_block": True}


def check_clip_visual(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    config = meta["clip_config"]
    unsupported = {key: config.get(key) for key, value in _FIXED_CONFIG.items() if config.get(key) != value}
    if unsupported:
        raise ValueError(f"clip_visual golden uses a configuration the tower does not implement: {unsupported}")
    tower = CLIPVisionTower(image_size=config["image_size"], patch_size=config["patch_size"],
                            dim=config["vision_dim"], mlp_ratio=config["vision_mlp_ratio"],
                            num_heads=config["vision_heads"], num_layers=config["vision_layers"],
                            eps=config["norm_eps"], embed_dim=config["embed_dim"],
                            mean=config["mean"], std=config["std"])
    tower.load_state_dict(clip_visual_state_dict(tensors, prefix="model.visual."), strict=True)
    tower.eval()
    with torch.no_grad():
        pixels = tower.preprocess(tensors["input.video"])
        visual_context = tower(pixels)
    return [("intermediate.pixels", pixels, tensors["intermediate.pixels"]),
            ("output.visual_context", visual_context, tensors["output.visual_context"])]


CHECKS = {"clip_visual": check_clip_visual}
