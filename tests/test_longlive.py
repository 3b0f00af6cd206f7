"""LongLive v1.0 as a configuration of the causal Wan DiT: golden parity (prompt switches, video-conditional), the LoRA
merged at load (equal to PEFT's unmerged run, strict loading of the published layout), the frame-sink window (the
sink never evicted, the protected re-cache), prompt switching and video conditioning in sessions, and the batch CLI."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import assert_golden_outputs, load_golden
from worldstream.cli import main
from worldstream.client.video import VideoWriter
from worldstream.engine.block_loop import BlockDenoiser
from worldstream.engine.builders import build_dit
from worldstream.engine.clips import center_crop, conditioning_latents, decode_clip
from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels
from worldstream.engine.scheduler import FlowMatchSchedule
from worldstream.golden.dit import dit_config_from_reference, golden_model
from worldstream.golden.longlive import CHECKS, longlive_model
from worldstream.models.checkpoints import CheckpointError
from worldstream.models.kv_cache import RingKVCache, RingSlots, RollingWindow, recache_phases, session_phases
from worldstream.models.lora import PEFT_PREFIX, lora_targets

CONFIG = "longlive/interactive_tiny"


# ---- golden vectors --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, must_have", [
    ("longlive_switch", ["switch0.kv_after.layer1.k", "switch1.recache.flow_pred[last 9 frames]",
                         "block7.context.flow_pred"]),
    ("video_conditional", ["enc.cond_latents", "cond4.x0_pred", "cond.kv_after.layer0.v", "output.video"]),
])
def test_golden_parity(kind, must_have):
    tensors, meta = load_golden(kind)
    results = CHECKS[kind](tensors, meta)
    names = [name for name, _, _ in results]
    assert set(must_have) <= set(names) and "output.latents" in names
    assert_golden_outputs(kind, results)


class SeededNoise:
    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator)


def test_lora_merged_at_load_equals_peft_unmerged():
    """y = W·x + b + (alpha/r)·B·(A·x) on every target (PEFT at inference, as LongLive v1.0 runs it) against the
    merged weights, over 8 blocks with a switch: within the golden README's 2.6e-6."""
    tensors, meta = load_golden("longlive_switch")
    merged = longlive_model(tensors, meta)
    unmerged = golden_model(tensors, dit_config_from_reference(meta["model_config"]))
    lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
    targets = lora_targets(unmerged)
    assert len(targets) == 20 and "blocks.1.ffn.2" in targets and "blocks.0.cross_attn.o" in targets
    for name, linear in targets.items():
        a, b = lora[f"{PEFT_PREFIX}{name}.lora_A.weight"], lora[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        linear.register_forward_hook(lambda module, args, out, a=a, b=b: out + F.linear(F.linear(args[0], a), b))
    schedule = FlowMatchSchedule(5.0)
    outputs = []
    for model in (merged, unmerged):
        denoiser = BlockDenoiser(model, tensors["input.prompt0.prompt_embeds"], (16, 6, 8),
                                 schedule.warp([1000, 750, 500, 250]), schedule, 0, SeededNoise(0))
        with torch.no_grad():
            latents = [denoiser.denoise(b) for b in range(6)]
            denoiser.switch_context(tensors["input.prompt1.prompt_embeds"], keep_sink=True)
            latents += [denoiser.denoise(b) for b in (6, 7)]
        outputs.append(torch.cat(latents, dim=2))
    assert float((outputs[0] - outputs[1]).abs().max()) <= 2.6e-6
    assert float((outputs[0] - outputs[1]).abs().max()) > 0  # the hooks did run


# ---- the published layout, loaded strictly ----------------------------------------------------------------------

def _published_layout(root, rank=4, mutate_lora=None, lora_entry=True):
    """A tiny LongLive folder as its README lays it out: wan_models/Wan2.1-T2V-1.3B/{config.json,
    diffusion_pytorch_model.safetensors} and longlive_models/models/{longlive_base.pt, lora.pt}."""
    model = build_dit(load_config(CONFIG))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    base = root / "wan_models" / "Wan2.1-T2V-1.3B"
    base.mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({
        "_class_name": "WanModel", "dim": 64, "eps": 1e-06, "ffn_dim": 128, "freq_dim": 256, "in_dim": 16,
        "model_type": "t2v", "num_heads": 2, "num_layers": 2, "out_dim": 16, "text_len": 512}))
    save_file(sd, str(base / "diffusion_pytorch_model.safetensors"))
    models = root / "longlive_models" / "models"
    models.mkdir(parents=True)
    torch.save({"generator": {f"model.{k}": v * 0.5 for k, v in sd.items()}}, models / "longlive_base.pt")
    generator = torch.Generator().manual_seed(1)
    lora = {}
    for name, linear in lora_targets(model).items():
        lora[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=generator)
        lora[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=generator)
    if mutate_lora:
        mutate_lora(lora)
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 600} if lora_entry else lora, models / "lora.pt")
    return sd, lora


def _load(root, *overrides):
    return build_dit(load_config(CONFIG, [f"checkpoints.root={root}", "init_seed=null", *overrides]))


@pytest.mark.parametrize("lora_entry", [True, False])
def test_published_layout_loads_with_the_lora_merged(tmp_path, lora_entry):
    sd, lora = _published_layout(tmp_path, lora_entry=lora_entry)
    model = _load(tmp_path, "lora.alpha=8")  # scale alpha / rank = 2
    for key, value in model.state_dict().items():
        expected = sd[key] * 0.5
        name = key.removesuffix(".weight")
        if f"{PEFT_PREFIX}{name}.lora_A.weight" in lora:
            expected = expected + 2 * lora[f"{PEFT_PREFIX}{name}.lora_B.weight"] @ lora[
                f"{PEFT_PREFIX}{name}.lora_A.weight"]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-5, msg=key)
    assert sum(1 for k in sd if k.endswith(".weight") and k.removesuffix(".weight") in lora_targets(model)) == 20


@pytest.mark.parametrize("rank, mutate, message", [
    (4, lambda lora: lora.pop(f"{PEFT_PREFIX}blocks.1.ffn.0.lora_B.weight"),
     r"lora.pt: missing key 'base_model.model.blocks.1.ffn.0.lora_B.weight' \(expected shape \[128, 4\]"),
    (8, None, r"key 'base_model.model.blocks.0.self_attn.q.lora_A.weight' has shape \[8, 64\], expected \[4, 64\] "
              r"\(a rank-8 adapter\? the config's lora.rank is 4\)"),
    (4, lambda lora: lora.__setitem__(f"{PEFT_PREFIX}head.head.lora_A.weight", torch.zeros(4, 64)),
     r"unexpected key 'base_model.model.head.head.lora_A.weight'"),
])
def test_wrong_lora_fails_clearly(tmp_path, rank, mutate, message):
    _published_layout(tmp_path, rank, mutate)
    with pytest.raises(CheckpointError, match=message):
        _load(tmp_path)


def test_missing_lora_file_is_named(tmp_path):
    _published_layout(tmp_path)
    (tmp_path / "longlive_models" / "models" / "lora.pt").unlink()
    with pytest.raises(CheckpointError, match=r"not found: .*longlive_models/models/lora.pt"):
        _load(tmp_path)


# ---- the frame-sink window --------------------------------------------------------------------------------------

def _frame_cache(policy: RollingWindow) -> RingKVCache:
    """A cache whose single token per frame holds the frame's index (so its slots say which frames it holds)."""
    return RingKVCache(1, policy.frames, 1, 1, 1, "cpu", torch.float32)


def _write(cache: RingKVCache, slots: RingSlots, frames: list[float]) -> torch.Tensor:
    values = torch.tensor(frames).view(1, -1, 1, 1)
    keys, _ = cache.update(values, values, slots)
    return keys.flatten()


def test_sink_is_never_evicted_and_attention_reads_sink_plus_recent():
    policy = RollingWindow(12, 3)
    assert len(session_phases(policy, 3)) == 6  # 4 while the window fills, then 2 more ring rotations
    cache = _frame_cache(policy)
    for block in range(40):
        start = 3 * block
        frames = list(range(start, start + 3))
        for _ in range(5):  # 4 denoising steps and the cache-update pass write the same slots
            keys = _write(cache, policy.slots(start, 3), frames)
        end = start + 3
        assert sorted(keys.tolist()) == [0, 1, 2] + list(range(max(3, end - 9), end))
        assert cache.k.flatten()[:3].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="do not fit the rolling part"):
        policy.slots(120, 12)


@pytest.mark.parametrize("keep_sink", [True, False])
def test_recache_is_protected_and_does_not_move_the_session(keep_sink):
    policy = RollingWindow(12, 3)
    cache = _frame_cache(policy)
    for block in range(8):  # 24 frames cached
        _write(cache, policy.slots(3 * block, 3), list(range(3 * block, 3 * block + 3)))
    start, slots = policy.recache(24, keep_sink)
    recached = [1000 + f for f in range(start, 24)]  # the same frames, under the new prompt
    keys = _write(cache, slots, recached)
    if keep_sink:  # only the 9 frames after the sink run; the sink keeps frames 0-2
        assert start == 15 and slots.frames == 9
        assert sorted(keys.tolist()) == [0, 1, 2] + [1000 + f for f in range(15, 24)]
    else:  # the 12 most recent frames, the oldest 3 into the sink
        assert start == 12 and slots.frames == 12 and slots.sink_frames == 3
        assert cache.k.flatten()[:3].tolist() == [1012, 1013, 1014]
        assert sorted(keys.tolist()) == [1000 + f for f in range(12, 24)]
    # the next block lands where it would have without the re-cache: over the oldest re-cached frames
    keys = _write(cache, policy.slots(24, 3), [24, 25, 26])
    assert {24, 25, 26} <= set(keys.tolist()) and len(keys) == 12
    assert not {1015, 1016, 1017} & set(keys.tolist()) and 1018 in keys.tolist()  # the oldest after the sink go
    # before the window rolls, a re-cache starts at frame 0 and rewrites the sink too, either way
    assert policy.recache(6, keep_sink) == (0, RingSlots(0, 6, 6, 3))
    assert len(recache_phases(policy, 3, keep_sink)) == 7 and max(recache_phases(policy, 3, True).values()) == 7


def test_sink_needs_a_window_and_whole_blocks():
    with pytest.raises(ValueError, match="a frame sink belongs to a rolling window"):
        build_dit(load_config(CONFIG, ["dit.local_attn_size=-1"]))
    with pytest.raises(ValueError, match=r"dit.sink_size \(2\) must be a multiple of pipeline.frames_per_block"):
        DecoderModels(load_config(CONFIG, ["dit.sink_size=2"]))


# ---- sessions --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    return DecoderModels(load_config(CONFIG))


def _contexts(models, n):
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(1, 12, models.context_shape[2], generator=generator) for _ in range(n)]


def test_switch_prompt_recaches_at_the_next_block(models):
    first, second = _contexts(models, 2)
    plain = models.open_session(first, seed=3, max_blocks=3)
    switching = models.open_session(first, seed=3, max_blocks=3)
    try:
        blocks = [plain.run_block() for _ in range(3)]
        same = [switching.run_block() for _ in range(2)]
        assert all(torch.equal(a.frames, b.frames) for a, b in zip(blocks, same))
        switching.switch_prompt(second)
        assert switching.denoiser.frames_cached == 6
        switched = switching.run_block()
        assert switched.switched and "recache" in switched.timings and not blocks[2].switched
        assert list(switched.timings) == ["recache", "denoise", "vae_decode", "to_host", "cache_update"]
        assert not torch.equal(switched.frames, blocks[2].frames) and switched.frames.shape == (12, 64, 112, 3)
        with pytest.raises(IndexError, match="already produced its 3 blocks: no block is left for the new prompt"):
            switching.switch_prompt(first)
    finally:
        plain.close()
        switching.close()


def test_switch_prompt_refuses_other_models_and_bad_contexts(models):
    session = models.open_session(_contexts(models, 1)[0], seed=0, max_blocks=1)
    with pytest.raises(ValueError, match=r"the session context has shape \[1, 12, 7\]"):
        session.switch_prompt(torch.zeros(1, 12, 7))
    session.close()
    t2v = DecoderModels(load_config("selfforcing/t2v_tiny"))
    session = t2v.open_session(torch.zeros(1, 4, 32), seed=0, max_blocks=1)
    with pytest.raises(ValueError, match="a self_forcing session cannot switch prompts"):
        session.switch_prompt(torch.zeros(1, 4, 32))
    session.close()


def test_condition_on_video_continues_it(models):
    prompt1, prompt2 = _contexts(models, 2)
    latents = torch.randn(1, 16, 6, 8, 14, generator=torch.Generator().manual_seed(2))
    session = models.open_session(prompt1, seed=0, max_blocks=2)
    try:
        with pytest.raises(ValueError, match=r"conditioning latents have shape \[1, 16, 6, 8, 13\]"):
            session.condition_on_video(latents[..., :13], prompt2)
        reconstruction = session.condition_on_video(latents, prompt2)
        assert reconstruction.shape == (21, 64, 112, 3) and reconstruction.dtype == torch.uint8
        block = session.run_block()  # the decoder is warm: 12 frames from the first block on
        assert block.frames.shape == (12, 64, 112, 3) and session.denoiser.frames_cached == 9
        with pytest.raises(RuntimeError, match="before its first block, once"):
            session.condition_on_video(latents, prompt2)
    finally:
        session.close()


# ---- clips -------------------------------------------------------------------------------------------------------

def _clip(path, frames=14, fps=24, height=80, width=120):
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    video = np.repeat(((2 * x + 9 * t + y) % 256).astype(np.uint8)[..., None], 3, axis=-1)
    with VideoWriter(path, fps=fps) as writer:
        writer.write(video)
    return path


def test_clip_is_resampled_cropped_and_counted(tmp_path):
    clip = _clip(tmp_path / "clip.mp4")  # 14 frames at 24 fps: 0.58 s
    assert decode_clip(clip, 16, 64, 112, 100).shape == (1, 3, 10, 64, 112)  # 10 frames at 16 fps
    assert decode_clip(clip, 24, 64, 112, 100).shape[2] == 14
    assert decode_clip(clip, 16, 64, 112, 5).shape[2] == 5
    assert center_crop(torch.zeros(2, 80, 120, 3, dtype=torch.uint8), 64, 112).shape == (2, 69, 120, 3)
    assert conditioning_latents(45, 3, 12) == 12 and conditioning_latents(44, 3, 12) == 9
    with pytest.raises(ValueError, match="the clip has 8 frames at the model's frame rate; video conditioning needs "
                                         r"at least 9 \(one block of 3 latent frames\)"):
        conditioning_latents(8, 3, 12)
    with pytest.raises(ValueError, match=r"clip bytes \(11 B\): not a decodable video"):
        decode_clip(b"not a video", 16, 64, 112, 45)


# ---- the batch CLI -----------------------------------------------------------------------------------------------

def _frames(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def test_batch_switches_prompts(tmp_path):
    out = tmp_path / "switch.mp4"
    assert main(["batch", "--config", CONFIG, "--prompt", "a fox in the snow", "--prompt", "the fox dives",
                 "--prompt", "night falls", "--switch-at", "1", "--switch-at", "2", "--blocks", "3",
                 "--out", str(out)]) == 0
    frames = _frames(out)
    assert len(frames) == 9 + 12 * 2 and frames[0].shape == (64, 112, 3)


def test_batch_continues_a_video(tmp_path):
    out = tmp_path / "continued.mp4"
    clip = _clip(tmp_path / "clip.mp4")  # 10 frames at 16 fps: 3 latents (9 frames)
    assert main(["batch", "--config", CONFIG, "--video", str(clip), "--prompt", "stripes", "--prompt",
                 "the stripes fade", "--blocks", "1", "--out", str(out)]) == 0
    assert len(_frames(out)) == 9 + 12  # the clip as reconstructed, then a whole first block


@pytest.mark.parametrize("config, args, message", [
    (CONFIG, ["--prompt", "a", "--prompt", "b", "--blocks", "3"], "2 --prompt for 0 --switch-at: give 1"),
    (CONFIG, ["--prompt", "a", "--prompt", "b", "--switch-at", "3", "--blocks", "3"],
     "--switch-at 3: give increasing block indices in [1, 2]"),
    (CONFIG, ["--prompt", "a", "--video", "VIDEO", "--blocks", "1"],
     "1 --prompt for 0 --switch-at and --video: give 2 (one for the clip, one for what follows"),
    (CONFIG, ["--prompt", "a", "--prompt", "b", "--video", "SHORT", "--blocks", "1"],
     "video conditioning needs at least 9"),
    (CONFIG, ["--prompt", "a", "--prompt", "b", "--video", "JUNK", "--blocks", "1"], "not a decodable video"),
    ("selfforcing/t2v_tiny", ["--prompt", "a", "--prompt", "b", "--switch-at", "1", "--blocks", "2"],
     "selfforcing/t2v_tiny cannot switch prompts (--switch-at); use a LongLive config"),
    ("mg2/universal_tiny", ["--switch-at", "1", "--blocks", "2"], "not prompts: drop --prompt, --switch-at"),
])
def test_batch_refuses_bad_requests_before_loading(tmp_path, config, args, message):
    clips = {"VIDEO": _clip(tmp_path / "clip.mp4"), "SHORT": _clip(tmp_path / "short.mp4", frames=8, fps=16),
             "JUNK": tmp_path / "junk.mp4"}
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 64)
    with pytest.raises(SystemExit) as exit_:
        main(["batch", "--config", config, *[str(clips.get(a, a)) for a in args], "--out", str(tmp_path / "x.mp4")])
    assert message in str(exit_.value)
