"""The light client and the browser gateway over TLS and mutual TLS: `worldstream-client play` (a real process)
and `worldstream-gateway` (a real process, played over its WebSocket) against real decoders serving TLS (one of
them requiring a client certificate), with certificates made at test time (tests/test_tls.py's)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from service_harness import CONFIG, REPO, SMALL_FRAMES, free_port, wait_for
from test_tls import make_pki
from worldstream.client import ChannelTLS, SessionStream, run_session, start_request
from worldstream.client.__main__ import parse_args
from worldstream.client.tls import SecurityConfigError, channel_tls_from_args
from worldstream.serving.processes import ServiceProcess
from worldstream.v1 import session_pb2

IMAGE = REPO / "client" / "worldstream" / "gateway" / "static" / "demos" / "countryside.png"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    paths = make_pki(tmp_path_factory.mktemp("pki"))
    paths["other"] = make_pki(tmp_path_factory.mktemp("other-pki"), "another CA")  # trusted by nobody here
    return paths


class Decoders:
    """A plaintext encoder on loopback, and two decoders in front of it: one serving TLS, one mutual TLS."""

    def __init__(self, pki: dict[str, Path], log_dir: Path):
        self.encoder_port, self.tls_port, self.mtls_port = free_port(), free_port(), free_port()
        self.tls_address, self.mtls_address = f"127.0.0.1:{self.tls_port}", f"127.0.0.1:{self.mtls_port}"
        common = ["--config", CONFIG, *SMALL_FRAMES, "--warmup-blocks", "0"]
        self.encoder = ServiceProcess("encoder", [*common, "--port", str(self.encoder_port), "--metrics-port",
                                                  str(free_port())], log_dir / "encoder.log")
        decoder = [*common, "--encoder-address", f"127.0.0.1:{self.encoder_port}", "--tls-cert", str(pki["server"]),
                   "--tls-key", str(pki["server_key"])]
        self.tls = ServiceProcess("decoder", [*decoder, "--port", str(self.tls_port), "--metrics-port",
                                              str(free_port())], log_dir / "decoder-tls.log", tls=ChannelTLS(pki["ca"]))
        self.mtls = ServiceProcess("decoder", [*decoder, "--port", str(self.mtls_port), "--metrics-port",
                                               str(free_port()), "--tls-client-ca", str(pki["ca"])],
                                   log_dir / "decoder-mtls.log",
                                   tls=ChannelTLS(pki["ca"], pki["client"], pki["client_key"]))


@pytest.fixture(scope="module")
def decoders(pki, tmp_path_factory) -> Iterator[Decoders]:
    services = Decoders(pki, tmp_path_factory.mktemp("client-tls"))
    try:
        services.encoder.start(services.encoder_port, 90)
        services.tls.start(services.tls_port, 90)
        services.mtls.start(services.mtls_port, 90)
        yield services
    finally:
        for service in (services.mtls, services.tls, services.encoder):
            service.stop()


def play(address: str, out: Path, *tls_flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`worldstream-client play` of one block, as a process."""
    return subprocess.run([sys.executable, "-m", "worldstream.client", "play", "--address", address, "--image",
                           str(IMAGE), "--benchmark", "--blocks", "1", "--out", str(out), *map(str, tls_flags)],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_play_over_tls(decoders, pki, tmp_path):
    run = play(decoders.tls_address, tmp_path / "tls.mp4", "--tls-ca", pki["ca"])
    assert run.returncode == 0, run.stderr
    assert "1 blocks" in run.stdout and (tmp_path / "tls.mp4").stat().st_size > 0


def test_play_over_tls_with_the_system_roots(decoders, pki, tmp_path):
    """--tls trusts the system's roots: here gRPC's default roots file, pointed at the test CA."""
    run = play(decoders.tls_address, tmp_path / "roots.mp4", "--tls",
               env={"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki["ca"])})
    assert run.returncode == 0, run.stderr


def test_play_over_mutual_tls(decoders, pki, tmp_path):
    run = play(decoders.mtls_address, tmp_path / "mtls.mp4", "--tls-ca", pki["ca"], "--tls-cert", pki["client"],
               "--tls-key", pki["client_key"], "--tls-server-name", "localhost")
    assert run.returncode == 0, run.stderr
    assert "1 blocks" in run.stdout


def test_play_with_a_ca_that_does_not_trust_the_server_says_why(decoders, pki, tmp_path):
    run = play(decoders.tls_address, tmp_path / "x.mp4", "--tls-ca", pki["other"]["ca"])
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert f"cannot reach the WorldSessionService server at {decoders.tls_address} over TLS" in run.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in run.stderr, run.stderr


def test_plaintext_play_of_a_tls_decoder_fails_cleanly(decoders, tmp_path):
    run = play(decoders.tls_address, tmp_path / "x.mp4")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert f"cannot reach the WorldSessionService server at {decoders.tls_address} within" in run.stderr


def test_mutual_tls_decoder_refuses_a_client_without_certificate(decoders, pki, tmp_path):
    run = play(decoders.mtls_address, tmp_path / "x.mp4", "--tls-ca", pki["ca"])
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "Socket closed (by a server that wants TLS, or a client certificate?)" in run.stderr


def test_library_session_over_tls_and_a_name_mismatch(decoders, pki):
    forward = [session_pb2.Action(keys=["forward"])]
    result = run_session(decoders.tls_address, IMAGE.read_bytes(), forward, timeout=60,
                         tls=ChannelTLS(pki["ca"], server_name="localhost"))
    assert [block.index for block in result.blocks] == [0]
    with pytest.raises(ConnectionError, match="over TLS within 2 s: .*Hostname Verification Check failed"):
        SessionStream(decoders.tls_address, start_request(IMAGE), connect_timeout=2,
                      tls=ChannelTLS(pki["ca"], server_name="elsewhere.example"))


def test_tls_flags(tmp_path):
    base = ["play", "--image", "x.png", "--benchmark"]
    assert channel_tls_from_args(parse_args(base)) is None
    assert channel_tls_from_args(parse_args([*base, "--tls"])) == ChannelTLS()
    assert channel_tls_from_args(parse_args([*base, "--tls-ca", "ca.pem", "--tls-server-name", "decoder"])) == \
        ChannelTLS(Path("ca.pem"), server_name="decoder")
    with pytest.raises(SecurityConfigError, match="both its certificate and its key"):
        channel_tls_from_args(parse_args([*base, "--tls-cert", "me.pem"]))
    run = play("127.0.0.1:9", tmp_path / "x.mp4", "--tls-ca", tmp_path / "missing.pem")
    assert run.returncode == 1 and "Traceback" not in run.stderr and "cannot read" in run.stderr


# ---- the gateway ---------------------------------------------------------------------------------------------------

def gateway_health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
            return json.load(response)
    except OSError:
        return None


async def first_block_through(url: str) -> list[str]:
    """Starts a session on a tab WebSocket; the types of the JSON messages up to its first block (its first frames
    come ahead of it, and play at once)."""
    import aiohttp

    types = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send_json({"type": "start", "image": {"demo": "countryside"}})
        while not types or types[-1] not in ("block", "error"):
            if (message := await ws.receive(timeout=60)).type == aiohttp.WSMsgType.TEXT:
                types.append(message.json()["type"])
    return types


def test_gateway_plays_through_a_mutual_tls_decoder(decoders, pki, tmp_path):
    pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "worldstream.gateway", "--decoder", decoders.mtls_address,
                                    "--port", str(port), "--tls-ca", str(pki["ca"]), "--tls-cert", str(pki["client"]),
                                    "--tls-key", str(pki["client_key"])], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (gateway_health(url) or {}).get("decoder_status") == "SERVING", 60,
                 "the gateway to reach the decoder over mutual TLS")
        assert asyncio.run(first_block_through(url)) == ["info", "frames", "frames", "block"]
    finally:
        gateway.terminate()
        gateway.wait(15)


def test_gateway_with_a_wrong_ca_reports_the_decoder_unreachable(decoders, pki):
    pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")
    from worldstream.gateway.app import Gateway

    async def status() -> str:
        gateway = Gateway(decoders.tls_address, tls=ChannelTLS(pki["other"]["ca"]))
        await gateway.open(None)
        try:
            return await gateway.decoder_status()
        finally:
            await gateway.channel.close()

    assert asyncio.run(status()) == "UNREACHABLE"


def test_gateway_refuses_unreadable_tls_files(tmp_path):
    pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")
    run = subprocess.run([sys.executable, "-m", "worldstream.gateway", "--tls-ca", str(tmp_path / "missing.pem")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "cannot read" in run.stderr and "Traceback" not in run.stderr
