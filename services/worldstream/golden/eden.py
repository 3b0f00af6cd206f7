"""Golden check for EDEN (`eden_pair`: one frame pair through the encoder half, the two Euler steps and the decoder)."""
from __future__ import annotations

import torch

from worldstream.models.checkpoints import load_strict
from worldstream.models.eden import Eden, EdenConfig, encode_pairs

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]

# Reference switches the model implements (use_xformers only picks an attention kernel with the same math).
_FIXED_MODEL_ARGS = {"attn_drop_rate": 0.0, "proj_drop_rate": 0.0, "add_attn_decoder": True,
                     "add_attn_type": "temporal_attn"}
_FIXED_INFERENCE = {"sampling_method": "euler", "path": "Linear", "prediction": "velocity"}
_ARCHITECTURE = ("in_dim", "out_dim", "patch_size", "latent_dim", "hidden_dim", "num_heads", "mlp_ratio",
                 "dit_depth", "decoder_depth", "qkv_bias")
_INFERENCE = ("cos_sim_mean", "cos_sim_std", "vae_scaler", "vae_shift")


def check_eden_pair(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Pairs:
    args, inference = meta["model_args"], meta["inference"]
    unsupported = {key: value for fixed, given in ((_FIXED_MODEL_ARGS, args), (_FIXED_INFERENCE, inference))
                   for key, value in given.items() if key in fixed and value != fixed[key]}
    if unsupported:
        raise ValueError(f"eden_pair golden uses a configuration EDEN here does not implement: {unsupported}")
    cfg = EdenConfig(**{key: args[key] for key in _ARCHITECTURE}, **{key: inference[key] for key in _INFERENCE},
                     time_grid=tuple(inference["ode_time_grid"]))
    model = Eden(cfg).eval()
    load_strict(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}, "eden_pair")

    pairs = encode_pairs(tensors["input.frame0"], tensors["input.frame1"], cfg)
    tokens = model.patchify(pairs)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    noise = tensors["dit.noise"]
    samples = model.sample(tokens, noise, on_step=lambda x, t, v: steps.append((x, t, v)))
    latents = model.unscale(samples)
    ph, pw = pairs.geometry.token_grid

    def expected(name: str, actual: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
        # the reference runs one pair without our leading pair axis: compare in the file's shape
        return name, actual.reshape(tensors[name].shape), tensors[name]

    results = [expected("enc.difference", pairs.difference),
               expected("enc.cond_frames", pairs.frames),
               expected("enc.stats_mean", tokens.stats_mean),
               expected("enc.stats_std", tokens.stats_std),
               expected("enc.ph", torch.tensor([ph])),
               expected("enc.pw", torch.tensor([pw])),
               expected("enc.pos_embedding", tokens.pos),
               expected("dit.query_pos_embedding", tokens.query_pos),
               expected("enc.cond_dit", tokens.cond_dit),
               expected("enc.cond_dec", tokens.cond_dec)]
    for i, (x, t, v) in enumerate(steps):
        results += [expected(f"dit.step{i}.x", x), expected(f"dit.step{i}.t", t), expected(f"dit.step{i}.velocity", v)]
    results += [expected("dit.ode_states", torch.stack([noise, *(x for x, _, _ in steps[1:]), samples])),
                expected("dit.samples", samples),
                expected("dec.latents", latents),
                expected("dec.frame_raw", model.decode(latents, tokens)),
                expected("output.frame", model.interpolate(tokens, noise))]
    return results


CHECKS = {"eden_pair": check_eden_pair}
