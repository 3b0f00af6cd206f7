"""Loading a published-layout `Matrix-Game-2.0/` folder (tiny sizes): file names, key names, strictness."""
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from worldstream.engine.config import load_config
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels
from worldstream.models.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def published_folder(tmp_path_factory):
    """The tiny random models saved exactly as the published files are laid out."""
    root = tmp_path_factory.mktemp("Matrix-Game-2.0")
    cfg = load_config("mg2/universal_tiny")
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    (root / "base_distilled_model").mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in decoder.dit.state_dict().items()},
              str(root / "base_distilled_model" / "base_distill.safetensors"))
    torch.save({**encoder.vae.state_dict(), **decoder.vae.state_dict()}, root / "Wan2.1_VAE.pth")
    clip = {f"visual.{k}": v for k, v in encoder.clip.state_dict().items()}
    clip.update({"textual.token_embedding.weight": torch.zeros(4, 8), "log_scale": torch.zeros(())})
    torch.save(clip, root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    return root, encoder, decoder


def overrides(root, *extra):
    return [f"checkpoints.root={root}", "init_seed=null", *extra]


def test_vae_file_holds_194_tensors_at_full_layout(published_folder):
    root, _, _ = published_folder
    assert len(torch.load(root / "Wan2.1_VAE.pth", weights_only=True)) == 194


def test_published_folder_loads_and_generates_the_same_frames(published_folder):
    root, encoder, decoder = published_folder
    cfg = load_config("mg2/universal_tiny", overrides(root))
    loaded_encoder, loaded_decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    image = Image.new("RGB", (200, 120), (30, 160, 90))
    action = decoder.action_space.from_names(["forward"], [0.0, 0.1])
    frames = []
    for enc, dec in ((encoder, decoder), (loaded_encoder, loaded_decoder)):
        conditioning = enc.open_session(image)
        session = dec.open_session(conditioning.visual_context, seed=3, max_blocks=1)
        frames.append(session.run_block(conditioning.next_block(), action).frames)
    assert torch.equal(frames[0], frames[1])


def test_missing_file_is_named(tmp_path):
    cfg = load_config("mg2/universal_tiny", overrides(tmp_path))
    with pytest.raises(CheckpointError, match="not found: .*base_distilled_model/base_distill.safetensors"):
        DecoderModels.build(cfg)
    with pytest.raises(CheckpointError, match="not found: .*Wan2.1_VAE.pth"):
        EncoderModels.build(cfg)


def test_dit_of_another_mode_is_rejected(published_folder):
    root, _, _ = published_folder
    cfg = load_config("mg2/gta_drive_tiny", overrides(root, f"checkpoints.dit={root}/base_distilled_model/base_distill.safetensors"))
    with pytest.raises(CheckpointError, match=r"base_distill.safetensors: key 'blocks.0.action_model.keyboard_embed.0.weight' has shape \[32, 4\]"):
        DecoderModels.build(cfg)
