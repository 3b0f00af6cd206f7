"""LongLive sessions end to end: client -> decoder service -> encoder service, as real processes on loopback, on the
tiny interactive config: prompt switches (frames equal to the batch front-end's with the same switch script, the
PromptSwitched responses, the "recache" stage), video-conditional sessions (the clip's reconstruction and the blocks
equal to the batch front-end's, with and without a switch), their errors, the encoder's own bounds on a clip, and the
client CLI's --prompt/--switch-at and --video."""
from __future__ import annotations

import subprocess
import sys

import av
import grpc
import numpy as np
import pytest

from service_harness import (REPO, SMALL_FRAMES, call_status, metric_value, png_bytes, running_services,
                             wait_for)
from test_hardening_decoder import rss_mb
from worldstream.batch import PromptConditioning
from worldstream.client import SessionStream, run_session, start_request
from worldstream.client.video import VideoWriter
from worldstream.engine.clips import conditioning_pixel_frames, decode_clip
from worldstream.engine.config import load_config
from worldstream.encoder.client import VIDEO_CHUNK_BYTES
from worldstream.decoder.sessions import MAX_PENDING_SWITCHES
from worldstream.encoder.videos import MAX_CLIP_BYTES
from worldstream.engine.generator import BlockOutput, DecoderModels
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc, session_pb2

CONFIG = "longlive/interactive_tiny"
PROMPTS = ["a red fox runs through fresh snow", "the fox dives into a frozen river", "night falls over the forest"]
SWITCHES = [(2, PROMPTS[1]), (4, PROMPTS[2])]
BLOCKS = 5
SEED = 11
EMPTY = session_pb2.Action()
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("longlive"), config=CONFIG) as running:
        yield running


def batch_blocks(prompts: list[str], switch_blocks: list[int], blocks: int, seed: int,
                 clip=None) -> tuple[np.ndarray | None, list[BlockOutput]]:
    """What `worldstream batch --config longlive/interactive_tiny --prompt ... --switch-at ... [--video ...]`
    generates, in-process (its PromptConditioning and the loop of `batch.generate`): the clip's reconstruction
    (or None) and the blocks."""
    cfg = load_config(CONFIG)
    conditioning = PromptConditioning(cfg, prompts, switch_blocks, clip)
    session = DecoderModels.build(cfg).open_session(conditioning.open(), seed=seed, max_blocks=blocks)
    try:
        lead = conditioning.start(session)
        outputs = []
        for b in range(blocks):
            conditioning.block(b, session)
            outputs.append(session.run_block())
        return None if lead is None else lead.numpy(), outputs
    finally:
        session.close()


def clip_pixels(path):
    """A clip's pixels as the batch CLI decodes them for this config (`batch --video`)."""
    cfg = load_config(CONFIG)
    return decode_clip(path, int(cfg.video.fps), int(cfg.video.height), int(cfg.video.width),
                       conditioning_pixel_frames(int(cfg.conditioning.max_latents)))


def write_clip(path, frames: int, fps: int = 24, height: int = 80, width: int = 120, noise: int = 0):
    """A short moving-stripes clip (mp4), as tests/test_longlive.py makes them; `noise` makes the file larger."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    stripes = np.repeat(((2 * x + 9 * t + y) % 256)[..., None], 3, axis=-1)
    grain = np.random.default_rng(0).integers(-noise, noise + 1, stripes.shape) if noise else 0
    with VideoWriter(path, fps=fps) as writer:
        writer.write(np.clip(stripes + grain, 0, 255).astype(np.uint8))
    return path


def start(max_blocks: int = 2, **fields) -> session_pb2.SessionRequest:
    fields.setdefault("prompt", PROMPTS[0])
    return session_pb2.SessionRequest(start=session_pb2.StartSession(max_blocks=max_blocks, seed=SEED, **fields))


def action() -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(action=EMPTY)


def switch(prompt: str = PROMPTS[1]) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(switch_prompt=session_pb2.SwitchPrompt(prompt=prompt))


# ---- prompt switches ---------------------------------------------------------------------------------------------

def test_switching_session_equals_batch(services):
    switches_before = metric_value(services.decoder_metrics_port, "worldstream_decoder_prompt_switches_total") or 0
    result = run_session(services.address, None, [EMPTY] * BLOCKS, prompt=PROMPTS[0], switches=SWITCHES, seed=SEED,
                         frame_encoding="raw")
    info = result.info
    assert (info.family, info.prompt_switching, info.video_conditioning) == ("longlive", True, True)
    assert result.end.reason == session_pb2.END_REASON_MAX_BLOCKS and result.video_frames is None
    assert [(s.block_index, s.switch_count, s.prompt_tokens_dropped) for s in result.switches] == [(2, 1, 0), (4, 2, 0)]
    _, reference = batch_blocks(PROMPTS, [2, 4], BLOCKS, SEED)
    assert [b.index for b in result.blocks if b.switched is not None] == [b.index for b in reference if b.switched]
    for block, expected in zip(result.blocks, reference, strict=True):
        assert np.array_equal(block.frames, expected.frames.numpy()), f"block {block.index} differs from batch"
        assert ("recache" in block.stage_seconds) == (block.index in (2, 4)), block.stage_seconds
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_prompt_switches_total") == \
        switches_before + 2
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_block_stage_seconds_count",
                        {"stage": "recache"}) >= 2


def test_a_switch_before_block_0_replaces_the_prompt_and_the_last_one_wins(services):
    """Several switches before the same block: the last one takes effect, each one it replaced gave up its place
    among the waiting switches (more than MAX_PENDING_SWITCHES in all); before block 0 nothing is re-cached."""
    with SessionStream(services.address, start_request(None, prompt=PROMPTS[0], seed=SEED, max_blocks=1,
                                                       frame_encoding="raw")) as stream:
        for _ in range(MAX_PENDING_SWITCHES + 1):
            stream.switch_prompt(PROMPTS[1])
        stream.switch_prompt(PROMPTS[2])
        stream.send(EMPTY)
        stream.finish()
        blocks = list(stream)
    assert blocks[0].switched.block_index == 0 and blocks[0].switched.switch_count == 1
    assert "recache" not in blocks[0].stage_seconds
    _, reference = batch_blocks([PROMPTS[2]], [], 1, SEED)
    assert np.array_equal(blocks[0].frames, reference[0].frames.numpy())


def test_realtime_switch_takes_effect_at_a_later_block(services):
    result = run_session(services.address, None, [EMPTY] * 4, prompt=PROMPTS[0], switches=[(1, PROMPTS[1])],
                         seed=SEED, pacing="realtime")
    assert len(result.blocks) == 4
    for s in result.switches:  # once encoded, at the next block that starts (or none: the session was over)
        assert s.block_index >= 1 and "recache" in result.blocks[s.block_index].stage_seconds
    assert len(result.switches) <= 1


@pytest.mark.parametrize("requests, code, message", [
    ([start(), action(), action(), switch()], Code.INVALID_ARGUMENT,
     "switch_prompt after the session's end (the actions of all 2 blocks were sent)"),
    ([start(), action(), session_pb2.SessionRequest(stop=session_pb2.StopSession()), switch()],
     Code.INVALID_ARGUMENT, "switch_prompt after the session's end (after `stop`)"),
    ([start(), switch(" \n ")], Code.INVALID_ARGUMENT, "switch_prompt.prompt: "),
    ([start(), switch("fox " * 30_000)], Code.INVALID_ARGUMENT,
     "a `switch_prompt` of 120008 bytes; its prompt may have at most 65536"),
    ([start(max_blocks=8), action(), *[switch(), action()] * 5], Code.RESOURCE_EXHAUSTED,
     "4 prompt switches are already waiting for their blocks"),
])
def test_switch_errors_and_the_service_goes_on(services, requests, code, message):
    error = call_status(services.address, requests)
    assert error.code() == code and message in error.details(), error.details()
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPTS[0], seed=SEED).blocks) == 1


def test_switch_on_an_image_deployment(tmp_path):
    with running_services(tmp_path, decoder_args=SMALL_FRAMES, encoder_args=SMALL_FRAMES) as mg2:
        image_start = session_pb2.SessionRequest(start=session_pb2.StartSession(image=png_bytes(), max_blocks=2))
        error = call_status(mg2.address, [image_start, switch()])
        assert error.code() == Code.INVALID_ARGUMENT
        assert "starts from an image and takes actions: it has no prompt to switch" in error.details()
        with SessionStream(mg2.address, start_request(png_bytes(), max_blocks=1)) as stream:
            assert not stream.info.prompt_switching and not stream.info.video_conditioning
            stream.send(stream.space.idle_action())
            stream.finish()
            assert len(list(stream)) == 1


# ---- video-conditional sessions ----------------------------------------------------------------------------------

def test_video_session_equals_batch(services, tmp_path):
    # 26 frames at 16 fps: 6 latents (2 blocks), 21 frames; over 1 MiB, so the clip goes to the encoder in 2 chunks
    clip = write_clip(tmp_path / "clip.mp4", frames=40, height=200, width=320, noise=120)
    assert VIDEO_CHUNK_BYTES < clip.stat().st_size < 2 * VIDEO_CHUNK_BYTES
    result = run_session(services.address, None, [EMPTY] * 2, video=clip, video_prompt=PROMPTS[0], prompt=PROMPTS[1],
                         seed=SEED, frame_encoding="raw")
    lead, reference = batch_blocks(PROMPTS[:2], [], 2, SEED, clip=clip_pixels(clip))
    assert lead.shape == (21, 64, 112, 3) and np.array_equal(result.video_frames, lead)
    assert [b.frames.shape[0] for b in result.blocks] == [12, 12]  # the decoder is warm: whole blocks from block 0
    for block, expected in zip(result.blocks, reference, strict=True):
        assert np.array_equal(block.frames, expected.frames.numpy()), f"block {block.index} differs from batch"
    assert not result.switches and result.end.reason == session_pb2.END_REASON_MAX_BLOCKS


def test_video_session_with_a_switch_equals_batch(services, tmp_path):
    """The clip cached under video_prompt, blocks 0-1 under prompt, block 2 on under the switch's prompt (which
    re-caches the clip's frames and blocks 0-1 the window holds): as the batch front-end with the same clip and
    --switch-at."""
    clip = write_clip(tmp_path / "clip.mp4", frames=14)  # 3 latents (1 block), 9 frames
    result = run_session(services.address, None, [EMPTY] * 3, video=clip, video_prompt=PROMPTS[0], prompt=PROMPTS[1],
                         switches=[(2, PROMPTS[2])], seed=SEED, frame_encoding="raw")
    lead, reference = batch_blocks(PROMPTS, [2], 3, SEED, clip=clip_pixels(clip))
    assert lead.shape[0] == 9 and np.array_equal(result.video_frames, lead)
    assert [(s.block_index, s.switch_count) for s in result.switches] == [(2, 1)]
    for block, expected in zip(result.blocks, reference, strict=True):
        assert np.array_equal(block.frames, expected.frames.numpy()), f"block {block.index} differs from batch"
        assert ("recache" in block.stage_seconds) == (block.index == 2), block.stage_seconds


@pytest.mark.parametrize("video, fields, message", [
    (b"\0" * 64, {}, "clip rejected: clip bytes (64 B): not a decodable video"),
    ("SHORT", {}, "the clip has 8 frames at the model's frame rate; video conditioning needs at least 9"),
    ("CLIP", {"video_prompt": ""}, "start.video_prompt is empty"),
    ("CLIP", {"max_blocks": 341}, "max_blocks 341 exceeds this server's limit of 337 blocks with `video`"),
], ids=["undecodable", "too-short", "no-video-prompt", "too-many-blocks"])
def test_video_errors_and_the_service_goes_on(services, tmp_path, video, fields, message):
    clips = {"SHORT": write_clip(tmp_path / "short.mp4", frames=8, fps=16), "CLIP": write_clip(tmp_path / "c.mp4", 14)}
    fields = {"video_prompt": PROMPTS[0], **fields}
    error = call_status(services.address, [start(video=clips[video].read_bytes() if video in clips else video,
                                                 **fields)])
    assert error.code() == Code.INVALID_ARGUMENT and message in error.details(), error.details()
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPTS[0], seed=SEED).blocks) == 1


@pytest.mark.parametrize("request_, message", [
    ([start(video=b"\x1a\x45\xdf\xa3" + b"\0" * (30 << 20), video_prompt=PROMPTS[0])],
     "clip rejected: clip bytes (31457284 B): not a decodable video"),
    ([start(), switch("fox " * (7 << 20))], "a `switch_prompt` of 29360138 bytes; its prompt may have at most 65536"),
], ids=["30MB-clip", "28MB-switch"])
def test_huge_hostile_inputs_leave_memory_where_it_was(services, request_, message):
    """A 30 MiB undecodable clip (an MKV signature, then zeros: it reaches the encoder's decoder) and a 28 MiB
    switch (refused by its size before parsing) end with INVALID_ARGUMENT; both services' memory returns to where it
    was and the next session is served."""
    def rss() -> list[float]:
        return [rss_mb(service.process.pid) for service in (services.decoder, services.encoder)]
    run_session(services.address, None, [EMPTY], prompt=PROMPTS[0], seed=SEED)  # the baseline of a served session
    before = rss()
    error = call_status(services.address, request_)
    assert error.code() == Code.INVALID_ARGUMENT and message in error.details(), error.details()
    # (the decoder returns malloc's free heap a second after the last large request)
    try:
        wait_for(lambda: all(a - b < 32 for a, b in zip(rss(), before)), 10, "memory back")
    except TimeoutError:
        raise AssertionError(f"RSS (decoder, encoder) {rss()} MiB, 10 s after the request; before it {before} MiB")
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPTS[0], seed=SEED).blocks) == 1


@pytest.mark.parametrize("chunk, message", [
    ({"total_bytes": MAX_CLIP_BYTES + 1, "data": b"\0" * 16}, f"announces total_bytes={MAX_CLIP_BYTES + 1}; a clip "
                                                               f"has 1 to {MAX_CLIP_BYTES} bytes"),
    ({"total_bytes": 1 << 62, "data": b"\0" * 16}, f"announces total_bytes={1 << 62}"),  # never allocated
    ({"total_bytes": 0, "data": b"", "last": True}, "announces total_bytes=0"),
    ({"total_bytes": 3 << 20, "data": b"\0" * (VIDEO_CHUNK_BYTES + 1)}, "a clip chunk of 1048577 bytes after 0 of"),
], ids=["over-32-MiB", "2**62", "empty", "chunk-over-1-MiB"])
def test_encoder_refuses_a_clip_by_its_announced_size(services, chunk, message):
    """The encoder's own bounds on a clip's `video` chunks (a decoder never sends these), checked from the first
    chunk before the clip's buffer is allocated; the services go on."""
    request = encoder_pb2.EncodeRequest(video=encoder_pb2.VideoConditionChunk(session_id="bounds", mode="t2v",
                                                                              **chunk))
    with grpc.insecure_channel(services.encoder_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(encoder_pb2_grpc.ConditionEncoderServiceStub(channel).Encode(iter([request]), timeout=30))
    assert caught.value.code() == Code.INVALID_ARGUMENT and message in caught.value.details(), caught.value.details()
    assert len(run_session(services.address, None, [EMPTY], prompt=PROMPTS[0], seed=SEED).blocks) == 1


# ---- the client CLI ----------------------------------------------------------------------------------------------

def test_client_plays_a_switch_script(services, tmp_path):
    out = tmp_path / "switch.mp4"
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                          "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--switch-at", "1", "--blocks", "2",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.stat().st_size > 0 and "2 blocks, 21 frames" in run.stdout
    assert "prompt switches took effect at blocks 1" in run.stdout


def test_client_continues_a_video(services, tmp_path):
    out, clip = tmp_path / "continued.mp4", write_clip(tmp_path / "clip.mp4", frames=14)  # 3 latents, 9 frames
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", services.address,
                          "--video", str(clip), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--blocks", "1",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "reconstructs it (9 frames) comes first" in run.stdout and "1 blocks, 12 frames" in run.stdout
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(container.streams.video[0])) == 9 + 12


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a", "--prompt", "b"], "2 --prompt for 0 --switch-at: give 1"),
    (["--prompt", "a", "--prompt", "b", "--switch-at", "2"], "--switch-at 2: give increasing block indices in [1, 1]"),
    (["--prompt", "a", "--video", "clip.mp4"], "1 --prompt for 0 --switch-at and --video: give 2"),
    (["--image", "x.png", "--benchmark", "--switch-at", "1"], "--switch-at and --video are for text-to-video"),
])
def test_client_refuses_bad_switch_scripts(args, message):
    run = subprocess.run([sys.executable, "-m", "worldstream.client", "play", *args, "--blocks", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and message in run.stderr, run.stderr
