"""Service processes on this machine: `worldstream serve <service>` as child processes on loopback ports, for
`worldstream demo` and the service tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .bootstrap import LOOPBACK
from .health import serving_status
from .security import ChannelTLS


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class ServiceProcess:
    """One service (`worldstream serve <name> ARGS`) as a child process logging to a file; `tls` says how to
    reach it when it serves TLS."""

    def __init__(self, name: str, args: list[str], log_path: Path, tls: ChannelTLS | None = None):
        self.name, self.args, self.log_path, self.tls = name, args, log_path, tls
        self.process: subprocess.Popen | None = None

    def start(self, port: int, startup_timeout: float) -> "ServiceProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "worldstream.cli", "serve", self.name, *self.args],
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=log,
                                            stderr=subprocess.STDOUT)
        self.wait_serving(f"{LOOPBACK}:{port}", startup_timeout)
        return self

    def wait_serving(self, address: str, timeout: float) -> None:
        """Block until the grpc.health.v1 check says SERVING (models loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.process.returncode} while starting; "
                                   f"log:\n{self.log()}")
            if serving_status(address, timeout=1.0, tls=self.tls) == "SERVING":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} at {address} did not report SERVING within {timeout:.0f} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful shutdown), then SIGKILL if it outlives `timeout`; returns the exit status."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class ServiceStack:
    """Encoder and decoder services on free loopback ports (a context manager that stops both). `overrides` are
    config overrides (`KEY=VALUE`) both services get."""

    def __init__(self, config: str, log_dir: Path, overrides: list[str] = (), encoder_args: list[str] = (),
                 decoder_args: list[str] = (), startup_timeout: float = 300.0):
        self.config, self.log_dir, self.startup_timeout = config, log_dir, startup_timeout
        self.overrides = [arg for override in overrides for arg in ("--set", override)]
        self.encoder_args, self.decoder_args = list(encoder_args), list(decoder_args)
        self.encoder_port, self.encoder_metrics_port = free_port(), free_port()
        self.decoder_port, self.decoder_metrics_port = free_port(), free_port()
        self.encoder: ServiceProcess | None = None
        self.decoder: ServiceProcess | None = None

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.decoder_port}"

    @property
    def encoder_address(self) -> str:
        return f"{LOOPBACK}:{self.encoder_port}"

    def service_args(self, port: int, metrics_port: int) -> list[str]:
        return ["--config", self.config, *self.overrides, "--port", str(port), "--metrics-port", str(metrics_port)]

    def start_encoder(self, extra: list[str] = ()) -> ServiceProcess:
        """(Re)start the encoder on its port."""
        args = self.service_args(self.encoder_port, self.encoder_metrics_port) + self.encoder_args + list(extra)
        self.encoder = ServiceProcess("encoder", args, self.log_dir / "encoder.log")
        return self.encoder.start(self.encoder_port, self.startup_timeout)

    def start_decoder(self, extra: list[str] = ()) -> ServiceProcess:
        args = self.service_args(self.decoder_port, self.decoder_metrics_port) + [
            "--encoder-address", self.encoder_address, *self.decoder_args, *extra]
        self.decoder = ServiceProcess("decoder", args, self.log_dir / "decoder.log")
        return self.decoder.start(self.decoder_port, self.startup_timeout)

    def __enter__(self) -> "ServiceStack":
        try:
            self.start_encoder()
            self.start_decoder()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for service in (self.decoder, self.encoder):
            if service is not None:
                service.stop()

    def __exit__(self, *exc) -> None:
        self.close()
