"""EDEN frame-pair interpolation: golden parity, published layout, per-request state, batching, the split."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_golden
from worldstream.engine.config import load_config
from worldstream.engine.eden import EdenInterpolator, build_eden, build_eden_patchify, eden_config, pair_noise
from worldstream.golden.cli import compare, run_file
from worldstream.golden.eden import CHECKS
from worldstream.models.checkpoints import CheckpointError
from worldstream.models.eden import Eden, EdenConfig, EdenPatchify, PairGeometry, encode_pairs

FULL_SIZE_PARAMS = 157_882_400  # spec section 5.2, the `eden` entry of eden.pt
COND_LAYER_PARAMS = 1_184_256   # patch_cond_dit/dec + norm_cond_dit/dec


@pytest.fixture(scope="module")
def interpolator() -> EdenInterpolator:
    return EdenInterpolator(load_config("eden/interpolate_tiny"))


def frames(k: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A correlated pair of uint8 frames per pair, like neighbouring video frames."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (k, 3, height, width), generator=g)
    shift = torch.randint(-12, 13, (k, 3, height, width), generator=g)
    return base.to(torch.uint8), (base + shift).clamp(0, 255).to(torch.uint8)


def run_pair(model: Eden, cfg: EdenConfig, frame0, frame1, seeds) -> torch.Tensor:
    tokens = model.patchify(encode_pairs(frame0, frame1, cfg))
    return model.interpolate(tokens, pair_noise(model.noise_shape(tokens), seeds))


def test_golden_parity():
    tensors, meta = load_golden("eden_pair")
    results = CHECKS[meta["kind"]](tensors, meta)
    names = [name for name, _, _ in results]
    assert {"enc.cond_dit", "enc.cond_dec", "dit.step1.velocity", "dit.ode_states", "dec.frame_raw",
            "output.frame"} <= set(names)
    for name, actual, expected in results:
        _, rel, ok = compare(actual, expected)
        assert ok and rel <= 1e-5, (name, rel)


def test_full_size_parameters_on_meta():
    with torch.device("meta"):
        model = Eden(eden_config(load_config("eden/interpolate")))
        cond_layers = EdenPatchify(EdenConfig())
    assert sum(p.numel() for p in model.parameters()) == FULL_SIZE_PARAMS
    assert sum(p.numel() for p in cond_layers.parameters()) == COND_LAYER_PARAMS
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert shapes["adaLN_modulation.1.weight"] == (4608, 768)
    assert shapes["patch_cond_dit.weight"] == (768, 3, 16, 16)
    assert shapes["proj_out.weight"] == (32, 768)
    assert shapes["unpatchify.3.weight"] == (768, 768)
    assert shapes["dit_blocks.11.temp_attn.qkv.weight"] == (2304, 768)
    assert shapes["decoder_blocks.3.mlp.fc1.weight"] == (3072, 768)
    assert not any(key.endswith(("qkv.bias", "proj.bias")) for key in shapes)  # qkv_bias false
    assert "decoder_blocks.4.norm_mlp.weight" not in shapes and "dit_blocks.12.mlp.fc2.bias" not in shapes


@pytest.fixture(scope="module")
def published(tmp_path_factory, interpolator):
    """The tiny random model saved as the published eden.pt is laid out: {"eden": state_dict}."""
    root = tmp_path_factory.mktemp("EDEN")
    torch.save({"eden": interpolator.model.state_dict()}, root / "eden.pt")
    return root


def test_published_layout_loads_strictly_and_gives_the_same_frames(published, interpolator):
    cfg = load_config("eden/interpolate_tiny", [f"checkpoints.root={published}", "init_seed=null"])
    loaded = EdenInterpolator(cfg)
    frame0, frame1 = frames(2, 40, 72, seed=1)
    assert torch.equal(loaded.interpolate(frame0, frame1, [5, 6]), interpolator.interpolate(frame0, frame1, [5, 6]))
    cond_layers = build_eden_patchify(cfg)
    assert cond_layers.state_dict().keys() == EdenPatchify(eden_config(cfg)).state_dict().keys()


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {("proj_out.weights" if k == "proj_out.weight" else k): v for k, v in sd.items()},
     r"eden.pt: missing key 'proj_out.weight' \(expected shape \[32, 64\]"),
    (lambda sd: sd | {"dit_blocks.2.mlp.fc1.weight": torch.zeros(256, 64)},
     r"eden.pt: unexpected key 'dit_blocks.2.mlp.fc1.weight'"),
    (lambda sd: sd | {"proj_in.weight": torch.zeros(64, 17)},
     r"eden.pt: key 'proj_in.weight' has shape \[64, 17\], the model expects \[64, 16\]"),
])
def test_wrong_key_fails_clearly(tmp_path, interpolator, edit, message):
    torch.save({"eden": edit(interpolator.model.state_dict())}, tmp_path / "eden.pt")
    cfg = load_config("eden/interpolate_tiny", [f"checkpoints.root={tmp_path}", "init_seed=null"])
    with pytest.raises(CheckpointError, match=message):
        build_eden(cfg)


def test_training_artefact_or_missing_file_is_named(tmp_path, interpolator):
    cfg = load_config("eden/interpolate_tiny", [f"checkpoints.root={tmp_path}", "init_seed=null"])
    with pytest.raises(CheckpointError, match="not found: .*eden.pt"):
        build_eden(cfg)
    torch.save({"eden_vae": interpolator.model.state_dict()}, tmp_path / "eden.pt")
    with pytest.raises(CheckpointError, match="no 'eden' state dict .*training artefact"):
        build_eden_patchify(cfg)


def test_interleaved_requests_give_each_its_own_result(interpolator):
    """Request B runs entirely between request A's two Euler steps; neither sees the other's state."""
    model, cfg = interpolator.model, interpolator.cfg
    a0, a1 = frames(1, 60, 90, seed=2)
    b0, b1 = frames(2, 33, 130, seed=3)
    with torch.inference_mode():
        alone_a = run_pair(model, cfg, a0, a1, [0])
        alone_b = run_pair(model, cfg, b0, b1, [1, 2])
        tokens_a = model.patchify(encode_pairs(a0, a1, cfg))
        interleaved_b = []

        def between_steps(x, t, v):
            if not interleaved_b:
                interleaved_b.append(run_pair(model, cfg, b0, b1, [1, 2]))

        samples_a = model.sample(tokens_a, pair_noise(model.noise_shape(tokens_a), [0]), on_step=between_steps)
        interleaved_a = tokens_a.geometry.unpad(model.decode(model.unscale(samples_a), tokens_a).clamp(0, 1))
    assert torch.equal(interleaved_a, alone_a)
    assert torch.equal(interleaved_b[0], alone_b)


def test_batch_of_k_equals_k_singles(interpolator):
    frame0, frame1 = frames(4, 48, 80, seed=4)
    seeds = [10, 11, 12, 13]
    batched = interpolator.interpolate(frame0, frame1, seeds)
    singles = torch.cat([interpolator.interpolate(frame0[i:i + 1], frame1[i:i + 1], seeds[i:i + 1])
                         for i in range(4)])
    assert batched.shape == (4, 3, 48, 80)
    torch.testing.assert_close(batched, singles, atol=1e-5, rtol=0)


def test_clip_is_cut_into_forwards_of_at_most_k_pairs():
    small_k = EdenInterpolator(load_config("eden/interpolate_tiny", ["limits.max_pairs=2"]))
    clip = torch.cat(frames(3, 40, 40, seed=5))  # 6 frames, 5 pairs: forwards of 2, 2 and 1
    middles = small_k.middle_frames(clip, seed=7)
    one_by_one = torch.cat([small_k.interpolate(clip[t:t + 1], clip[t + 1:t + 2], [7 + t]) for t in range(5)])
    assert middles.shape == (5, 3, 40, 40)
    torch.testing.assert_close(middles, one_by_one, atol=1e-5, rtol=0)


def test_split_encoder_and_decoder_halves_agree(interpolator):
    """An encoder process with only the cond layers, uint8 frames as the payload, gives the tokens of the
    in-process path from float frames."""
    cfg = interpolator.cfg
    cond_layers = build_eden_patchify(load_config("eden/interpolate_tiny"))
    frame0, frame1 = frames(2, 50, 70, seed=6)
    with torch.inference_mode():
        pairs = encode_pairs(frame0, frame1, cfg)
        assert pairs.frames.dtype == torch.uint8 and pairs.frames.shape == (2, 2, 3, 64, 96)
        remote = cond_layers.patchify(pairs)
        local = interpolator.model.patchify(encode_pairs(frame0 / 255, frame1 / 255, cfg))
    for field in ("cond_dit", "cond_dec", "difference", "stats_mean", "stats_std"):
        torch.testing.assert_close(getattr(remote, field), getattr(local, field), atol=1e-6, rtol=0)


def test_padding_is_replicate_half_before():
    geometry = PairGeometry(60, 90)
    assert geometry.padding == (2, 2, 3, 3) and geometry.padded_size == (64, 96) and geometry.token_grid == (4, 6)
    assert PairGeometry(33, 64).padding == (15, 16, 0, 0)
    image = torch.arange(6, dtype=torch.uint8).view(1, 2, 3)
    padded = PairGeometry(2, 3, patch_size=2).pad(image)  # to 4 x 4: rows 1 + 1, columns 0 + 1
    assert padded.tolist() == [[[0, 1, 2, 2], [0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5]]]
    assert torch.equal(PairGeometry(2, 3, patch_size=2).unpad(padded), image)


@pytest.mark.parametrize("shape0, shape1, message", [
    ((1, 3, 40, 40), (1, 3, 40, 48), "two \\[K, C, H, W\\] tensors of one shape"),
    ((9, 3, 40, 40), (9, 3, 40, 40), "9 frame pairs in one forward; send 1 to 8"),
    ((1, 3, 31, 64), (1, 3, 31, 64), "31x64 are too small: both sides must be at least 32"),
    ((1, 3, 600, 600), (1, 3, 600, 600), "exceed this server's limit of 262144 pixels"),
    ((1, 4, 40, 40), (1, 4, 40, 40), "4 channels"),
])
def test_bad_pairs_are_refused_before_any_work(interpolator, shape0, shape1, message):
    with pytest.raises(ValueError, match=message):
        interpolator.interpolate(torch.zeros(shape0, dtype=torch.uint8), torch.zeros(shape1, dtype=torch.uint8),
                                 [0] * shape0[0])


def test_golden_check_of_an_unsupported_kind_fails(tmp_path, capsys):
    path = tmp_path / "future.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"kind": "future_model"})
    _, passed, supported = run_file(path)
    assert (passed, supported) == (False, False)
    assert "not supported" in capsys.readouterr().out
