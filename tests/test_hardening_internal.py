"""The internal side of the services under faults and hostile peers (issue 7, part B): the decoder against an
encoder that crashes, restarts or breaks the stream's rules (a real decoder process against a hostile encoder
served by this test process), the encoder's bounds on what its caller asks, the metrics server's threads, what
each server reflects, its connection and call limits, and the loopback defaults."""
from __future__ import annotations

import concurrent.futures
import ipaddress
import math
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service_harness import (CONFIG, SMALL_FRAMES, free_port, metric_value, png_bytes, running_services,
                             start_decoder, wait_for)
from worldstream.encoder.client import ConditionSpec
from worldstream.engine.config import load_config
from worldstream.engine.generator import DecoderModels
from worldstream.serving.metrics import METRICS_QUEUED_CONNECTIONS, METRICS_WORKERS
from worldstream.v1 import encoder_pb2, encoder_pb2_grpc, session_pb2, session_pb2_grpc, tensor_pb2
from worldstream.wire import MAX_MESSAGE_BYTES, pack_tensor

IMAGE = png_bytes(seed=21)
Code = grpc.StatusCode
ENCODER_SERVICE = "worldstream.v1.ConditionEncoderService"
VISUAL, COND = encoder_pb2.CONDITION_KIND_VISUAL_CONTEXT, encoder_pb2.CONDITION_KIND_COND_CONCAT


# ---- a session seen from the client -------------------------------------------------------------------------------

def play_until_error(address: str, max_blocks: int, timeout: float = 120) -> tuple[int, grpc.RpcError | None, float]:
    """A LOCKSTEP session of `max_blocks` blocks, every action sent up front: (blocks received, the error the
    call ended with or None, seconds from the start to the end)."""
    requests = [session_pb2.SessionRequest(start=session_pb2.StartSession(mode="universal", image=IMAGE,
                                                                          max_blocks=max_blocks))]
    requests += [session_pb2.SessionRequest(action=session_pb2.Action(keys=["forward"]))] * max_blocks
    started, blocks = time.monotonic(), 0
    with grpc.insecure_channel(address) as channel:
        try:
            for response in session_pb2_grpc.WorldSessionServiceStub(channel).Session(iter(requests),
                                                                                      timeout=timeout):
                blocks += response.WhichOneof("response") == "block"
        except grpc.RpcError as e:
            return blocks, e, time.monotonic() - started
    return blocks, None, time.monotonic() - started


def process_rss(pid: int) -> int:
    return _status_field(pid, "VmRSS") * 1024


def process_threads(pid: int) -> int:
    return _status_field(pid, "Threads")


def _status_field(pid: int, name: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


def listening_hosts(port: int) -> set[str]:
    """The addresses a TCP port of this machine listens on (from /proc/net/tcp and tcp6)."""
    hosts = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in open(table).readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(host)
                # The kernel prints each 32-bit word in host (little-endian) order.
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(words)
                hosts.add(str(getattr(address, "ipv4_mapped", None) or address))  # gRPC listens on ::ffff:a.b.c.d
    return hosts


# ---- the real services --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("internal"), decoder_args=SMALL_FRAMES,
                          encoder_args=SMALL_FRAMES) as running:
        yield running


def test_services_listen_on_loopback_by_default(services):
    """No --host or --metrics-host: gRPC and /metrics of both services listen on 127.0.0.1 only."""
    for port in (services.encoder_port, services.encoder_metrics_port, services.decoder_port,
                 services.decoder_metrics_port):
        assert listening_hosts(port) == {"127.0.0.1"}, port


def test_metrics_server_threads_are_bounded(services):
    """300 open, unfinished /metrics requests add a few threads (a fixed pool), not one each; the endpoint
    answers again once they are gone."""
    pid, port = services.decoder.process.pid, services.decoder_metrics_port
    before = process_threads(pid)
    connections = []
    try:
        for _ in range(300):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"GET /metrics HTTP/1.1\r\n")  # never finished
            connections.append(connection)
        time.sleep(1.0)
        assert process_threads(pid) <= before + METRICS_WORKERS
    finally:
        for connection in connections:
            connection.close()
    assert METRICS_QUEUED_CONNECTIONS < 300

    def answers() -> bool:  # while the pool drains the closed connections, a new one may be closed unanswered
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20) as response:
                return b"worldstream_decoder_sessions_active" in response.read()
        except (ConnectionError, OSError):
            return False
    wait_for(answers, 30, "/metrics to answer again", interval=0.5)


def test_reflection_describes_only_the_services_own_api(services):
    """The decoder imports the internal encoder API to call it, yet its reflection knows only the public one."""
    with grpc.insecure_channel(services.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert ENCODER_SERVICE not in database.get_services()
        with pytest.raises(KeyError):
            database.FindFileContainingSymbol(ENCODER_SERVICE)
        with pytest.raises(KeyError):
            database.FindFileContainingSymbol("worldstream.v1.TensorChunk")
        assert database.FindFileContainingSymbol("worldstream.v1.WorldSessionService").name.endswith("session.proto")
    with grpc.insecure_channel(services.encoder_address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert database.FindFileContainingSymbol(ENCODER_SERVICE).name.endswith("encoder.proto")


def encode_call(address: str, requests: list[encoder_pb2.EncodeRequest], read: int = 10
                ) -> tuple[list[encoder_pb2.EncodeResponse], grpc.RpcError | None]:
    """Send `requests` on an Encode stream (then keep it open) and read up to `read` responses."""
    done = threading.Event()

    def stream() -> Iterator[encoder_pb2.EncodeRequest]:
        yield from requests
        done.wait(30)

    responses = []
    with grpc.insecure_channel(address) as channel:
        call = encoder_pb2_grpc.ConditionEncoderServiceStub(channel).Encode(stream(), timeout=30)
        try:
            for response in call:
                responses.append(response)
                if len(responses) == read:
                    break
        except grpc.RpcError as e:
            return responses, e
        finally:
            call.cancel()
            done.set()
    return responses, None


def image_request(**fields) -> encoder_pb2.EncodeRequest:
    request = dict(session_id="bounds", mode="universal", image=IMAGE, height=32, width=64, max_blocks=2,
                   initial_credits=1)
    return encoder_pb2.EncodeRequest(image=encoder_pb2.ImageConditionRequest(**{**request, **fields}))


def credit(blocks: int) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(credit=encoder_pb2.CreditGrant(blocks=blocks))


@pytest.mark.parametrize("requests, message", [
    ([image_request(max_blocks=4_000_000_000)], "max_blocks must be in [1, "),
    ([image_request(max_blocks=2, initial_credits=3)], "initial_credits 3 exceeds max_blocks 2"),
    ([image_request(max_blocks=2, initial_credits=1), credit(1_000_000)], "add up to at most max_blocks 2"),
    ([image_request(max_blocks=2, initial_credits=1), credit(0)], "at least 1"),
], ids=["max-blocks", "initial-credits", "credit-overflow", "zero-credit"])
def test_encoder_bounds_blocks_and_credit(services, requests, message):
    responses, error = encode_call(services.encoder_address, requests)
    assert error is not None and error.code() == Code.INVALID_ARGUMENT, (responses, error)
    assert message in error.details()


def test_server_connection_and_call_limits(services, tmp_path):
    """--max-connections: a connection beyond it is closed; --max-streams-per-connection: a call beyond it waits
    on its connection; --max-calls: a call beyond it, on any connection, fails with RESOURCE_EXHAUSTED."""
    port = free_port()
    decoder = start_decoder(tmp_path / "decoder.log", port, free_port(), services.encoder_address,
                            ["--warmup-blocks", "0", *SMALL_FRAMES, "--max-connections", "3",
                             "--max-streams-per-connection", "2", "--max-calls", "4"])
    address = f"127.0.0.1:{port}"
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between channels
    channels = [grpc.insecure_channel(address, options=own_connection) for _ in range(4)]
    held: list[grpc.Future] = []
    release = threading.Event()

    def nothing_until_released() -> Iterator[session_pb2.SessionRequest]:
        release.wait(60)
        yield from ()

    def idle_session(channel) -> None:
        held.append(session_pb2_grpc.WorldSessionServiceStub(channel).Session(nothing_until_released()))

    def health_check(channel, timeout: float = 2.0) -> Code:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return Code.OK
        except grpc.RpcError as e:
            return e.code()

    try:
        # The start-up checks' connections may take a moment to be closed on the server's side.
        wait_for(lambda: [health_check(channel) for channel in channels[:3]] == [Code.OK] * 3, 10,
                 "three connections to be served")
        assert health_check(channels[3]) == Code.UNAVAILABLE  # a fourth connection
        channels[3].close()

        idle_session(channels[0])
        idle_session(channels[0])
        assert health_check(channels[0], 1.0) == Code.DEADLINE_EXCEEDED  # the third call on that connection waits
        assert health_check(channels[1]) == Code.OK
        idle_session(channels[1])
        idle_session(channels[1])
        time.sleep(0.5)  # the server has the four calls
        assert health_check(channels[2]) == Code.RESOURCE_EXHAUSTED  # a fifth call
    finally:
        release.set()
        for call in held:
            call.cancel()
        for channel in channels:
            channel.close()
        decoder.stop()


# ---- encoder crash and restart ------------------------------------------------------------------------------------

def test_encoder_crash_or_shutdown_mid_session_is_unavailable(tmp_path):
    """An encoder killed (SIGKILL) or shut down (SIGTERM, its grace over) under a running session: the session
    uses the blocks that had arrived, then ends with UNAVAILABLE, never INTERNAL."""
    with running_services(tmp_path, decoder_args=SMALL_FRAMES, encoder_args=[*SMALL_FRAMES, "--grace", "0.5"]
                          ) as services:
        for stop in (signal.SIGKILL, signal.SIGTERM):
            served_before = metric_value(services.encoder_metrics_port, "worldstream_encoder_blocks_served_total")
            requests_sent = threading.Event()

            def requests(max_blocks: int = 8) -> Iterator[session_pb2.SessionRequest]:
                yield session_pb2.SessionRequest(start=session_pb2.StartSession(image=IMAGE, max_blocks=max_blocks))
                yield session_pb2.SessionRequest(action=session_pb2.Action(keys=["forward"]))
                requests_sent.wait(60)
                for _ in range(max_blocks - 1):
                    yield session_pb2.SessionRequest(action=session_pb2.Action(keys=["left"]))

            blocks = 0
            with grpc.insecure_channel(services.address) as channel:
                call = session_pb2_grpc.WorldSessionServiceStub(channel).Session(requests(), timeout=120)
                with pytest.raises(grpc.RpcError) as caught:
                    for response in call:
                        if response.WhichOneof("response") != "block":
                            continue
                        blocks += 1
                        if blocks == 1:  # the encoder has sent block 0 alone (its credit, until block 1 is taken)
                            wait_for(lambda: metric_value(services.encoder_metrics_port,
                                                          "worldstream_encoder_blocks_served_total")
                                     == served_before + 1, 30, "the encoder to send block 0")
                            services.encoder.signal(stop)
                            services.encoder.wait(30)
                            requests_sent.set()
            error = caught.value
            assert error.code() == Code.UNAVAILABLE, (signal.Signals(stop).name, error.details())
            assert "encoder" in error.details() and 1 <= blocks < 8
            services.start_encoder()  # same port and arguments


# ---- a hostile encoder --------------------------------------------------------------------------------------------

Behaviour = Callable[["HostileEncoder", encoder_pb2.ImageConditionRequest, grpc.ServicerContext],
                     Iterator[encoder_pb2.EncodeResponse]]


class HostileEncoder(encoder_pb2_grpc.ConditionEncoderServiceServicer):
    """An encoder that answers with `ready` and then does what `behaviour` says."""

    def __init__(self, spec: ConditionSpec):
        self.spec = spec
        self.behaviour: Behaviour | None = None

    def Encode(self, request_iterator, context):
        request = next(request_iterator).image
        yield encoder_pb2.EncodeResponse(ready=encoder_pb2.EncodeReady(
            mode=request.mode, latent_frames_per_block=3, max_blocks=request.max_blocks,
            transport=encoder_pb2.TENSOR_TRANSPORT_GRPC))
        yield from self.behaviour(self, request, context)

    def tensor(self, kind: int, block: int, tensor: torch.Tensor) -> list[encoder_pb2.EncodeResponse]:
        name = "visual_context" if kind == VISUAL else "cond_concat"
        return [encoder_pb2.EncodeResponse(tensor=encoder_pb2.ConditionTensor(kind=kind, block_index=block,
                                                                              chunk=chunk))
                for chunk in pack_tensor(name, tensor)]

    def visual_context(self) -> list[encoder_pb2.EncodeResponse]:
        return self.tensor(VISUAL, 0, torch.zeros(self.spec.shapes["visual_context"], dtype=self.spec.dtype))

    def block(self, b: int) -> list[encoder_pb2.EncodeResponse]:
        return self.tensor(COND, b, torch.zeros(self.spec.shapes["cond_concat"], dtype=self.spec.dtype))


def hold(context: grpc.ServicerContext) -> Iterator[encoder_pb2.EncodeResponse]:
    """Keep the stream open, sending nothing, until the decoder ends it."""
    while context.is_active():
        time.sleep(0.05)
    yield from ()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A decoder process whose encoder is a HostileEncoder in this process."""
    overrides = [value for flag, value in zip(SMALL_FRAMES[::2], SMALL_FRAMES[1::2])]
    encoder = HostileEncoder(ConditionSpec.of(DecoderModels.build(load_config(CONFIG, overrides))))
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(8))
    encoder_pb2_grpc.add_ConditionEncoderServiceServicer_to_server(encoder, server)
    health_servicer = health.HealthServicer()
    for name in ("", ENCODER_SERVICE):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    encoder_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    port = free_port()
    decoder = start_decoder(tmp_path_factory.mktemp("hostile") / "decoder.log", port, free_port(),
                            f"127.0.0.1:{encoder_port}", ["--warmup-blocks", "0", "--encoder-timeout", "30",
                                                          *SMALL_FRAMES])
    try:
        yield encoder, f"127.0.0.1:{port}", decoder
    finally:
        decoder.stop()
        server.stop(None)


def test_header_claiming_a_huge_tensor_is_refused_before_allocating(hostile):
    """A cond_concat header claiming 200 MB (a shape other than the session's) fails the session at once with
    INTERNAL; the decoder reserves nothing for it."""
    encoder, address, decoder = hostile
    channels, time_frames, height, width = encoder.spec.shapes["cond_concat"][1:]
    scale = math.isqrt((200 << 20) // (4 * channels * time_frames * height * width))
    shape = [1, channels, time_frames, height * scale, width * scale]

    def behaviour(encoder, request, context):
        yield from encoder.visual_context()
        yield encoder_pb2.EncodeResponse(tensor=encoder_pb2.ConditionTensor(kind=COND, block_index=0, chunk=(
            tensor_pb2.TensorChunk(name="cond_concat", dtype=tensor_pb2.DTYPE_FLOAT32, shape=shape,
                                   total_bytes=4 * math.prod(shape), data=bytes(1024)))))
        yield from hold(context)

    encoder.behaviour = behaviour
    rss_before = process_rss(decoder.process.pid)
    blocks, error, seconds = play_until_error(address, 2)
    assert error is not None and error.code() == Code.INTERNAL, error
    assert "expected" in error.details() and str(list(encoder.spec.shapes["cond_concat"])) in error.details()
    assert blocks == 0 and seconds < 15
    assert process_rss(decoder.process.pid) - rss_before < 100 << 20


def test_blocks_beyond_the_credit_are_refused(hostile):
    """An encoder that sends every block at once, ignoring its credit: the blocks within the credit are used,
    the first beyond it fails the session with INTERNAL instead of being buffered."""
    encoder, address, _ = hostile

    def behaviour(encoder, request, context):
        yield from encoder.visual_context()
        for b in range(request.max_blocks):
            yield from encoder.block(b)
        yield from hold(context)

    encoder.behaviour = behaviour
    blocks, error, _ = play_until_error(address, 8)
    assert error is not None and error.code() == Code.INTERNAL, error
    assert "without credit" in error.details()
    assert blocks < 8


@pytest.mark.parametrize("make, message", [
    (lambda spec: torch.zeros((1, spec.shapes["visual_context"][1] * 4, spec.shapes["visual_context"][2]),
                              dtype=spec.dtype), "shape"),
    (lambda spec: torch.zeros(spec.shapes["visual_context"], dtype=torch.float64), "torch.float64"),
    (lambda spec: torch.full(spec.shapes["visual_context"], math.nan, dtype=spec.dtype), "NaN"),
], ids=["length", "dtype", "nan"])
def test_clip_context_is_checked(hostile, make, message):
    encoder, address, _ = hostile

    def behaviour(encoder, request, context):
        yield from encoder.tensor(VISUAL, 0, make(encoder.spec))
        yield from hold(context)

    encoder.behaviour = behaviour
    blocks, error, _ = play_until_error(address, 2)
    assert error is not None and error.code() == Code.INTERNAL, error
    assert "visual_context" in error.details() and message in error.details()


def test_encoder_ending_early_fails_the_session_at_once(hostile):
    """An encoder that closes its stream with OK after one block of four: UNAVAILABLE right away, not after
    the decoder's --encoder-timeout (30 s)."""
    encoder, address, _ = hostile

    def behaviour(encoder, request, context):
        yield from encoder.visual_context()
        yield from encoder.block(0)

    encoder.behaviour = behaviour
    blocks, error, seconds = play_until_error(address, 4)
    assert error is not None and error.code() == Code.UNAVAILABLE, error
    assert "ended the stream after 1 of 4 blocks" in error.details()
    assert blocks <= 1 and seconds < 15  # block 0 may still be on its way when block 1 fails the session


def test_encoder_message_over_the_wire_limit_is_not_resource_exhausted(hostile):
    """A 5 MB message from the encoder breaks the wire format (chunks of at most 1 MiB): INTERNAL, which does
    not read as "server full"."""
    encoder, address, _ = hostile

    def behaviour(encoder, request, context):
        yield encoder_pb2.EncodeResponse(tensor=encoder_pb2.ConditionTensor(kind=VISUAL, chunk=tensor_pb2.TensorChunk(
            name="visual_context", dtype=tensor_pb2.DTYPE_FLOAT32, shape=[5 << 18], total_bytes=5 << 20,
            data=bytes(5 << 20))))
        yield from hold(context)

    encoder.behaviour = behaviour
    blocks, error, _ = play_until_error(address, 2)
    assert error is not None and error.code() == Code.INTERNAL, error
    assert f"{MAX_MESSAGE_BYTES} bytes" in error.details()
