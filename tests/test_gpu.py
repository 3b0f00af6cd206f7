"""GPU-only checks (skipped on machines without CUDA)."""
import pytest
import torch
from PIL import Image

from worldstream.engine.config import load_config
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels

pytestmark = pytest.mark.gpu


def test_block_loop_runs_without_host_sync():
    """After warm-up, whole blocks (DiT steps, cache update, VAE decode) run under sync debug mode 'error'."""
    cfg = load_config("mg2/universal_tiny", ["device=cuda", "dtype=bfloat16", "vae_decoder_dtype=float16"])
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    conditioning = encoder.open_session(Image.new("RGB", (176, 96), (120, 90, 60)))
    session = decoder.open_session(conditioning.visual_context, seed=0, max_blocks=6)
    conds = [conditioning.next_block().cpu() for _ in range(6)]  # as received from the encoder service
    action = decoder.action_space.from_names(["forward"], [0.0, 0.1])
    for b in range(2):
        session.generate(conds[b], action)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for b in range(2, 6):
            latents, video = session.generate(conds[b], action)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert video.shape[2] == 12 and torch.isfinite(video).all()
    session.close()
