"""GPU-only checks (skipped on machines without CUDA)."""
import pytest
import torch
from PIL import Image

from worldstream.engine.config import load_config
from worldstream.engine.cuda_graphs import GraphedSessionDiT
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels

pytestmark = pytest.mark.gpu
BLOCKS = 6


@pytest.fixture(scope="module")
def models():
    cfg = load_config("mg2/universal_tiny", ["device=cuda", "dtype=bfloat16", "vae_decoder_dtype=float16"])
    encoder, decoder = EncoderModels.build(cfg), DecoderModels.build(cfg)
    decoder.warm_up(sessions=2)  # two cache sets, each with a CUDA graph per ring phase
    conditioning = encoder.open_session(Image.new("RGB", (176, 96), (120, 90, 60)))
    conds = [conditioning.next_block().cpu() for _ in range(BLOCKS)]  # as received from the encoder service
    return decoder, conditioning.visual_context, conds


def _run(sessions, conds, action) -> list[list[torch.Tensor]]:
    """Blocks of several sessions, interleaved block by block as the decoder service's threads would."""
    latents = [[] for _ in sessions]
    for cond in conds:
        for out, session in zip(latents, sessions):
            out.append(session.launch_block(cond, action).latents)
    for session in sessions:
        session.close()
    return latents


def test_block_loop_runs_without_host_sync(models):
    """After warm-up, whole blocks (graphed DiT steps, cache update, VAE decode) are queued under sync debug mode
    'error'."""
    decoder, visual_context, conds = models
    session = decoder.open_session(visual_context, seed=0, max_blocks=BLOCKS)
    assert isinstance(session.denoiser.dit, GraphedSessionDiT) and len(session.denoiser.dit.graphs) == 3
    action = decoder.action_space.from_names(["forward"], [0.0, 0.1])
    for b in range(2):
        session.run_block(conds[b], action)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = [session.launch_block(conds[b], action) for b in range(2, BLOCKS)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for block in pending:
        output = block.result()
        assert output.frames.shape[0] == 12 and set(output.timings) >= {"denoise", "cache_update", "vae_decode"}
    session.close()


def test_queued_blocks_equal_blocks_run_one_by_one(models):
    """Blocks queued ahead of waiting for their frames give the frames of blocks run one at a time."""
    decoder, visual_context, conds = models
    action = decoder.action_space.from_names(["forward"], [0.1, 0.0])
    one_by_one = decoder.open_session(visual_context, seed=5, max_blocks=BLOCKS)
    want = [one_by_one.run_block(cond, action).frames for cond in conds]
    one_by_one.close()
    queued = decoder.open_session(visual_context, seed=5, max_blocks=BLOCKS)
    pending = [queued.launch_block(cond, action) for cond in conds]
    got = [block.result().frames for block in pending]
    queued.close()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_graph_replay_matches_the_plain_call(models):
    decoder, visual_context, conds = models
    action = decoder.action_space.from_names(["left"], [0.1, -0.1])
    graphed = [decoder.open_session(visual_context, seed=s, max_blocks=BLOCKS) for s in (3, 4)]
    plain = decoder.open_session(visual_context, seed=3, max_blocks=BLOCKS)  # the pool's two sets are lent
    assert all(isinstance(s.denoiser.dit, GraphedSessionDiT) for s in graphed)
    assert not isinstance(plain.denoiser.dit, GraphedSessionDiT)
    (a, b, reference) = _run([*graphed, plain], conds, action)
    for got, want in zip(a, reference):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # bf16; the same kernels, replayed
    # Each cache set keeps its own state: session 4 run again alone gives its interleaved result exactly.
    (alone,) = _run([decoder.open_session(visual_context, seed=4, max_blocks=BLOCKS)], conds, action)
    assert all(torch.equal(x, y) for x, y in zip(alone, b))
