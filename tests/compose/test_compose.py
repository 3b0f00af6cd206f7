"""The CPU deployment (deploy/docker-compose.cpu.yml) under a real Docker engine, end to end: the image built
from this checkout, both services started by compose, and traffic from the host's client to loopback ports.

Not part of the unit suite (pyproject.toml's norecursedirs): `make test-compose` runs it through run.sh, which
starts an engine where none runs and builds the base image. The tests share one running stack and run in order;
the last one stops it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import av
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worldstream.serving.health import serving_status

SESSION_SERVICE = "worldstream.v1.WorldSessionService"  # the decoder's readiness

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "deploy" / "docker-compose.cpu.yml"
PROJECT = "worldstream-compose-test"
IMAGE = REPO / "services" / "worldstream" / "assets" / "demo.png"
LOGS = REPO / "build" / "test-compose" / "services.log"  # both services' logs, written when the stack goes down
STOP_GRACE_SECONDS = 30  # stop_grace_period in deploy/compose.services.yml
pytestmark = pytest.mark.timeout(1800)  # the first test includes building the image

# Port 0: any free port, found with `docker compose port`. The bind address is left to its default, which the
# tests check is loopback.
ENV = {**{k: v for k, v in os.environ.items() if k != "WORLDSTREAM_BIND_ADDRESS"},
       "COMPOSE_PROJECT_NAME": PROJECT, "WORLDSTREAM_PORT": "0", "WORLDSTREAM_DECODER_METRICS_PORT": "0",
       "WORLDSTREAM_ENCODER_METRICS_PORT": "0", "WORLDSTREAM_GATEWAY_PORT": "0"}


def frames_of(blocks: int) -> int:
    return 9 + 12 * (blocks - 1)  # the tiny configs: 3 latent frames a block, 9 pixel frames first, then 12


def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    run = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), *args], env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    if run.returncode != 0:
        pytest.fail(f"docker compose {' '.join(args)} exited {run.returncode}:\n{run.stderr[-4000:]}\n"
                    f"(services' logs: {LOGS})")
    return run


def timed(what: str, *args: str, timeout: float) -> None:
    started = time.monotonic()
    compose(*args, timeout=timeout)
    print(f"docker compose {what}: {time.monotonic() - started:.0f} s")


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what} (services' logs: {LOGS})")
        time.sleep(0.5)


def container(service: str) -> dict:
    """`docker inspect` of the service's container."""
    cid = compose("ps", "--all", "--quiet", service).stdout.strip()
    return json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True).stdout)[0]


def health(service: str) -> str:
    return container(service)["State"].get("Health", {}).get("Status", "none")


def published(service: str, port: int) -> str:
    """host:port on this machine of the service's `port` (a restarted container may get another)."""
    return compose("port", service, str(port)).stdout.strip()


def metrics(service: str, port: int) -> dict[tuple[str, tuple], float]:
    """The service's Prometheus samples: (name, sorted labels) -> value."""
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{published(service, port)}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def blocks_served(service: str, port: int) -> float:
    return metrics(service, port)[(f"worldstream_{service}_blocks_served_total", ())]


def play_command(blocks: int, out: Path) -> list[str]:
    """The host's client: the .venv this test runs in."""
    return [sys.executable, "-m", "worldstream.client", "play", "--address", published("decoder", 50051),
            "--image", str(IMAGE), "--benchmark", "--blocks", str(blocks), "--out", str(out)]


def play(blocks: int, out: Path) -> str:
    run = subprocess.run(play_command(blocks, out), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"client failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    return run.stdout


def frame_count(path: Path) -> int:
    with av.open(str(path)) as video:
        return sum(1 for _ in video.decode(video=0))


@pytest.fixture(scope="module")
def stack():
    compose("down", "--volumes", "--remove-orphans")  # what an interrupted run left
    timed("build", "build", timeout=1800)
    try:
        timed("up --wait", "up", "--detach", "--no-build", "--wait", "--wait-timeout", "300", timeout=400)
        yield
    finally:
        LOGS.parent.mkdir(parents=True, exist_ok=True)
        LOGS.write_text(compose("logs", "--no-color", "--timestamps").stdout)
        compose("down", "--volumes")


def test_every_healthcheck_passes_and_the_page_is_served(stack):
    assert health("encoder") == "healthy"
    assert health("decoder") == "healthy"  # which needs its encoder (test_a_crashed_encoder...)
    assert health("gateway") == "healthy"  # which needs its decoder
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{published('gateway', 8080)}/", timeout=10) as reply:
        assert reply.status == 200 and b"<html" in reply.read().lower()


def test_containers_run_as_deployed(stack):
    for service, ports in [("encoder", [9102]), ("decoder", [50051, 9101]), ("gateway", [8080])]:
        inspected = container(service)
        assert inspected["Config"]["User"] == "10001:10001", f"{service} runs as root"
        host_config = inspected["HostConfig"]
        assert host_config["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "5", "max-size": "10m"}}
        assert host_config["RestartPolicy"]["Name"] == "unless-stopped"
        for port in ports:
            assert published(service, port).startswith("127.0.0.1:"), f"{service}:{port} is published beyond loopback"
    in_image = compose("exec", "-T", "encoder", "python", "-c",
                       "from importlib.metadata import version; print(version('torch'))").stdout.strip()
    assert in_image == version("torch"), "the image's torch is not the one the tests run on"


def test_a_session_from_the_host_is_counted_by_both_services(stack, tmp_path):
    out = tmp_path / "session.mp4"
    play(2, out)
    assert frame_count(out) == frames_of(2)
    decoder, encoder = metrics("decoder", 9101), metrics("encoder", 9102)
    assert decoder[("worldstream_decoder_blocks_served_total", ())] == 2
    assert encoder[("worldstream_encoder_blocks_served_total", ())] == 2
    for samples, service in [(decoder, "decoder"), (encoder, "encoder")]:
        errors = {labels: value for (name, labels), value in samples.items()
                  if name == f"worldstream_{service}_errors_total"}
        assert errors and not any(errors.values()), f"{service} errors: {errors}"


def test_a_crashed_encoder_is_restarted_and_the_next_session_works(stack, tmp_path):
    before = container("encoder")
    # A crash, as the OOM killer would do it. (`docker kill` is an operator's stop, which restart policies obey.)
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    decoder = published("decoder", 50051)
    wait_for(lambda: serving_status(decoder, service=SESSION_SERVICE) == "NOT_SERVING", 60, "the decoder to report NOT_SERVING")
    wait_for(lambda: container("encoder")["RestartCount"] == before["RestartCount"] + 1, 60,
             "the restart policy to restart the encoder")
    wait_for(lambda: health("encoder") == "healthy", 300, "the restarted encoder to be healthy")
    wait_for(lambda: serving_status(decoder, service=SESSION_SERVICE) == "SERVING", 60, "the decoder to report SERVING again")
    out = tmp_path / "after-restart.mp4"
    play(2, out)
    assert frame_count(out) == frames_of(2)


def test_stop_lets_the_block_in_flight_finish(stack, tmp_path):
    out = tmp_path / "stopped.mp4"
    baseline = blocks_served("decoder", 9101)
    client = subprocess.Popen(play_command(50, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # In lockstep the client keeps an action queued, so from the first block on one is always being made.
        wait_for(lambda: blocks_served("decoder", 9101) > baseline, 120, "the session's first block")
        served_before_stop = blocks_served("decoder", 9101) - baseline
        started = time.monotonic()
        compose("stop", timeout=STOP_GRACE_SECONDS + 30)
        stop_seconds = time.monotonic() - started
        stdout, stderr = client.communicate(timeout=60)
    finally:
        client.kill()
    assert stop_seconds < STOP_GRACE_SECONDS, f"compose stop took {stop_seconds:.0f} s: a service was killed"
    assert client.returncode == 0, f"client failed:\n{stdout}\n{stderr[-3000:]}"
    assert "the server is shutting down" in stdout
    blocks = (frame_count(out) - frames_of(1)) // 12 + 1
    assert frame_count(out) == frames_of(blocks)
    assert blocks > served_before_stop, "the block being made when the stop came was not delivered"
    for service in ("encoder", "decoder"):
        state = container(service)["State"]
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), f"{service}: {state}"
    ended = [json.loads(line) for line in compose("logs", "--no-log-prefix", "decoder").stdout.splitlines()
             if '"session ended"' in line]
    assert ended[-1]["reason"] == "END_REASON_SERVER_SHUTDOWN" and ended[-1]["blocks"] == blocks, ended[-1]
