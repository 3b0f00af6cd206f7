"""CLIP ViT-H/14 visual tower: golden parity, checkpoint key layout, batching of encode_video."""
from __future__ import annotations

import pytest
import torch

from conftest import load_golden
from worldstream.golden.clip import CHECKS
from worldstream.models.clip import CLIPVisionTower, clip_visual_state_dict

# Parameters of the `visual.*` tower of models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth:
# patch 752,640 + cls 1,280 + pos 328,960 + pre_norm 2,560 + 32 x 19,677,440 per block + post_norm 2,560
# + head 1,310,720.
VIT_H14_VISUAL_PARAMS = 632_076_800
VIT_H14_VISUAL_KEYS = 392


def _tiny_tower(**overrides) -> CLIPVisionTower:
    torch.manual_seed(0)
    args = dict(image_size=28, patch_size=14, dim=32, mlp_ratio=4, num_heads=4, num_layers=3, embed_dim=16)
    return CLIPVisionTower(**(args | overrides)).eval()


def _expected_vit_h14_shapes() -> dict[str, tuple[int, ...]]:
    dim, hidden, tokens = 1280, 5120, 257
    shapes = {"patch_embedding.weight": (dim, 3, 14, 14), "cls_embedding": (1, 1, dim),
              "pos_embedding": (1, tokens, dim), "pre_norm.weight": (dim,), "pre_norm.bias": (dim,),
              "post_norm.weight": (dim,), "post_norm.bias": (dim,), "head": (dim, 1024)}
    for i in range(32):
        block = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.to_qkv.weight": (3 * dim, dim),
                 "attn.to_qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                 "norm2.weight": (dim,), "norm2.bias": (dim,), "mlp.0.weight": (hidden, dim),
                 "mlp.0.bias": (hidden,), "mlp.2.weight": (dim, hidden), "mlp.2.bias": (dim,)}
        shapes.update({f"transformer.{i}.{name}": shape for name, shape in block.items()})
    return shapes


def test_golden_parity():
    tensors, meta = load_golden("clip_visual")
    results = CHECKS[meta["kind"]](tensors, meta)
    assert [name for name, _, _ in results] == ["intermediate.pixels", "output.visual_context"]
    for name, actual, expected in results:
        assert actual.shape == expected.shape, name
        assert (actual - expected).abs().max().item() <= 1e-5, name


def test_full_size_matches_checkpoint_layout():
    with torch.device("meta"):
        tower = CLIPVisionTower()
    shapes = {key: tuple(value.shape) for key, value in tower.state_dict().items()}
    assert shapes == _expected_vit_h14_shapes()
    assert len(shapes) == VIT_H14_VISUAL_KEYS
    assert sum(p.numel() for p in tower.parameters()) == VIT_H14_VISUAL_PARAMS


def test_full_size_strict_load_from_full_clip_dict():
    with torch.device("meta"):
        tower = CLIPVisionTower()
        full = {f"visual.{key}": torch.empty(shape) for key, shape in _expected_vit_h14_shapes().items()}
        full |= {"textual.token_embedding.weight": torch.empty(250002, 1024), "log_scale": torch.empty(())}
    tower.load_state_dict(clip_visual_state_dict(full), strict=True, assign=True)


def test_state_dict_extraction():
    full = {"visual.head": torch.zeros(2, 2), "textual.token_embedding.weight": torch.zeros(3),
            "log_scale": torch.zeros(())}
    assert list(clip_visual_state_dict(full)) == ["head"]
    with pytest.raises(KeyError):
        clip_visual_state_dict({"textual.x": torch.zeros(1)})


def test_encode_video_flattens_batch_major_and_shape():
    tower = _tiny_tower()
    video = torch.rand(2, 3, 3, 20, 36, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        out = tower.encode_video(video)
        single = tower.encode_video(video[1:2, :, 2:3])
    assert out.shape == (6, 5, 32)
    torch.testing.assert_close(out[1 * 3 + 2], single[0], rtol=1e-5, atol=1e-5)


def test_last_block_post_norm_and_head_are_unused():
    tower = _tiny_tower()
    video = torch.rand(1, 3, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        before = tower.encode_video(video)
        for p in [*tower.transformer[-1].parameters(), *tower.post_norm.parameters(), tower.head]:
            p.add_(1.0)
        after = tower.encode_video(video)
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_bf16_close_to_fp32():
    tower = _tiny_tower()
    video = torch.rand(1, 3, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        reference = tower.encode_video(video)
        low = tower.to(torch.bfloat16).encode_video(video.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)
