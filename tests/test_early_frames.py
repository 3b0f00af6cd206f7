"""Early frames: the decoder sends a block's frames latent by latent as they reach the host (`block_frames`, then the
`block` with the rest), the client assembles the same whole blocks as `whole_blocks` sessions and the in-process
engine give, and the gateway relays early frames to the page at once. Real processes on loopback, tiny config."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import base64

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service_harness import SMALL_FRAMES, GatewayProcess, engine_frames, metric_value, png_bytes, running_services
from worldstream.api.messages import action_message, action_space_message
from worldstream.api.spaces import get_action_space
from worldstream.client import SessionStream, run_session, start_request
from worldstream.client.session import MAX_RECEIVE_BYTES
from worldstream.media import encode_jpeg
from worldstream.v1 import session_pb2, session_pb2_grpc

SEED = 321
IMAGE = png_bytes(seed=11)
SPACE = get_action_space("universal")
ACTIONS = [SPACE.from_names(["forward"]), SPACE.from_names(["left"], [0.0, 0.1]), SPACE.from_names(["right"])]
# Matrix-Game-2: 3 latents per block; a stream's first latent decodes to 1 frame, every later one to 4
BLOCK_PARTS = [[1, 4, 4], [4, 4, 4], [4, 4, 4]]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("early"), decoder_args=SMALL_FRAMES,
                          encoder_args=SMALL_FRAMES) as running:
        yield running


def responses(address: str, start: session_pb2.StartSession) -> list[session_pb2.SessionResponse]:
    """Every response of a LOCKSTEP session given `ACTIONS` up front (then half-closed), as it came on the wire."""
    requests = [session_pb2.SessionRequest(start=start)]
    requests += [session_pb2.SessionRequest(action=action_message(action)) for action in ACTIONS]
    with grpc.insecure_channel(address, [("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]) as channel:
        return list(session_pb2_grpc.WorldSessionServiceStub(channel).Session(iter(requests), timeout=300))


def test_early_frames_come_before_their_block_in_order(services):
    start = start_request(IMAGE, seed=SEED, max_blocks=len(ACTIONS), frame_encoding="raw")
    got = responses(services.address, start)
    kinds = [r.WhichOneof("response") for r in got]
    assert kinds == ["info", *(["block_frames", "block_frames", "block"] * len(ACTIONS)), "end"], kinds
    for b, parts in enumerate(BLOCK_PARTS):
        early, early2, block = (r.block_frames if i < 2 else r.block for i, r in enumerate(got[1 + 3 * b:4 + 3 * b]))
        assert [early.block_index, early2.block_index, block.block_index] == [b, b, b]
        assert [early.first_frame, early2.first_frame, block.first_frame] == [0, parts[0], parts[0] + parts[1]]
        assert [len(early.frames), len(early2.frames), len(block.frames), block.frame_count] == [*parts, parts[2]]
        assert early.send_time.ToNanoseconds() <= early2.send_time.ToNanoseconds() <= block.send_time.ToNanoseconds()
        # the stages in the order they now run, each latent's decode and copy added up
        assert {"denoise", "vae_decode", "to_host", "cache_update", "frame_encode"} <= set(block.stage_seconds)

    whole = responses(services.address, start_request(IMAGE, seed=SEED, max_blocks=len(ACTIONS),
                                                       frame_encoding="raw", whole_blocks=True))
    assert [r.WhichOneof("response") for r in whole] == ["info", "block", "block", "block", "end"]
    assert [(r.block.first_frame, r.block.frame_count) for r in whole[1:4]] == [(0, 9), (0, 12), (0, 12)]
    early_bytes = [f for r in got[1:-1] for f in (r.block_frames.frames if r.HasField("block_frames")
                                                  else r.block.frames)]
    assert early_bytes == [f for r in whole[1:4] for f in r.block.frames]  # raw RGB: the same frames, bit for bit


def test_client_assembles_the_blocks_of_whole_block_sessions_and_the_engine(services):
    seen = []
    early = run_session(services.address, IMAGE, ACTIONS, seed=SEED, frame_encoding="raw",
                        on_frames=lambda b, first, frames: seen.append((b, first, frames.shape[0])))
    whole = run_session(services.address, IMAGE, ACTIONS, seed=SEED, frame_encoding="raw", whole_blocks=True)
    assert seen == [(b, sum(parts[:i]), n) for b, parts in enumerate(BLOCK_PARTS) for i, n in enumerate(parts)]
    assert [b.frames.shape[0] for b in early.blocks] == [9, 12, 12]
    for got, same, want in zip(early.blocks, whole.blocks, engine_frames(IMAGE, ACTIONS, SEED, SMALL_FRAMES)):
        assert np.array_equal(got.frames, same.frames) and np.array_equal(got.frames, want), f"block {got.index}"
        assert got.first_frames_at < got.received_at and same.first_frames_at == same.received_at
        assert got.stage_seconds.keys() == same.stage_seconds.keys()
    # the first frames are counted from the first that arrive: block 0's early ones
    assert early.time_to_first_frame == early.blocks[0].first_frames_at - early.started_at
    assert early.time_to_first_frame < early.blocks[0].received_at - early.started_at


def test_jpeg_realtime_early_frames_and_the_first_frame_metric(services):
    """REALTIME JPEG sessions get early frames too; the decoder's time-to-first-frame counts each session once."""
    before = metric_value(services.decoder_metrics_port, "worldstream_decoder_time_to_first_frame_seconds_count")
    start = start_request(IMAGE, seed=SEED, max_blocks=2, pacing="realtime")
    with SessionStream(services.address, start) as stream:
        stream.send(ACTIONS[0])
        blocks = list(stream)
    assert [b.frames.shape[0] for b in blocks] == [9, 12] and stream.end.blocks_generated == 2
    assert all(b.first_frames_at < b.received_at for b in blocks)
    after = metric_value(services.decoder_metrics_port, "worldstream_decoder_time_to_first_frame_seconds_count")
    assert after == before + 1


def test_gateway_relays_early_frames_to_the_page(services, tmp_path):
    pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")
    gateway = GatewayProcess(services.address, tmp_path / "gateway.log")
    try:
        messages, frames = asyncio.run(_play_one_block(gateway.url))
    finally:
        gateway.stop()
    blocks = [m for m in messages if m["type"] in ("frames", "block")]
    assert [(m["type"], m["index"], m["first_frame"], m["first_seq"], m["frames"]) for m in blocks[:6]] == [
        ("frames", 0, 0, 0, 1), ("frames", 0, 1, 1, 4), ("block", 0, 5, 5, 4),
        ("frames", 1, 0, 9, 4), ("frames", 1, 4, 13, 4), ("block", 1, 8, 17, 4)]
    assert all("echo" in m for m in blocks if m["type"] == "block")
    assert messages[-1]["type"] == "end" and sum(m["frames"] for m in blocks) == len(frames)
    assert frames == list(range(len(frames)))  # every frame played, in order


async def _play_one_block(url: str) -> tuple[list[dict], list[int]]:
    """A tab's session that stops once block 1 is announced; the JSON messages and the seqs of the JPEG frames."""
    import aiohttp

    from worldstream.gateway.transports import FRAME_HEADER

    messages, seqs = [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        image = {"data": base64.b64encode(IMAGE).decode(), "name": "test.png"}
        await ws.send_json({"type": "start", "image": image, "record": False})
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY:
                seqs.append(FRAME_HEADER.unpack_from(message.data)[0])
                continue
            messages.append(message.json())
            assert messages[-1]["type"] != "error", messages[-1]
            if messages[-1]["type"] == "block" and messages[-1]["index"] == 1:
                await ws.send_json({"type": "stop"})
            if messages[-1]["type"] == "end":  # (after the playout sent every frame)
                break
    return messages, seqs


class _EndlessFramesServer(session_pb2_grpc.WorldSessionServiceServicer):
    """A hostile server: after `info`, block 0's early frames never end (4 frames of 8x8 each)."""

    def __init__(self, encoding: int):
        self.encoding = encoding

    def Session(self, request_iterator, context):
        next(request_iterator)
        yield session_pb2.SessionResponse(info=session_pb2.SessionInfo(
            mode="universal", height=8, width=8, first_block_frames=9, block_frames=12, fps=16, max_blocks=1,
            action_space=action_space_message(SPACE), frame_encoding=self.encoding,
            pacing=session_pb2.PACING_REALTIME))
        frame = bytes(8 * 8 * 3) if self.encoding == session_pb2.FRAME_ENCODING_RAW_RGB else encode_jpeg(
            np.zeros((8, 8, 3), np.uint8))
        for part in range(1000):
            yield session_pb2.SessionResponse(block_frames=session_pb2.BlockFrames(
                block_index=0, first_frame=4 * part, frames=[frame] * 4))


@contextlib.contextmanager
def endless_frames_server(encoding: int):
    """The hostile server on a loopback port (with a health service, as the gateway asks for one)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    session_pb2_grpc.add_WorldSessionServiceServicer_to_server(_EndlessFramesServer(encoding), server)
    serving = health.HealthServicer()
    serving.set(session_pb2.DESCRIPTOR.services_by_name["WorldSessionService"].full_name,
                health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(serving, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_client_refuses_more_early_frames_than_a_block_has():
    """A server whose early frames for a block never end: the client stops at the first message past a block's
    frames (before decoding or keeping it), with a message that says so."""
    with endless_frames_server(session_pb2.FRAME_ENCODING_RAW_RGB) as address:
        with SessionStream(address, start_request(IMAGE, pacing="realtime"), timeout=30) as stream:
            with pytest.raises(RuntimeError, match="would make it 16 frames; a block of this session has at most 12"):
                list(stream)
            assert len(stream._early) == 3  # frames 0-11 kept, the 4th message refused


def test_gateway_refuses_more_early_frames_than_a_block_has(tmp_path):
    """The same server behind the gateway: the page gets a decoder_protocol error, and the gateway goes on."""
    pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")
    with endless_frames_server(session_pb2.FRAME_ENCODING_JPEG) as address:
        gateway = GatewayProcess(address, tmp_path / "gateway.log")
        try:
            error = asyncio.run(_first_error(gateway.url))
            assert gateway.healthy()
        finally:
            gateway.stop()
    assert error["code"] == "decoder_protocol" and "frames 12 to 15 of block 0, more than a block has" in \
        error["message"], error


async def _first_error(url: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        image = {"data": base64.b64encode(IMAGE).decode(), "name": "test.png"}
        await ws.send_json({"type": "start", "image": image, "record": True})
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT and message.json()["type"] == "error":
                return message.json()
    raise AssertionError("the gateway closed the page without an error")
