"""Golden checks for the Wan 2.1 VAE: `wan_vae_encode` (encoder + cond_concat) and `wan_vae_stream_decode`."""
from __future__ import annotations

import torch

from worldstream.engine.conditioning import CondConcatStream
from worldstream.models.wan_vae import VAEDecodeStream, VAEEncodeStream, WanVAEDecoder, WanVAEEncoder

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]


def _vae_weights(tensors: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The file's `vae.<key>` tensors whose real key starts with one of `prefixes`, prefix `vae.` stripped."""
    return {key[len("vae."):]: value for key, value in tensors.items()
            if key.startswith("vae.") and key[len("vae."):].startswith(prefixes)}


def check_encode(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Pairs:
    encoder = WanVAEEncoder(**meta["vae_config"])
    encoder.load_state_dict(_vae_weights(tensors, ("encoder.", "conv1.")), strict=True)
    encoder.eval()
    pairs = [("vae.latent_mean", encoder.latent_mean, tensors["vae.latent_mean"]),
             ("vae.latent_std", encoder.latent_std, tensors["vae.latent_std"])]
    for video, output in (("input.clip", "output.clip_latents"), ("input.i2v_video", "output.i2v_latents")):
        pairs.append((output, VAEEncodeStream(encoder).encode(tensors[video]), tensors[output]))
    # the golden's i2v clip is [image, zeros...] over exactly one block of latents
    latent_frames = tensors["output.cond_concat"].shape[2]
    image = tensors["input.i2v_video"][:, :, 0]
    cond_concat = CondConcatStream(encoder, image, frames_per_block=latent_frames).next_block()
    pairs.append(("output.cond_concat", cond_concat, tensors["output.cond_concat"]))
    return pairs


def check_stream_decode(tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Pairs:
    decoder = WanVAEDecoder(**meta["vae_config"])
    decoder.load_state_dict(_vae_weights(tensors, ("decoder.", "conv2.")), strict=True)
    decoder.eval()
    stream = VAEDecodeStream(decoder)
    pairs: Pairs = []
    for block in range(meta["run"]["blocks"]):
        # golden layouts are [B, T, C, H, W]; the stream uses [B, C, T, H, W]
        video = stream.decode(tensors[f"block{block}.latents"].transpose(1, 2))
        pairs.append((f"block{block}.video", video.transpose(1, 2), tensors[f"block{block}.video"]))
        if block == 0:
            pairs += [(f"cache_after_block0.{i:02d}", entry, tensors[f"cache_after_block0.{i:02d}"])
                      for i, entry in enumerate(stream.cache)]
    return pairs


CHECKS = {"wan_vae_encode": check_encode, "wan_vae_stream_decode": check_stream_decode}
