"""The causal DiT: published layout (keys, shapes, parameter counts), strict checkpoint loading, no host syncs."""
import ast
import inspect
import re
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from worldstream.engine import block_loop, cuda_graphs, generator, scheduler
from worldstream.engine.builders import build_dit, dit_config
from worldstream.engine.config import load_config
from worldstream.models import action_module, causal_wan, kv_cache, rope, wan_vae
from worldstream.models.causal_wan import CausalWanModel
from worldstream.models.checkpoints import CheckpointError

FULL_SIZE = {  # spec §0: parameters and state-dict tensors of the published distilled checkpoints
    "universal": (1_619_242_304, 1114),
    "gta_drive": (1_619_238_464, 1114),
    "templerun": (1_508_715_584, 964),
}


@pytest.mark.parametrize("mode", sorted(FULL_SIZE))
def test_full_size_dit_matches_published_checkpoint(mode):
    with torch.device("meta"):
        model = CausalWanModel(dit_config(load_config(f"mg2/{mode}")))
    params, tensors = FULL_SIZE[mode]
    assert sum(p.numel() for p in model.parameters()) == params
    sd = model.state_dict()
    assert len(sd) == tensors
    assert sd["patch_embedding.weight"].shape == (1536, 36, 1, 2, 2)
    assert sd["time_projection.1.weight"].shape == (9216, 1536)
    assert sd["head.modulation"].shape == (1, 2, 1536)
    assert sd["blocks.14.action_model.keyboard_attn_kv.weight"].shape == (2048, 1536)
    assert "blocks.15.action_model.keyboard_embed.0.weight" not in sd
    assert ("blocks.0.action_model.mouse_mlp.0.weight" in sd) == (mode != "templerun")


def _tiny_checkpoint(tmp_path, mode, mutate=None):
    cfg = load_config(f"mg2/{mode}_tiny")
    sd = {f"model.{k}": v.contiguous() for k, v in build_dit(cfg).state_dict().items()}
    if mutate:
        mutate(sd)
    path = tmp_path / f"{mode}.safetensors"
    save_file(sd, str(path))
    return cfg, path, sd


@pytest.mark.parametrize("mode", sorted(FULL_SIZE))
def test_published_key_layout_loads_strictly(tmp_path, mode):
    cfg, path, sd = _tiny_checkpoint(tmp_path, mode)
    loaded = build_dit(load_config(f"mg2/{mode}_tiny", [f"checkpoints.dit={path}", "init_seed=null"]))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, sd[f"model.{key}"]), key


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("model.blocks.1.ffn.2.bias"), "missing key 'blocks.1.ffn.2.bias'"),
    (lambda sd: sd.__setitem__("model.head.head.bias", torch.zeros(3)), "key 'head.head.bias' has shape [3]"),
    (lambda sd: sd.__setitem__("model.extra.weight", torch.zeros(1)), "unexpected key 'extra.weight'"),
])
def test_wrong_checkpoint_fails_with_file_and_key(tmp_path, mutate, message):
    cfg, path, _ = _tiny_checkpoint(tmp_path, "universal", mutate)
    with pytest.raises(CheckpointError) as err:
        build_dit(load_config("mg2/universal_tiny", [f"checkpoints.dit={path}", "init_seed=null"]))
    assert str(path) in str(err.value) and message in str(err.value)


def test_checkpoint_of_another_mode_is_rejected(tmp_path):
    _, path, _ = _tiny_checkpoint(tmp_path, "templerun")
    with pytest.raises(CheckpointError, match=r"missing key 'blocks.0.action_model"):
        build_dit(load_config("mg2/universal_tiny", [f"checkpoints.dit={path}", "init_seed=null"]))


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nowhere.safetensors"):
        build_dit(load_config("mg2/universal_tiny", [f"checkpoints.dit={tmp_path}/nowhere.safetensors",
                                                     "init_seed=null"]))


# The block loop's hot path: everything called per block / per denoising step.
HOT_PATH = [
    block_loop.BlockDenoiser.denoise, block_loop.GaussianNoise.__call__, generator.GenerationSession.launch_block,
    generator.GenerationSession._frames,
    block_loop.SessionDiT.__call__, cuda_graphs.GraphedSessionDiT.__call__, cuda_graphs.GraphedSessionDiT._load,
    scheduler.flow_to_x0, scheduler.renoise, kv_cache.RingKVCache.update, kv_cache.RollingWindow.slots,
    kv_cache.GlobalWindow.slots, kv_cache.RingSlots.of, rope.apply_rope,
    action_module.rms_normalize, action_module.ActionModule.forward, action_module.ActionModule._windows,
    causal_wan.CausalWanModel.forward, causal_wan.CausalWanModel.forward_at, causal_wan.CausalWanModel.ring_slots,
    causal_wan.CausalWanModel._rope, causal_wan.CausalWanBlock.forward,
    causal_wan.SelfAttention.forward, causal_wan.CrossAttention.forward, causal_wan.Head.forward,
    causal_wan.RMSNorm.forward, causal_wan.LayerNorm.forward, causal_wan.attention, causal_wan.sinusoidal_embedding,
    wan_vae.VAEDecodeStream.decode, wan_vae.WanVAEDecoder.forward, wan_vae.Decoder3d.forward,
    wan_vae.Resample.forward, wan_vae.CausalConv3d.forward, wan_vae.ResidualBlock.forward,
    wan_vae.AttentionBlock.forward, wan_vae.RMS_norm.forward,
]
# Reading a device value on the host (or converting one to a Python scalar) waits for the device.
SYNCING = re.compile(r"\.(item|tolist|cpu|numpy|nonzero)\(|(?<![\w.])(bool|float|int)\(|torch\.cuda\.synchronize|"
                     r"\.(any|all)\(\)")


@pytest.mark.parametrize("fn", HOT_PATH, ids=lambda f: f.__qualname__)
def test_hot_path_has_no_host_sync(fn):
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    body = "\n".join(ast.unparse(statement) for statement in node.body)  # code only: no signature, no comments
    offending = [line.strip() for line in body.splitlines() if SYNCING.search(line)]
    assert not offending, f"{fn.__qualname__} may synchronise with the host: {offending}"
