"""Wan 2.1 VAE: golden parity (encode, streaming decode), checkpoint key layout, streaming equivalences."""
from __future__ import annotations

import itertools
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import load_golden
from worldstream.engine.builders import channels_last_convs
from worldstream.engine.conditioning import CondConcatStream, SteadyCondConcat, image_free_block, preprocess_image
from worldstream.engine.config import load_config
from worldstream.golden.vae import CHECKS
from worldstream.models.wan_vae import (Resample, SteadyFullRate, VAEDecodeStream, VAEEncodeStream, WanVAEDecoder,
                                        WanVAEEncoder, split_vae_state_dict)

# Wan2.1_VAE.pth: 194 tensors, 126,892,531 parameters (73,295,603 in the decoder half); 4 bytes each plus
# ~40 KB of zip/pickle framing gives the published 507,609,880-byte file.
WAN_VAE_PARAMS = 126_892_531
WAN_VAE_DECODER_PARAMS = 73_295_603


def _assert_pairs_close(pairs) -> None:
    for name, actual, expected in pairs:
        assert actual.shape == expected.shape, name
        err = (actual.double() - expected.double()).abs()
        assert torch.all(err <= 1e-4 + 1e-4 * expected.double().abs()), f"{name}: max abs err {err.max():.3e}"
        # measured ~1e-6 relative (float32 summation order); anything near 1e-4 would be a real bug
        assert err.max() <= 1e-5 * max(1.0, expected.abs().max().item()), f"{name}: max abs err {err.max():.3e}"


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return module.eval()


# ------------------------------------------------------------------------------------------------ goldens

def test_golden_encode():
    tensors, meta = load_golden("wan_vae_encode")
    pairs = CHECKS["wan_vae_encode"](tensors, meta)
    assert {name for name, _, _ in pairs} >= {"output.clip_latents", "output.i2v_latents", "output.cond_concat"}
    _assert_pairs_close(pairs)


def test_golden_stream_decode():
    tensors, meta = load_golden("wan_vae_stream_decode")
    pairs = CHECKS["wan_vae_stream_decode"](tensors, meta)
    names = [name for name, _, _ in pairs]
    assert [n for n in names if n.endswith(".video")] == ["block0.video", "block1.video", "block2.video"]
    assert sum(n.startswith("cache_after_block0.") for n in names) == 32
    _assert_pairs_close(pairs)


def test_decode_stream_starts_empty_and_counts_frames():
    tensors, meta = load_golden("wan_vae_stream_decode")
    decoder = WanVAEDecoder(**meta["vae_config"])
    decoder.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith(("vae.decoder.", "vae.conv2."))})
    stream = VAEDecodeStream(decoder.eval())
    assert stream.cache == [None] * 32
    frames = [stream.decode(tensors[f"block{b}.latents"].transpose(1, 2)).shape[2] for b in range(3)]
    assert frames == [9, 12, 12]
    assert all(isinstance(entry, torch.Tensor) and entry.shape[2] == 2 for entry in stream.cache)


# ------------------------------------------------------------------------------------------------ layout

def test_full_size_checkpoint_layout():
    with torch.device("meta"):
        encoder, decoder = WanVAEEncoder(), WanVAEDecoder()
    enc_sd, dec_sd = encoder.state_dict(), decoder.state_dict()
    assert len(enc_sd) == 86 and len(dec_sd) == 108 and len(enc_sd) + len(dec_sd) == 194
    assert sum(k.startswith("encoder.") for k in enc_sd) == 84 and {"conv1.weight", "conv1.bias"} <= set(enc_sd)
    assert sum(k.startswith("decoder.") for k in dec_sd) == 106 and {"conv2.weight", "conv2.bias"} <= set(dec_sd)
    assert "latent_mean" not in enc_sd and "latent_std" not in dec_sd
    n_enc = sum(p.numel() for p in encoder.parameters())
    n_dec = sum(p.numel() for p in decoder.parameters())
    assert n_dec == WAN_VAE_DECODER_PARAMS and n_enc + n_dec == WAN_VAE_PARAMS
    # spot shapes from the spec (§5.1, §5.3)
    assert tuple(enc_sd["encoder.conv1.weight"].shape) == (96, 3, 3, 3, 3)
    assert tuple(enc_sd["encoder.middle.1.norm.gamma"].shape) == (384, 1, 1)
    assert tuple(dec_sd["decoder.upsamples.3.time_conv.weight"].shape) == (768, 384, 3, 1, 1)
    assert tuple(dec_sd["decoder.upsamples.4.shortcut.weight"].shape) == (384, 192, 1, 1, 1)
    assert tuple(dec_sd["decoder.upsamples.11.resample.1.weight"].shape) == (96, 192, 3, 3)
    assert decoder.decoder.num_cache_slots == 32

    full = {**enc_sd, **dec_sd}
    enc_half, dec_half = split_vae_state_dict(full)
    assert set(enc_half) == set(enc_sd) and set(dec_half) == set(dec_sd)
    with pytest.raises(ValueError):
        split_vae_state_dict({**full, "model.extra": torch.zeros(1)})


def test_latent_stats_stay_float32_when_cast():
    decoder = WanVAEDecoder(dim=4).to(torch.bfloat16)
    assert decoder.conv2.weight.dtype == torch.bfloat16
    assert decoder.latent_std.dtype == torch.float32
    assert decoder.latent_mean[7].item() == pytest.approx(1.5508, abs=1e-7)


def test_upsample_keeps_checkpoint_keys():
    shapes = {k: tuple(v.shape) for k, v in Resample(8, "upsample2d", itertools.count()).state_dict().items()}
    assert shapes == {"resample.1.weight": (4, 8, 3, 3), "resample.1.bias": (4,)}
    shapes = {k: tuple(v.shape) for k, v in Resample(8, "upsample3d", itertools.count()).state_dict().items()}
    assert shapes == {"resample.1.weight": (4, 8, 3, 3), "resample.1.bias": (4,),
                      "time_conv.weight": (16, 8, 3, 1, 1), "time_conv.bias": (16,)}


# ------------------------------------------------------------------------------------------------ upsampling

def _nearest_upsample_then_conv(conv: torch.nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """The reference formulation: ×2 nearest upsampling in float32, then the 3×3 conv at the doubled size."""
    upsampled = F.interpolate(images.float(), scale_factor=2, mode="nearest-exact").to(images.dtype)
    return F.conv2d(upsampled, conv.weight, conv.bias, padding=1)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["upsample2d", "upsample3d"])
def test_upsample_equals_nearest_upsample_then_conv(mode, channels_last):
    """The sub-pixel upsampling conv gives the reference's upsample + conv3×3 on odd sizes, chunk after chunk as
    the decoder feeds it (the second upsample3d stage gets 1 frame, then 2), with the compiled path's
    channels-last weights too."""
    resample = _random_(Resample(6, mode, itertools.count()), seed=11)
    if channels_last:
        channels_last_convs(resample)
    conv = resample.resample[1]
    gen = torch.Generator().manual_seed(12)
    fast_cache, reference_cache = [None], [None]
    for frames, frames_out in ((1, 1), (1, 2 if mode == "upsample3d" else 1), (2, 4 if mode == "upsample3d" else 2)):
        chunk = torch.randn(2, 6, frames, 5, 7, generator=gen)
        with torch.inference_mode():
            fast = resample(chunk, fast_cache)
            with mock.patch.object(conv, "forward", partial(_nearest_upsample_then_conv, conv)):
                reference = resample(chunk, reference_cache)
        assert fast.shape == reference.shape == (2, 3, frames_out, 10, 14)
        err = (fast - reference).abs().max().item()
        assert err <= 1e-5 * max(1.0, reference.abs().max().item()), f"max abs err {err:.3e}"


# ------------------------------------------------------------------------------------------------ streaming

def test_chunked_encode_equals_whole_video():
    encoder = _random_(WanVAEEncoder(dim=4), seed=1)
    video = torch.rand(1, 3, 17, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = VAEEncodeStream(encoder).encode(video)
    assert whole.shape == (1, 16, 5, 2, 3)
    for splits in ([1, 16], [5, 4, 8], [9, 4, 4], [1, 4, 4, 4, 4]):
        stream = VAEEncodeStream(encoder)
        parts = [stream.encode(part) for part in video.split(splits, dim=2)]
        assert torch.equal(torch.cat(parts, 2), whole), splits


def test_encode_stream_rejects_bad_chunk_lengths():
    stream = VAEEncodeStream(_random_(WanVAEEncoder(dim=4), seed=1))
    with pytest.raises(ValueError):
        stream.encode(torch.zeros(1, 3, 4, 8, 8))  # a stream starts with 1 + 4k frames
    stream.encode(torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError):
        stream.encode(torch.zeros(1, 3, 5, 8, 8))  # then 4k


def test_cond_concat_stream_equals_whole_video_encode():
    encoder = _random_(WanVAEEncoder(dim=4), seed=3)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    blocks, per_block = 4, 3
    latent_frames = blocks * per_block
    video = torch.cat([image[:, :, None], torch.zeros(1, 3, 4 * (latent_frames - 1), 16, 16)], 2)
    latents = VAEEncodeStream(encoder).encode(video)
    mask = torch.zeros(1, 4, latent_frames, 2, 2)
    mask[:, :, 0] = 1
    expected = torch.cat([mask, latents], 1)

    stream = CondConcatStream(encoder, image, frames_per_block=per_block)
    for b in range(blocks):
        assert stream.block_index == b
        block = stream.next_block()
        assert block.shape == (1, 20, per_block, 2, 2)
        assert torch.equal(block, expected[:, :, b * per_block:(b + 1) * per_block]), b
    assert stream.block_index == blocks


def test_image_leaves_the_encoder_receptive_field_at_latent_29():
    """Wan 2.1 encoder: 9 causal 3-frame convs at full rate (frame 0 reaches frame 18), stride-2 time conv (half
    frame 10), 4 convs (18), stride-2 time conv (quarter frame 10), 9 convs: latents 0..28 see the image."""
    vae = dict(load_config("mg2/universal").vae)
    assert image_free_block(vae, frames_per_block=1) == 29
    assert image_free_block(vae, frames_per_block=3) == 10  # block 9 = latents 27..29
    assert image_free_block(vae, frames_per_block=4) == 8
    assert SteadyFullRate.of_config(vae).chunk == 6  # conv1 + 8 convs at full rate: frame 0 reaches frame 18


def test_cond_concat_is_the_same_for_every_image_from_the_image_free_block():
    """Exact (bitwise) equality at the full config's depth: blocks >= 10 are equal across images and blocks."""
    encoder = _random_(WanVAEEncoder(**{**dict(load_config("mg2/universal").vae), "dim": 4}), seed=5)
    steady = image_free_block(dict(load_config("mg2/universal").vae), 3)
    runs = []
    for seed in (6, 7):
        image = torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        stream = CondConcatStream(encoder, image, frames_per_block=3)
        runs.append([stream.next_block() for _ in range(steady + 3)])
    first, second = runs
    assert not torch.equal(first[0], second[0])
    for b in range(steady, steady + 3):
        assert torch.equal(first[b], second[b]) and torch.equal(first[b], first[steady]), b


def test_steady_cond_concat_is_computed_once_and_shared():
    """A stream that fills the shared steady tensors and one that reuses them give exactly the plain encode."""
    encoder = _random_(WanVAEEncoder(dim=4), seed=8)
    images = [torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (9, 10)]
    steady = SteadyCondConcat.of_config({"dim": 4}, 3)
    assert (steady.block, steady.full_rate.chunk) == (10, 6)
    blocks = steady.block + 2
    plain = [[stream.next_block() for _ in range(blocks)]
             for stream in (CondConcatStream(encoder, image, frames_per_block=3) for image in images)]
    filling = CondConcatStream(encoder, images[0], frames_per_block=3, steady=steady)
    assert all(torch.equal(filling.next_block(), e) for e in plain[0])
    assert steady.value is not None and steady.full_rate.value is not None
    assert filling._stream is None  # caches dropped once the steady block is known

    reusing = CondConcatStream(encoder, images[1], frames_per_block=3, steady=steady)
    with mock.patch.object(encoder.encoder, "full_rate", wraps=encoder.encoder.full_rate) as full_rate:
        got = [reusing.next_block() for _ in range(blocks)]
    assert full_rate.call_count == steady.full_rate.chunk  # chunks 0-5 (blocks 0-1); blocks 2-9 skip them
    assert all(torch.equal(g, e) for g, e in zip(got, plain[1]))
    assert got[steady.block] is steady.value and got[-1] is steady.value
    assert reusing.block_index == blocks


def test_decode_in_blocks_matches_one_call():
    decoder = _random_(WanVAEDecoder(dim=4), seed=5)
    z = torch.randn(1, 16, 7, 2, 3, generator=torch.Generator().manual_seed(6))
    whole = VAEDecodeStream(decoder).decode(z)
    assert whole.shape == (1, 3, 1 + 4 * 6, 16, 24)
    stream = VAEDecodeStream(decoder)
    parts = torch.cat([stream.decode(z[:, :, :3]), stream.decode(z[:, :, 3:6]), stream.decode(z[:, :, 6:])], 2)
    torch.testing.assert_close(parts, whole, atol=1e-6, rtol=1e-6)
    assert whole.abs().max() <= 1.0


# ------------------------------------------------------------------------------------------------ preprocessing

def _coordinate_image(width: int, height: int) -> Image.Image:
    """RGB image whose R channel is the column index and G the row index (so crops are identifiable)."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs, ys, np.full_like(xs, 128)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return np.rint((pixels[0].permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).astype(np.int64)


def test_preprocess_center_crop_tall_image_rounds_like_pil():
    # h/w = 91/120 > 54/120: keep the width, crop height int(120·54/120) = 54, box rows 18.5..72.5 -> 18..72
    out = preprocess_image(_coordinate_image(120, 91), height=54, width=120)
    assert out.shape == (1, 3, 54, 120) and out.dtype == torch.float32
    rgb = _to_uint8(out)
    assert (rgb[..., 1] == np.arange(18, 72)[:, None]).all()
    assert (rgb[..., 0] == np.arange(120)[None, :]).all()


def test_preprocess_center_crop_wide_image():
    # h/w = 54/201 < 54/120: keep the height, crop width int(54·120/54) = 120, box cols 40.5..160.5 -> 40..160
    rgb = _to_uint8(preprocess_image(_coordinate_image(201, 54), height=54, width=120))
    assert (rgb[..., 0] == np.arange(40, 160)[None, :]).all()
    assert (rgb[..., 1] == np.arange(54)[:, None]).all()


def test_preprocess_resizes_bilinear_and_normalises():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 160, 3), dtype=np.uint8))
    out = preprocess_image(image, height=36, width=64)  # same aspect: no crop, only a PIL bilinear resize
    expected = np.asarray(image.resize((64, 36), Image.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(out[0].permute(1, 2, 0), torch.from_numpy((expected - 0.5) / 0.5))
    white = preprocess_image(Image.new("RGB", (32, 16), (255, 255, 255)), 16, 32)
    black = preprocess_image(Image.new("L", (32, 16), 0), 16, 32)
    assert torch.all(white == 1.0) and torch.all(black == -1.0)
