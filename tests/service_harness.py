"""Run the encoder and decoder services as real subprocesses on 127.0.0.1 for the service tests
(the process plumbing is `worldstream demo`'s: `worldstream.serving.processes.ServiceStack`)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from worldstream.engine.config import load_config
from worldstream.engine.encoder import EncoderModels
from worldstream.engine.generator import DecoderModels
from worldstream.media import load_image
from worldstream.client.session import MAX_RECEIVE_BYTES
from worldstream.serving.processes import ServiceProcess, ServiceStack, free_port
from worldstream.v1 import session_pb2, session_pb2_grpc

CONFIG = "mg2/universal_tiny"
# For tests where frame content does not matter: the tiny config with a smaller frame keeps blocks fast.
SMALL_FRAMES = ["--set", "video.height=32", "--set", "video.width=64"]
# Services use the test process's intra-op thread count, so that CPU kernels reduce in the same order and
# streamed frames equal in-process ones bit for bit.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def png_bytes(seed: int = 0, size: tuple[int, int] = (120, 200)) -> bytes:
    """A deterministic test picture (smooth gradients plus noise), PNG-encoded."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def engine_frames(image: bytes, actions, seed: int, overrides: list[str] = ()) -> list[np.ndarray]:
    """The blocks the engine produces in one process for the services' config (`overrides`: the services'
    `--set` arguments), image, seed and actions: what a session through both services must equal."""
    cfg = load_config(CONFIG, [value for value in overrides if value != "--set"])
    conditioning = EncoderModels.build(cfg).open_session(load_image(image))
    session = DecoderModels.build(cfg).open_session(conditioning.visual_context, seed=seed, max_blocks=len(actions))
    try:
        return [session.run_block(conditioning.next_block(), action).frames.numpy() for action in actions]
    finally:
        session.close()


def call_status(address: str, requests: list[session_pb2.SessionRequest], timeout: float = 120) -> grpc.RpcError:
    """Send `requests` to the decoder's Session (then half-close) and return the error the call must end with."""
    with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)]) as channel:
        responses = session_pb2_grpc.WorldSessionServiceStub(channel).Session(iter(requests), timeout=timeout)
        with pytest.raises(grpc.RpcError) as caught:
            for _ in responses:
                pass
    return caught.value


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The stock grpc.health.v1 Check answer, or None if the server is not reachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout).status
        except grpc.RpcError:
            return None


@contextlib.contextmanager
def running_services(log_dir: Path, decoder_args: list[str] = (), encoder_args: list[str] = (),
                     warmup_blocks: int = 0, config: str = CONFIG) -> Iterator[ServiceStack]:
    """Start an encoder and a decoder of `config` on free loopback ports; stop both (SIGTERM) at the end. No
    warm-up by default: it only costs test time."""
    warmup = ["--warmup-blocks", str(warmup_blocks)]
    with ServiceStack(config, log_dir, encoder_args=[*encoder_args, *warmup],
                      decoder_args=[*decoder_args, *warmup], startup_timeout=90.0) as services:
        yield services


def start_decoder(log_path: Path, port: int, metrics_port: int, encoder_address: str, args: list[str] = ()
                  ) -> ServiceProcess:
    """A second decoder against a running encoder."""
    return ServiceProcess("decoder", [
        "--config", CONFIG, "--port", str(port), "--metrics-port", str(metrics_port),
        "--encoder-address", encoder_address, *args], log_path).start(port, 90.0)


def metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric_value(port: int, sample_name: str, labels: dict[str, str] | None = None) -> float | None:
    """Value of one sample of a service's /metrics, or None if absent."""
    for family in text_string_to_metric_families(metrics_text(port)):
        for sample in family.samples:
            if sample.name == sample_name and (labels is None or all(sample.labels.get(k) == v
                                                                     for k, v in labels.items())):
                return sample.value
    return None


class GatewayProcess:
    """`python -m worldstream.gateway` as a child process on a free loopback port."""

    def __init__(self, decoder: str, log_path: Path, args: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "worldstream.gateway", "--decoder", decoder, "--port", str(self.port), *args],
                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            wait_for(self.healthy, 60, "the gateway's /health to say ok")
        except BaseException:
            self.stop()
            raise

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=3) as response:
                return json.load(response)["status"] == "ok"
        except (urllib.error.URLError, ConnectionError):
            return False

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return metric_value(self.port, name, labels)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
