"""Golden checks of LongLive v1.0: `longlive_switch` (prompt switches with the KV re-cache) and `video_conditional`
(a clip's latents cached, then generation under a second prompt; spec §4.4).

The production path: the model in the LongLive configuration (window 12, sink 3) with the file's PEFT LoRA merged
into its base weights at load, the block loop replaying the reference's noise draws, `switch_context` for the
re-cache, `condition` for the clip, the clip resizing and the VAE of `clips.py` / `wan_vae.py`. Everything comes
from each file's own metadata. The files store latents as [B, F, C, H, W] and the KV caches in the reference's
physical slot order (sink first, then the rolling frames oldest first); ours are [B, C, F, H, W] and a ring.
"""
from __future__ import annotations

import torch

from ..engine.block_loop import BlockDenoiser
from ..engine.clips import frames_to_pixels, resize_pixels
from ..models.causal_wan import CausalWanModel
from ..models.checkpoints import load_strict
from ..models.kv_cache import RollingWindow
from ..models.lora import check_lora, lora_targets, merge_lora
from ..models.wan_vae import VAEDecodeStream, VAEEncodeStream, WanVAEDecoder, WanVAEEncoder
from .dit import Pairs, dit_config_from_reference, replay_block_loop
from .selfforcing import frames_second
from .vae import _vae_weights


def longlive_model(t: dict[str, torch.Tensor], meta: dict) -> CausalWanModel:
    """The file's DiT: base weights `model.*` with the adapter `lora.*` (rank and alpha from the metadata's
    `adapter`) merged in, strictly, as the LongLive configs load `longlive_base.pt` + `lora.pt`."""
    model = CausalWanModel(dit_config_from_reference(meta["model_config"]))
    adapter = meta["adapter"]
    lora = {k[len("lora."):]: v for k, v in t.items() if k.startswith("lora.")}
    targets = lora_targets(model)
    check_lora(lora, targets, adapter["rank"], "golden lora.*")
    base = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    merged = merge_lora(base, lora, targets, adapter["alpha"] / adapter["rank"], torch.float32, "cpu")
    load_strict(model, merged, "golden model.* + lora.*")
    return model.eval()


def kv_snapshot(prefix: str, t: dict[str, torch.Tensor], denoiser: BlockDenoiser) -> Pairs:
    """The caches of every layer against the file's snapshot `prefix.kv_after.*`: our ring slots put in the
    reference's order (the sink, then the rolling frames oldest first), and its end indices (in tokens) from the
    frames cached, which a re-cache does not move."""
    policy: RollingWindow = denoiser.model.cache_policy
    end = denoiser.frames_cached
    order = list(range(policy.frames))
    if end > policy.frames:  # rolled: the ring starts at the oldest frame's slot
        ring = policy.frames - policy.sink
        order[policy.sink:] = [policy.slots(f, 1).first for f in range(end - ring, end)]
    pairs: Pairs = []
    tokens = 0
    for layer, caches in enumerate(denoiser.dit.caches.layers):
        cache = caches.self_attn
        tokens = cache.tokens_per_frame
        for name, value in (("k", cache.k), ("v", cache.v)):
            key = f"{prefix}.kv_after.layer{layer}.{name}"
            pairs.append((key, torch.cat([value[:, s * tokens:(s + 1) * tokens] for s in order], dim=1), t[key]))
    layers = len(denoiser.dit.caches.layers)
    for name, frames in (("global_end_index", end), ("local_end_index", min(end, policy.frames))):
        key = f"{prefix}.kv_after.{name}"
        pairs.append((key, torch.full((layers,), frames * tokens), t[key]))
    return pairs


def recache_pairs(name: str, t: dict[str, torch.Tensor], recorded: dict[str, torch.Tensor]) -> Pairs:
    """Our re-cache call against the file's. Once the window has rolled we run only the frames whose keys are
    written (`RollingWindow.recache`): the file's last ones."""
    ours = recorded["recache.flow_pred"].shape[2]
    part = "" if ours == t[f"{name}.input"].shape[1] else f"[last {ours} frames]"
    return [(f"{name}.{k}{part}", frames_second(recorded[f"recache.{k}"]), t[f"{name}.{k}"][:, -ours:])
            for k in ("input", "flow_pred", "x0_pred")]


def reference_pipeline(meta: dict) -> dict:
    """The file's pipeline metadata with the keys the block-loop replay reads (LongLive nests the shift)."""
    pipe = meta["pipeline"]
    return pipe | {"timestep_shift": pipe["model_kwargs"]["timestep_shift"]}


def check_switch(t: dict[str, torch.Tensor], meta: dict) -> Pairs:
    pipe = reference_pipeline(meta)
    model = longlive_model(t, meta)
    keep_sink = pipe["global_sink"]
    switches = {int(t[f"switch{i}.block"]): i for i in range(len(pipe["switch_blocks"]))}

    def before_block(b: int, denoiser: BlockDenoiser) -> Pairs:
        if b not in switches:
            return []
        i = switches[b]
        segment = int(t[f"switch{i}.segment"])
        recorded: dict[str, torch.Tensor] = {}
        denoiser.switch_context(t[f"input.prompt{segment}.prompt_embeds"], keep_sink, recorded.__setitem__)
        return recache_pairs(f"switch{i}.recache", t, recorded) + kv_snapshot(f"switch{i}", t, denoiser)

    return replay_block_loop(t, pipe, model, t["input.prompt0.prompt_embeds"], lambda b: {}, frames_second,
                             before_block)


def check_video_conditional(t: dict[str, torch.Tensor], meta: dict) -> Pairs:
    pipe = reference_pipeline(meta)
    height, width = pipe["target_hw"]
    pixels = resize_pixels(frames_to_pixels(t["input.video_uint8"]), height, width)  # [T, 3, H, W]
    encoder = WanVAEEncoder(**meta["vae_config"])
    encoder.load_state_dict(_vae_weights(t, ("encoder.", "conv1.")), strict=True)
    latents = VAEEncodeStream(encoder.eval()).encode(pixels.transpose(0, 1)[None])
    pairs: Pairs = [("enc.pixels", pixels[None], t["enc.pixels"]),
                    ("enc.cond_latents", frames_second(latents), t["enc.cond_latents"])]

    model = longlive_model(t, meta)

    def before_block(b: int, denoiser: BlockDenoiser) -> Pairs:
        if b:
            return []
        recorded: dict[str, torch.Tensor] = {}
        denoiser.condition(latents, recorded.__setitem__)  # under prompt 1
        denoiser.set_context(t["input.prompt2.prompt_embeds"])  # then prompt 2, no re-cache
        return [(name, frames_second(value), t[name]) for name, value in recorded.items()] + \
            kv_snapshot("cond", t, denoiser)

    pairs += replay_block_loop(t, pipe | {"num_blocks": pipe["num_new_blocks"]}, model,
                               t["input.prompt1.prompt_embeds"], lambda b: {}, frames_second, before_block,
                               output_prefix=latents)

    decoder = WanVAEDecoder(**meta["vae_config"])
    decoder.load_state_dict(_vae_weights(t, ("decoder.", "conv2.")), strict=True)
    stream = VAEDecodeStream(decoder.eval())
    # as the session streams it: the conditioning latents warm the decoder, then block after block
    output = frames_second(dict((name, ours) for name, ours, _ in pairs)["output.latents"])
    chunks = [latents] + list(output[:, :, latents.shape[2]:].split(pipe["num_frame_per_block"], dim=2))
    video = torch.cat([stream.decode(chunk) for chunk in chunks], dim=2)
    pairs.append(("output.video", frames_second(video * 0.5 + 0.5).clamp(0, 1), t["output.video"]))
    return pairs


CHECKS = {"longlive_switch": check_switch, "video_conditional": check_video_conditional}
