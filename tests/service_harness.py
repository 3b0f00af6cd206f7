"""Run the encoder and decoder services as real subprocesses on 127.0.0.1 for the service tests."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
CONFIG = "mg2/universal_tiny"
# For tests where frame content does not matter: the tiny config with a smaller frame keeps blocks fast.
SMALL_FRAMES = ["--set", "video.height=32", "--set", "video.width=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class ServiceProcess:
    def __init__(self, name: str, module: str, args: list[str], log_path: Path):
        self.name = name
        self.module = module
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   # Same intra-op thread count as the test process, so that CPU kernels reduce in the same order.
                   OMP_NUM_THREADS=str(torch.get_num_threads()))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO, env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The stock grpc.health.v1 Check answer, or None if the server is not reachable."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=timeout).status
        except grpc.RpcError:
            return None


def wait_serving(service: ServiceProcess, address: str, timeout: float = 90.0) -> None:
    def serving() -> bool:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.log()}")
        return health_status(address) == health_pb2.HealthCheckResponse.SERVING
    wait_for(serving, timeout, f"{service.name} at {address} to report SERVING")


@dataclass
class Services:
    encoder: ServiceProcess
    decoder: ServiceProcess
    encoder_port: int
    encoder_metrics_port: int
    decoder_port: int
    decoder_metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.decoder_port}"

    @property
    def encoder_address(self) -> str:
        return f"127.0.0.1:{self.encoder_port}"

    def start_encoder(self, log_dir: Path, extra: list[str] = (), warmup_blocks: int = 0) -> ServiceProcess:
        """(Re)start the encoder on its port."""
        self.encoder = ServiceProcess("encoder", "worldstream.encoder", [
            "--config", CONFIG, "--host", "127.0.0.1", "--port", str(self.encoder_port),
            "--metrics-port", str(self.encoder_metrics_port), "--warmup-blocks", str(warmup_blocks), *extra],
            log_dir / "encoder.log").start()
        wait_serving(self.encoder, self.encoder_address)
        return self.encoder


def start_decoder(log_path: Path, port: int, metrics_port: int, encoder_address: str, args: list[str] = ()
                  ) -> ServiceProcess:
    decoder = ServiceProcess("decoder", "worldstream.decoder", [
        "--config", CONFIG, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
        "--encoder-address", encoder_address, *args], log_path).start()
    wait_serving(decoder, f"127.0.0.1:{port}")
    return decoder


@contextlib.contextmanager
def running_services(log_dir: Path, decoder_args: list[str] = (), encoder_args: list[str] = (),
                     warmup_blocks: int = 0) -> Iterator[Services]:
    """Start an encoder and a decoder on free loopback ports; stop both (SIGTERM) at the end. No warm-up by
    default: it only costs test time."""
    services = Services(None, None, free_port(), free_port(), free_port(), free_port())
    try:
        services.start_encoder(log_dir, list(encoder_args), warmup_blocks)
        services.decoder = start_decoder(log_dir / "decoder.log", services.decoder_port,
                                         services.decoder_metrics_port, services.encoder_address,
                                         [*decoder_args, "--warmup-blocks", str(warmup_blocks)])
        yield services
    finally:
        for service in (services.decoder, services.encoder):
            if service is not None:
                service.stop()


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
