"""Operations: dropped clients leave nothing behind, metrics, health, reflection, graceful SIGTERM."""
from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service_harness import (REPO, SMALL_FRAMES, health_status, metric_value, metrics_text, png_bytes,
                             running_services, wait_for)
from worldstream.api.spaces import get_action_space
from worldstream.client import SessionStream, start_request
from worldstream.v1 import session_pb2, session_pb2_grpc

IMAGE = png_bytes(seed=11)
SPACE = get_action_space("universal")
DROPPED_CLIENTS = 100


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("ops"), decoder_args=["--max-sessions", "8", *SMALL_FRAMES],
                          encoder_args=SMALL_FRAMES, warmup_blocks=2) as running:
        yield running


def sessions_active(services) -> tuple[float, float]:
    return (metric_value(services.decoder_metrics_port, "worldstream_decoder_sessions_active"),
            metric_value(services.encoder_metrics_port, "worldstream_encoder_sessions_active"))


def drop_client(address: str, how: int) -> None:
    """Open a session and vanish without a goodbye: 0 right after the start, 1 after the session info, 2 with a
    block in flight, 3 by closing the connection under the call."""
    gone = threading.Event()

    def requests():
        yield session_pb2.SessionRequest(start=start_request(IMAGE, "universal", max_blocks=30))
        if how == 2:
            yield session_pb2.SessionRequest(action=session_pb2.Action(keys=["forward"]))
            yield session_pb2.SessionRequest(action=session_pb2.Action(keys=["left"]))
        gone.wait(30)  # never half-close

    channel = grpc.insecure_channel(address)
    call = session_pb2_grpc.WorldSessionServiceStub(channel).Session(requests())
    try:
        for _ in range({0: 0, 1: 1, 2: 2, 3: 1}[how]):
            next(call)
    except grpc.RpcError as e:  # a burst may briefly exceed --max-sessions while dropped sessions are freed
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
    finally:
        if how != 3:
            call.cancel()
        channel.close()
        gone.set()


KILLED_CLIENT = """
import sys
from worldstream.api.spaces import get_action_space
from worldstream.client import SessionStream, start_request
stream = SessionStream(sys.argv[1], start_request(open(sys.argv[2], "rb").read(), "universal", max_blocks=30))
stream.send(get_action_space("universal").from_names(["forward"]))
stream.send(get_action_space("universal").from_names(["right"]))
next(iter(stream))
print("streaming", flush=True)
sys.stdin.read()
"""


def test_dropped_clients_leave_no_session(services, tmp_path):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: drop_client(services.address, i % 4), range(DROPPED_CLIENTS)))
    # Two clients killed with SIGKILL mid-session: the kernel closes their sockets.
    image = tmp_path / "image.png"
    image.write_bytes(IMAGE)
    clients = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, services.address, str(image)], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for client in clients:
        assert client.stdout.readline().strip() == "streaming"
    assert sessions_active(services)[0] >= 2
    for client in clients:
        client.kill()
        client.wait()
    wait_for(lambda: sessions_active(services) == (0.0, 0.0), 60, "every session to be released")
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_errors_total", {"code": "CANCELLED"}) > 0
    # The server still works.
    with SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=1)) as stream:
        stream.send(SPACE.from_names(["forward"]))
        assert len(list(stream)) == 1


def test_metrics_endpoints(services):
    with SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=2)) as stream:
        stream.send(SPACE.from_names(["forward"]))
        stream.send(SPACE.from_names(["back"]))
        assert len(list(stream)) == 2
    decoder = metrics_text(services.decoder_metrics_port)
    for name in ["sessions_active", "blocks_served_total", "block_stage_seconds_bucket",
                 "time_to_first_frame_seconds_count", "bytes_sent_total", "bytes_received_total",
                 "encoder_request_seconds_count", "errors_total"]:
        assert f"worldstream_decoder_{name}" in decoder, name
    for stage in ["action_wait", "condition_wait", "denoise", "cache_update", "vae_decode", "to_host", "frame_encode"]:
        assert f'stage="{stage}"' in decoder, stage
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_blocks_served_total") >= 2
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_time_to_first_frame_seconds_count") >= 1
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_bytes_sent_total") > 0
    encoder = metrics_text(services.encoder_metrics_port)
    for name in ["sessions_active", "blocks_served_total", "block_stage_seconds_bucket", "bytes_sent_total",
                 "bytes_received_total", "encoder_request_seconds_count", "errors_total"]:
        assert f"worldstream_encoder_{name}" in encoder, name


def test_health_and_reflection(services):
    for address, service in [(services.address, "worldstream.v1.WorldSessionService"),
                             (services.encoder_address, "worldstream.v1.ConditionEncoderService")]:
        assert health_status(address) == health_pb2.HealthCheckResponse.SERVING
        assert health_status(address, service) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(address) as channel:
            listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {service, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= listed


def test_decoder_readiness_follows_its_encoder(tmp_path):
    """The decoder's session service (readiness) is SERVING only while its encoder is: NOT_SERVING soon after the
    encoder dies, SERVING again once it is back, and `worldstream health --service` exits 1, then 0. The overall
    status (liveness) stays SERVING throughout: an encoder outage must not get decoders restarted."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    ready = "worldstream.v1.WorldSessionService"

    def health_command(address: str, *service: str) -> int:
        return subprocess.run([sys.executable, "-m", "worldstream.cli", "health", address, *service],
                              capture_output=True, timeout=30).returncode

    with running_services(tmp_path, decoder_args=SMALL_FRAMES, encoder_args=SMALL_FRAMES) as services:
        # alive (what start-up waits for) comes first; ready follows with the first check of the encoder
        wait_for(lambda: health_status(services.address, ready) == serving, 15, "the decoder to report ready",
                 interval=0.2)
        assert health_command(services.address, "--service", ready) == 0
        services.encoder.signal(signal.SIGKILL)
        services.encoder.wait(10)
        wait_for(lambda: health_status(services.address, ready) == not_serving, 15,
                 "the decoder to report NOT_SERVING", interval=0.2)
        assert health_command(services.address, "--service", ready) == 1
        assert health_status(services.address) == serving and health_command(services.address) == 0  # alive
        services.start_encoder()  # same port and arguments
        wait_for(lambda: health_status(services.address, ready) == serving, 15,
                 "the decoder to report SERVING again", interval=0.2)
        assert health_command(services.address, "--service", ready) == 0
    assert "not serving: encoder at" in services.decoder.log()


def test_idle_timeout_profiles_and_sigterm(tmp_path):
    """A LOCKSTEP session without actions ends after --idle-timeout; --profile-dir leaves Chrome traces of both
    services; SIGTERM ends running sessions after their block and both services exit 0."""
    profiles = tmp_path / "profiles"
    with running_services(tmp_path, decoder_args=[*SMALL_FRAMES, "--idle-timeout", "1.5", "--profile-dir",
                                                  str(profiles)],
                          encoder_args=[*SMALL_FRAMES, "--profile-dir", str(profiles)]) as services:
        with SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=5)) as idle:
            assert list(idle) == [] and idle.end.reason == session_pb2.END_REASON_IDLE_TIMEOUT

        stream = SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=30))
        stream.send(SPACE.from_names(["forward"]))
        blocks = iter(stream)
        next(blocks)
        services.decoder.signal(signal.SIGTERM)
        assert list(blocks) == []  # the session waits for its next action: it ends at once
        assert stream.end.reason == session_pb2.END_REASON_SERVER_SHUTDOWN
        stream.close()
        assert services.decoder.wait(30) == 0
        services.encoder.signal(signal.SIGTERM)
        assert services.encoder.wait(30) == 0
        assert '"event": "stopped"' in services.decoder.log()
    # One stream at a time is traced, and the two sessions may overlap while the first is being freed.
    assert {path.name.split("-")[0] for path in profiles.glob("*.json")} == {"encode", "session"}
