"""The decoder's public ingress against hostile and careless clients (issue 7, part A): memory of rejected starts,
an event loop that stays responsive, images checked from their header, bounded error messages, malformed
protobuf, per-kind message limits, the outcome of a session once `end` is sent, and trace file names."""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import io
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service_harness import SMALL_FRAMES, metric_value, png_bytes, running_services, wait_for
from worldstream.api.spaces import get_action_space
from worldstream.client import SessionStream, start_request
from worldstream.decoder.requests import ACTION_MAX_BYTES, START_MAX_BYTES
from worldstream.serving.aio import run_together
from worldstream.serving.errors import MAX_STATUS_BYTES, ServiceError
from worldstream.serving.profiling import StreamProfiler
from worldstream.v1 import session_pb2

IMAGE = png_bytes(seed=7)
SPACE = get_action_space("universal")
Code = grpc.StatusCode
SESSION_METHOD = "/worldstream.v1.WorldSessionService/Session"
BIG = 30_000_000  # bytes of a large upload, under the 32 MiB message limit
# What the decoder may keep after 50 rejected starts of BIG bytes: the free tops of the heaps of gRPC's receiving
# threads, which malloc_trim leaves (serving/memory.py: up to TRIM_THRESHOLD_BYTES, 16 MiB, each; seen: -18 to
# +38 MB over ten runs here, +37 in CI). Two kept requests would stay under it, three not; the defect it guards
# kept all 50.
DECODER_RSS_SLACK_MB = 80
MAX_SESSIONS = 4


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    # gRPC's own limit above the decoder's per-kind limits, so that those are what a test meets
    with running_services(tmp_path_factory.mktemp("hardening"), decoder_args=[
            "--max-sessions", str(MAX_SESSIONS), "--max-message-bytes", str(48 << 20), "--idle-timeout", "120",
            *SMALL_FRAMES], encoder_args=SMALL_FRAMES) as running:
        yield running


class Witness:
    """A LOCKSTEP session kept open through the module; `step()` runs one block and returns its latency."""

    def __init__(self, address: str):
        self.stream = SessionStream(address, start_request(IMAGE, "universal", seed=5, max_blocks=60))
        self.blocks = iter(self.stream)

    def step(self) -> float:
        started = time.perf_counter()
        self.stream.send(SPACE.from_names(["forward"]))
        next(self.blocks)
        return time.perf_counter() - started


@pytest.fixture(scope="module")
def witness(services):
    witness = Witness(services.address)
    witness.step()
    yield witness
    witness.stream.close()


def start(mode: str = "universal", image: bytes = IMAGE, **fields) -> bytes:
    return session_pb2.SessionRequest(start=session_pb2.StartSession(mode=mode, image=image, **fields)
                                      ).SerializeToString()


def action(**fields) -> bytes:
    return session_pb2.SessionRequest(action=session_pb2.Action(**fields)).SerializeToString()


def call(address: str, messages: list[bytes], timeout: float = 60) -> tuple[list[session_pb2.SessionResponse],
                                                                          grpc.RpcError | None]:
    """Send serialized requests as they are (valid or not), half-close, and collect the responses and the error."""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        session = channel.stream_stream(SESSION_METHOD, request_serializer=None,
                                        response_deserializer=session_pb2.SessionResponse.FromString)
        responses = []
        try:
            for response in session(iter(messages), timeout=timeout):
                responses.append(response)
        except grpc.RpcError as e:
            return responses, e
    return responses, None


def error_of(address: str, messages: list[bytes]) -> grpc.RpcError:
    _, error = call(address, messages)
    assert error is not None, "the call succeeded"
    return error


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@functools.cache
def png_of_zeros(width: int, height: int) -> bytes:
    """An RGBA PNG of `width` x `height` transparent pixels, made without holding them all (it compresses ~1000:1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    compressor, body = zlib.compressobj(), []
    for first in range(0, height, 400):
        body.append(compressor.compress(bytes((1 + 4 * width) * (min(height, first + 400) - first))))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")


def ico_wrapping(png: bytes) -> bytes:
    """An ICO file with one entry, `png` (an ICO entry may be a whole PNG, of any size)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


# ---- defect 1: memory of rejected starts --------------------------------------------------------------------------

def test_rejected_large_starts_leave_no_memory_behind(services, witness):
    """50 rejected 30 MB starts, five at a time, for each reason a start is refused (unknown mode, an image that is
    not PNG or JPEG, a PNG whose header is fine but the server is full): the decoder's RSS comes back to where a
    first round left it, and none of it reaches the encoder. Before, each kept its request alive (gRPC's request
    iterator and the abort's exception held it in reference cycles) and glibc kept the freed buffers."""
    filler = os.urandom(BIG)
    starts = [start(mode="doom", image=filler), start(image=b"GIF89a" + filler),
              start(image=IMAGE + filler)]  # a PNG with trailing bytes: valid header; refused while the server is full
    holders = [SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=2))
               for _ in range(MAX_SESSIONS - 1)]  # full, with the witness
    try:
        def round_of(count: int) -> None:
            with concurrent.futures.ThreadPoolExecutor(5) as pool:
                errors = list(pool.map(lambda i: error_of(services.address, [starts[i % len(starts)]]),
                                       range(count)))
            assert {e.code() for e in errors} <= {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}, errors[0]
            assert any("sessions at most" in e.details() for e in errors)

        decoder, encoder = services.decoder.process.pid, services.encoder.process.pid
        encoder_bytes = metric_value(services.encoder_metrics_port, "worldstream_encoder_bytes_received_total")
        round_of(5)  # the first large messages create what the process keeps anyway (threads, pools)
        time.sleep(3)  # the decoder returns memory a second after the last large message
        baseline = rss_mb(decoder), rss_mb(encoder)
        for _ in range(10):
            round_of(5)
        try:
            wait_for(lambda: rss_mb(decoder) - baseline[0] < DECODER_RSS_SLACK_MB, 10, "the decoder's RSS to come back",
                     interval=0.5)
        except TimeoutError:
            pass  # the assertion below says by how much
        after = rss_mb(decoder), rss_mb(encoder)
        print(f"decoder RSS {baseline[0]:.0f} -> {after[0]:.0f} MB, encoder {baseline[1]:.0f} -> {after[1]:.0f} MB "
              "after 50 rejected 30 MB starts")
        assert after[0] - baseline[0] < DECODER_RSS_SLACK_MB, \
            f"the decoder grew from {baseline[0]:.0f} to {after[0]:.0f} MB"
        assert after[1] - baseline[1] < 16, f"the encoder grew from {baseline[1]:.0f} to {after[1]:.0f} MB"
        assert metric_value(services.encoder_metrics_port, "worldstream_encoder_bytes_received_total") == encoder_bytes
    finally:
        for holder in holders:
            holder.close()
    wait_for(lambda: metric_value(services.decoder_metrics_port, "worldstream_decoder_sessions_active") == 1, 30,
             "the holder sessions to end")
    witness.step()


# ---- defect 2: huge action vectors ---------------------------------------------------------------------------------

def test_huge_actions_are_refused_unparsed_and_the_event_loop_stays_responsive(services, witness):
    """Six sessions, one after the other, each send a 31 MB keyboard vector: each call ends with RESOURCE_EXHAUSTED
    from the action's size limit, and the decoder's event loop keeps answering health checks (served on it)
    within 0.75 s. Before, validation built Python lists of 7.75 M floats on the event loop, ~1.5 s per action
    here, and every session froze. (What remains is gRPC's own copying of a received message, ~0.1 s.)"""
    huge = action(keyboard=[0.5] * 7_750_000)
    latencies: list[float] = []
    with grpc.insecure_channel(services.address) as channel, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        health = health_pb2_grpc.HealthStub(channel)
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        calls = [pool.submit(error_of, services.address, [start(), huge]) for _ in range(6)]
        while not all(c.done() for c in calls):
            started = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.02)
        errors = [c.result() for c in calls]
    for error in errors:
        assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
        assert f"may have at most {ACTION_MAX_BYTES}" in error.details()
    print(f"health check latency during the huge actions: max {max(latencies):.3f} s over {len(latencies)} checks")
    assert max(latencies) < 0.75
    witness.step()


# ---- defect 9 and the per-kind limits: what arrives is checked before it is parsed ---------------------------------

@pytest.mark.parametrize("messages, code, message", [
    ([b"\x0a\x05\x0a"], Code.INVALID_ARGUMENT, "message #1 (3 bytes) is not a SessionRequest"),
    ([b"\x0a\x03\x0a\x01\xff"], Code.INVALID_ARGUMENT, "is not a SessionRequest"),  # a mode that is not UTF-8
    ([start(), b"\x12\x08\x0d\x00\x00"], Code.INVALID_ARGUMENT, "message #2 (5 bytes) is not a SessionRequest"),
    ([start(image=b"\x89PNG" + bytes(START_MAX_BYTES))], Code.RESOURCE_EXHAUSTED,
     f"(`start`) may have at most {START_MAX_BYTES}"),
    ([start(), action(keys=["forward"] * 1000)], Code.RESOURCE_EXHAUSTED, f"may have at most {ACTION_MAX_BYTES}"),
    ([start(), start(image=bytes(BIG))], Code.INVALID_ARGUMENT, "`start` is only allowed as the first message"),
], ids=["truncated-start", "invalid-utf8", "truncated-action", "start-over-limit", "action-over-limit",
        "large-second-start"])
def test_malformed_and_oversized_messages(services, witness, messages, code, message):
    error = error_of(services.address, messages)
    assert error.code() == code, error.details()
    assert message in error.details()
    witness.step()


# ---- defect 5 and the 1x1 image: images are checked from their header, in the decoder --------------------------------

@pytest.mark.parametrize("image, message", [
    (ico_wrapping(png_of_zeros(12_000, 12_000)), "not a decodable image; send a PNG or JPEG file"),
    (png_of_zeros(12_000, 12_000), "12000x12000 exceeds the limit of 40000000 pixels"),
    (encoded(Image.new("RGB", (64, 64)), "GIF"), "send a PNG or JPEG file"),
    (encoded(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG"), "1x1 is too small"),
    (encoded(Image.new("RGB", (200, 4)), "JPEG"), "200x4 is too small"),
], ids=["ico-of-144-megapixels", "png-of-144-megapixels", "gif", "1x1", "4-rows"])
def test_images_are_checked_from_the_header_before_anything_decodes_them(services, witness, image, message):
    """Refused by the decoder from the header: nothing reaches the encoder, no pixel is decoded. Before, the
    encoder decoded any Pillow format (an ICO of 0.5 MB wrapping 144 megapixels took +550 MB before the pixel
    limit was checked) and a 1x1 image became a black first frame."""
    encoder_bytes = metric_value(services.encoder_metrics_port, "worldstream_encoder_bytes_received_total")
    decoder_rss = rss_mb(services.decoder.process.pid)
    error = error_of(services.address, [start(image=image)])
    assert error.code() == Code.INVALID_ARGUMENT and message in error.details(), error.details()
    assert "start.image" in error.details()
    assert metric_value(services.encoder_metrics_port, "worldstream_encoder_bytes_received_total") == encoder_bytes
    assert rss_mb(services.decoder.process.pid) - decoder_rss < 32
    witness.step()


# ---- defect 8: errors do not echo unbounded input ------------------------------------------------------------------

def test_errors_do_not_echo_unbounded_input(services, witness):
    """A 1 MB mode string: INVALID_ARGUMENT with a short message (before: the whole string in the status, which
    the client refused as RESOURCE_EXHAUSTED, and 1 MB log lines)."""
    mode = "x" * 1_000_000
    error = error_of(services.address, [start(mode=mode)])
    assert error.code() == Code.INVALID_ARGUMENT, error.details()
    assert error.details().startswith("unknown mode 'xxxx") and "(1000000 in all)" in error.details()
    assert len(error.details().encode()) <= MAX_STATUS_BYTES
    log_lines = services.decoder.log().splitlines()
    assert any("unknown mode" in line for line in log_lines)
    assert max(len(line) for line in log_lines) < 8192
    witness.step()


def test_status_messages_are_capped():
    """Whatever goes into a ServiceError, the status message stays under MAX_STATUS_BYTES (UTF-8 included)."""
    for text in ("a" * 100_000, "é" * 100_000, "x" * 10):
        error = ServiceError(Code.INVALID_ARGUMENT, text)
        assert len(error.message.encode()) <= MAX_STATUS_BYTES
    assert ServiceError(Code.INVALID_ARGUMENT, "short").message == "short"


# ---- `end`, then an error: a session's outcome is decided once its end is on its way ---------------------------------

def test_a_helper_failing_after_the_end_is_sent_does_not_change_the_outcome():
    """The session's deliverer sets `settled` as it writes `end`; the reader then fails on a message past the end
    (OUT_OF_RANGE). The call must end as the end said, not with the reader's error after it (seen before: `end`,
    then OUT_OF_RANGE). And before the end, a failing helper still ends the call with its error."""
    async def scenario(settle: bool) -> str:
        settled, end_written = asyncio.Event(), asyncio.Event()

        async def deliver() -> str:
            if settle:
                settled.set()
            await end_written.wait()  # the write of `end` takes a while
            return "ended"

        async def read() -> None:
            await asyncio.sleep(0)  # a message past the end arrives while `end` is being written
            try:
                raise ServiceError(Code.OUT_OF_RANGE, "action #3 is past the end")
            finally:
                asyncio.get_running_loop().call_later(0.05, end_written.set)

        try:
            return await run_together(deliver(), read(), settled=settled)
        except ServiceError as e:
            return e.code.name

    assert asyncio.run(scenario(settle=True)) == "ended"
    assert asyncio.run(scenario(settle=False)) == "OUT_OF_RANGE"


# ---- --profile-dir: a caller's stream id never leaves the profile directory ------------------------------------------

def test_trace_files_stay_in_the_profile_directory(tmp_path):
    """A stream id comes from the caller (the encoder names a trace after the decoder's session_id): whatever it
    holds, the trace is written inside --profile-dir, one file per id."""
    profiles = tmp_path / "a" / "b" / "profiles"
    outside = tmp_path / f"absolute-{os.getpid()}"
    profiler = StreamProfiler(profiles, logging.getLogger("test"))
    hostile = ["../../escaped", str(outside), "a/../../b", "..", "x" * 5000]
    for stream_id in hostile:
        profiler.finish(profiler.start(stream_id), stream_id)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == len(hostile) and all(p.parent == profiles for p in written), written
    assert all(len(p.name) <= 105 for p in written)
