"""Golden check for the UMT5 text encoder (`umt5_encoder`: Wan's `WanTextEncoder` on token ids + mask, tiny size)."""
from __future__ import annotations

import torch

from worldstream.models.checkpoints import load_strict
from worldstream.models.umt5 import UMT5Config, UMT5Encoder, relative_position_bucket


def check_umt5_encoder(tensors: dict[str, torch.Tensor], meta: dict[str, object]
                       ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    config, run = meta["model_config"], meta["run"]
    if config.get("shared_pos", False) or not run.get("encoder_only", True):
        raise ValueError("umt5_encoder golden: only the encoder with per-layer position bias is implemented")
    cfg = UMT5Config(vocab_size=config["vocab_size"], dim=config["dim"], dim_attn=config["dim_attn"],
                     dim_ffn=config["dim_ffn"], num_heads=config["num_heads"], num_layers=config["encoder_layers"],
                     num_buckets=config["num_buckets"], max_distance=run["max_dist"])
    model = UMT5Encoder(cfg).eval()
    prefix = "model."
    load_strict(model, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, "umt5_encoder golden")
    ids, mask = tensors["input.ids"], tensors["input.mask"]
    text_len = run["text_len"]
    offsets = torch.arange(2 * text_len - 1) - (text_len - 1)  # key - query
    results = [("intermediate.rel_bucket", relative_position_bucket(offsets, cfg.num_buckets, cfg.max_distance),
                tensors["intermediate.rel_bucket"])]
    layer_outputs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: layer_outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        encoder_out = model(ids, mask)  # full length, padding rows included, as stored
    for hook in hooks:
        hook.remove()
    results += [(f"intermediate.block{i}.out", out, tensors[f"intermediate.block{i}.out"])
                for i, out in enumerate(layer_outputs)]
    results.append(("intermediate.encoder_out", encoder_out, tensors["intermediate.encoder_out"]))
    with torch.no_grad():
        prompt_embeds = model.encode(ids, mask)  # the production path (runs up to the longest prompt)
    results.append(("output.prompt_embeds", prompt_embeds, tensors["output.prompt_embeds"]))
    return results


CHECKS = {"umt5_encoder": check_umt5_encoder}
