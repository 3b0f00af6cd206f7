"""Text-to-video sessions end to end: client -> decoder service -> encoder service (UMT5), as real processes on
loopback, on the tiny Self-Forcing config; and the errors of prompts and images on the wrong deployment."""
from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest

from service_harness import REPO, png_bytes, running_services
from test_hardening_decoder import rss_mb
from worldstream.client import run_session
from worldstream.decoder.requests import parse_start
from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels
from worldstream.engine.text import build_text_encoder
from worldstream.serving.errors import ServiceError
from worldstream.v1 import session_pb2

CONFIG = "selfforcing/t2v_tiny"
PROMPT = "a red fox runs through fresh snow"
SEED = 77
EMPTY = session_pb2.Action()


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("t2v"), config=CONFIG) as running:
        yield running


def batch_frames(prompt: str, blocks: int, seed: int) -> list[np.ndarray]:
    """What `worldstream batch --config selfforcing/t2v_tiny --prompt ...` generates, in-process: the prompt's
    text context, then one `run_block` per block with nothing else."""
    cfg = load_config(CONFIG)
    context = build_text_encoder(cfg)([prompt]).context
    session = DecoderModels.build(cfg).open_session(context, seed=seed, max_blocks=blocks)
    try:
        return [session.run_block().frames.numpy() for _ in range(blocks)]
    finally:
        session.close()


def failure(address: str, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        run_session(address, kwargs.pop("image", None), kwargs.pop("actions", [EMPTY]), **kwargs)
    return caught.value


def test_t2v_session_equals_batch(services):
    result = run_session(services.address, None, [EMPTY] * 3, prompt=PROMPT, seed=SEED, frame_encoding="raw")
    info = result.info
    assert (info.family, info.mode, info.first_block_frames, info.block_frames, info.max_blocks) == (
        "self_forcing", "t2v", 9, 12, 3)
    assert not info.HasField("action_space") and info.prompt_tokens_dropped == 0
    assert not info.prompt_switching and not info.video_conditioning
    assert result.end.reason == session_pb2.END_REASON_MAX_BLOCKS
    assert [b.frames.shape[0] for b in result.blocks] == [9, 12, 12]
    assert all(block.action is None for block in result.blocks)
    for b, (block, frames) in enumerate(zip(result.blocks, batch_frames(PROMPT, 3, SEED))):
        assert np.array_equal(block.frames, frames), f"block {b} differs from the batch front-end"


def test_over_long_prompt_is_truncated_and_says_so(services):
    result = run_session(services.address, None, [EMPTY], prompt=" ".join(["fox"] * 200), seed=SEED)
    assert result.info.prompt_tokens_dropped > 0
    assert len(result.blocks) == 1


@pytest.mark.parametrize("kwargs, expected", [
    ({"prompt": "  \n "}, "prompt is empty"),
    ({"prompt": PROMPT, "image": png_bytes()}, "with `prompt`, not `image`"),
    ({"prompt": "", "image": png_bytes()}, "with `prompt`, not `image`"),
    ({"prompt": PROMPT, "max_blocks": 8}, "limit of 7 blocks"),
    ({"prompt": PROMPT, "actions": [session_pb2.Action(keys=["forward"])]}, "send an empty `action`"),
    ({"prompt": PROMPT, "video": b"\0" * 64, "video_prompt": PROMPT}, "which does not continue videos: drop `video`"),
    ({"prompt": PROMPT, "video_prompt": PROMPT}, "start.video_prompt is set without `video`"),
])
def test_t2v_errors(services, kwargs, expected):
    error = failure(services.address, seed=SEED, **kwargs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


def test_switch_prompt_is_refused_and_the_service_goes_on(services):
    """Self-Forcing cannot switch prompts (LongLive can): a `switch_prompt` ends the session with INVALID_ARGUMENT
    saying so; the next session is served."""
    error = failure(services.address, prompt=PROMPT, seed=SEED, actions=[EMPTY] * 2,
                    switches=[(1, "the fox dives into a frozen river")])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "which cannot switch prompts (SessionInfo.prompt_switching is false)" in error.details()
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPT, seed=SEED).blocks) == 1


def test_a_huge_prompt_is_refused_before_tokenizing_and_the_service_goes_on(services):
    """A 10 MB prompt (under the start message's limit) is refused by its own size cap before any tokenizer or
    text cleaning sees it; memory returns to where it was and the next session is served."""
    rss = rss_mb(services.decoder.process.pid)
    error = failure(services.address, prompt="fox " * 2_500_000, seed=SEED)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start.prompt has 10000000 bytes; at most" in error.details()
    assert len(error.details().encode()) <= 1024
    assert rss_mb(services.decoder.process.pid) - rss < 32
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPT, seed=SEED).blocks) == 1


def test_prompt_on_an_image_deployment():
    models = DecoderModels.build(load_config("mg2/universal_tiny", ["video.height=32", "video.width=64"]))
    start = session_pb2.SessionRequest(start=session_pb2.StartSession(image=png_bytes(), prompt=PROMPT))
    with pytest.raises(ServiceError) as caught:
        parse_start(start.SerializeToString(), models)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "send `image`, not `prompt`" in caught.value.message


def test_client_plays_a_prompt(services, tmp_path):
    out = tmp_path / "t2v.mp4"
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                          "--prompt", PROMPT, "--blocks", "2", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0 and "2 blocks, 21 frames" in run.stdout
