"""Self-Forcing T2V as a configuration of the causal Wan DiT: golden parity, full-size layout, strict loading of the
published layout (Wan2.1-T2V-1.3B base folder + self_forcing_dmd.pt), the global KV cache's session limit, and the
batch CLI writing an mp4 from a prompt."""
from __future__ import annotations

import json

import av
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_golden_outputs, load_golden
from worldstream.cli import main
from worldstream.engine.builders import build_dit, dit_config
from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels, session_block_limit
from worldstream.golden.selfforcing import CHECKS
from worldstream.models.causal_wan import CausalWanModel
from worldstream.models.checkpoints import CheckpointError
from worldstream.models.kv_cache import GlobalWindow, RingSlots, RollingWindow, session_phases

# Wan2.1-T2V-1.3B (dim 1536, ffn 8960, 30 layers, text_dim 4096): patch_embedding 1536*16*4 + 1536 = 99,840;
# text_embedding 4096*1536 + 1536 + 1536^2 + 1536 = 8,653,824; time_embedding 256*1536 + 1536 + 1536^2 + 1536
# = 2,755,584; time_projection 1536*9216 + 9216 = 14,164,992; per block: modulation 9,216, self_attn and
# cross_attn 4*(1536^2 + 1536) + 2*1536 = 9,446,400 each, norm3 3,072, ffn 2*1536*8960 + 8960 + 1536 = 27,535,616,
# i.e. 46,440,704 x 30 = 1,393,221,120; head 3,072 + 1536*64 + 64 = 101,440. The spec's figure (§1.2).
T2V_PARAMS = 1_418_996_800
T2V_TENSORS = 12 + 30 * 27 + 3


def test_golden_parity():
    tensors, meta = load_golden("selfforcing_t2v_blocks")
    results = CHECKS[meta["kind"]](tensors, meta)
    names = [name for name, _, _ in results]
    assert "block2.step3.x0_pred" in names and "block2.context.flow_pred" in names and names[-1] == "output.latents"
    assert_golden_outputs("selfforcing_t2v_blocks", results)


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = CausalWanModel(dit_config(load_config("selfforcing/t2v")))
    assert sum(p.numel() for p in model.parameters()) == T2V_PARAMS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == T2V_TENSORS
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["text_embedding.0.weight"] == (1536, 4096) and shapes["text_embedding.2.weight"] == (1536, 1536)
    assert shapes["blocks.29.norm3.weight"] == (1536,) and shapes["head.head.weight"] == (64, 1536)
    assert not any(k.startswith("img_emb") or "action_model" in k for k in shapes)


def test_cache_policies():
    assert [s.first for s in session_phases(GlobalWindow(21), 3)] == [0, 3, 6, 9, 12, 15, 18]
    assert GlobalWindow(21).slots(18, 3) == RingSlots(18, 3, 21)
    with pytest.raises(ValueError, match="do not fit the global KV cache of 21 latent frames"):
        GlobalWindow(21).slots(21, 3)
    assert session_phases(RollingWindow(6), 3) == [RingSlots(0, 3, 3), RingSlots(3, 3, 6), RingSlots(0, 3, 6)]
    cfg = load_config("selfforcing/t2v_tiny")
    assert session_block_limit(cfg)[0] == 7
    assert session_block_limit(load_config("selfforcing/t2v_tiny", ["dit.local_attn_size=12"]))[0] == 341


def test_short_text_context_is_zero_padded():
    """As the reference: fewer than text_len rows are padded with zeros before `text_embedding`."""
    model = build_dit(load_config("selfforcing/t2v_tiny"))
    context = torch.randn(1, 11, model.cfg.text_dim, generator=torch.Generator().manual_seed(0))
    padded = torch.cat([context, context.new_zeros(1, model.cfg.text_len - 11, model.cfg.text_dim)], dim=1)
    short = model.new_caches(1, 4, 11, "cpu", torch.float32)
    full = model.new_caches(1, 4, model.cfg.text_len, "cpu", torch.float32)
    with torch.no_grad():
        model.set_context(short, context)
        model.set_context(full, padded)
    assert short.layers[0].cross_k.shape[1] == model.cfg.text_len
    assert torch.equal(short.layers[1].cross_v, full.layers[1].cross_v)
    with pytest.raises(ValueError, match="text_len=512"):
        model.new_caches(1, 4, 513, "cpu", torch.float32)


# ---- the published layout ---------------------------------------------------------------------------------------

def _published_layout(root, mutate_base=None, entries=("generator", "generator_ema", "critic")):
    """A tiny Self-Forcing folder as its README lays it out: wan_models/Wan2.1-T2V-1.3B/{config.json,
    diffusion_pytorch_model.safetensors} and checkpoints/self_forcing_dmd.pt (a dict of state dicts)."""
    sd = {k: v.contiguous() for k, v in build_dit(load_config("selfforcing/t2v_tiny")).state_dict().items()}
    base = root / "wan_models" / "Wan2.1-T2V-1.3B"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 64, "eps": 1e-06, "ffn_dim": 128,
        "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 16,
        "text_len": 512}))
    base_sd = dict(sd)
    if mutate_base:
        mutate_base(base_sd)
    save_file(base_sd, str(base / "diffusion_pytorch_model.safetensors"))
    scale = {"generator": 0.5, "generator_ema": 2.0, "critic": 3.0}
    (root / "checkpoints").mkdir()
    torch.save({entry: {f"model.{k}": v * scale[entry] for k, v in sd.items()} for entry in entries},
               root / "checkpoints" / "self_forcing_dmd.pt")
    return sd


def _load(root, *overrides):
    return build_dit(load_config("selfforcing/t2v_tiny", [f"checkpoints.root={root}", "init_seed=null", *overrides]))


@pytest.mark.parametrize("entry, scale", [("generator_ema", 2.0), ("generator", 0.5)])
def test_published_layout_loads_strictly(tmp_path, entry, scale):
    sd = _published_layout(tmp_path)
    model = _load(tmp_path, f"checkpoints.generator_key={entry}")
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key] * scale), key


@pytest.mark.parametrize("overrides, mutate, entries, message", [
    (["checkpoints.generator_key=critic"], None, None, "generator_key is 'critic'"),
    ([], None, ("generator", "critic"), r"self_forcing_dmd.pt: no entry 'generator_ema'; the file holds "
                                        r"\['critic', 'generator'\]"),
    ([], lambda sd: sd.pop("blocks.1.cross_attn.k.bias"),
     None, r"diffusion_pytorch_model.safetensors: missing key 'blocks.1.cross_attn.k.bias'"),
    ([], lambda sd: sd.__setitem__("img_emb.proj.1.weight", torch.zeros(2, 2)),
     None, r"diffusion_pytorch_model.safetensors: unexpected key 'img_emb.proj.1.weight'"),
    (["dit.ffn_dim=96"], None, None, r"config.json: ffn_dim is 128, the config builds 96"),
])
def test_wrong_published_layout_fails_clearly(tmp_path, overrides, mutate, entries, message):
    _published_layout(tmp_path, mutate, entries or ("generator", "generator_ema", "critic"))
    with pytest.raises(CheckpointError, match=message):
        _load(tmp_path, *overrides)


def test_missing_base_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"wan_models/Wan2.1-T2V-1.3B/config.json not found"):
        _load(tmp_path)


# ---- sessions and the batch CLI ---------------------------------------------------------------------------------

def test_session_limits_and_inputs():
    models = DecoderModels(load_config("selfforcing/t2v_tiny"))
    assert models.action_space is None and models.condition_shapes() == {"prompt_embeds": (1, 512, 32)}
    assert (models.layout.first_block_frames, models.layout.block_frames) == (9, 12)
    context = torch.zeros(models.context_shape)
    with pytest.raises(ValueError, match=r"max_blocks must be in \[1, 7\].*global KV cache holds 21 latent frames"):
        models.open_session(context, seed=0, max_blocks=8)
    session = models.open_session(context[:, :20], seed=0, max_blocks=1)  # short contexts are zero-padded
    try:
        with pytest.raises(ValueError, match="takes no per-block cond_concat or action"):
            session.run_block(torch.zeros(1, 20, 3, 8, 14), None)
        assert session.run_block().frames.shape == (9, 64, 112, 3)
    finally:
        session.close()


def test_batch_writes_an_mp4_from_a_prompt(tmp_path):
    blocks = 2
    out = tmp_path / "t2v.mp4"
    assert main(["batch", "--config", "selfforcing/t2v_tiny", "--prompt", "a red fox runs through the snow",
                 "--blocks", str(blocks), "--out", str(out)]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.average_rate == 16
    assert len(frames) == 9 + 12 * (blocks - 1)
    assert frames[0].shape == (64, 112, 3)


@pytest.mark.parametrize("args, message", [
    (["--blocks", "8"], "--blocks 8: a session of selfforcing/t2v_tiny has 1 to 7 blocks (the global KV cache "
                        "holds 21 latent frames"),
    (["--blocks", "2", "--prompt", " \n "], "the prompt is empty"),
    (["--blocks", "2"], "is a text-to-video config: give --prompt"),
])
def test_batch_refuses_bad_requests_before_loading(tmp_path, args, message):
    prompt = [] if "--prompt" in args or args == ["--blocks", "2"] else ["--prompt", "a cat"]
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--config", "selfforcing/t2v_tiny", *prompt, *args, "--out", str(tmp_path / "x.mp4")])
    assert message in str(exit_.value)
