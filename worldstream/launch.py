"""Run the whole system locally: encoder service + decoder service as separate processes on loopback, then the
client for a default trajectory. This is what `make demo` runs; the end-to-end tests use `ServiceStack` too.

    python -m worldstream.launch --config mg2/universal_tiny --blocks 10 --out out/demo.mp4
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .engine.config import load_config
from .healthcheck import serving_status

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_serving(address: str, timeout: float, process: subprocess.Popen) -> None:
    """Block until the server's grpc.health.v1 check says SERVING (models loaded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service at {address} exited with status {process.returncode} while starting")
        if serving_status(address, timeout=1.0) == "SERVING":
            return
        time.sleep(0.2)
    raise TimeoutError(f"service at {address} did not report SERVING within {timeout:.0f} s")


class ServiceStack:
    """Encoder and decoder services as child processes on free loopback ports (a context manager)."""

    def __init__(self, config: str, overrides: list[str] = (), decoder_args: list[str] = (),
                 encoder_args: list[str] = (), log_dir: Path | None = None, startup_timeout: float = 300.0):
        self.config = config
        self.overrides = list(overrides)
        self.decoder_args, self.encoder_args = list(decoder_args), list(encoder_args)
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.encoder_port, self.decoder_port = free_port(), free_port()
        self.encoder_metrics_port, self.decoder_metrics_port = free_port(), free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.decoder_port}"

    @property
    def encoder_address(self) -> str:
        return f"{LOOPBACK}:{self.encoder_port}"

    def _spawn(self, name: str, port: int, metrics_port: int, extra: list[str]) -> subprocess.Popen:
        cmd = [sys.executable, "-m", f"worldstream.{name}", "--config", self.config, "--host", LOOPBACK,
               "--port", str(port), "--metrics-port", str(metrics_port)]
        for override in self.overrides:
            cmd += ["--set", override]
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd + extra, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        self.processes[name] = proc
        return proc

    def start_encoder(self) -> None:
        proc = self._spawn("encoder", self.encoder_port, self.encoder_metrics_port, self.encoder_args)
        wait_serving(self.encoder_address, self.startup_timeout, proc)

    def start_decoder(self) -> None:
        proc = self._spawn("decoder", self.decoder_port, self.decoder_metrics_port,
                           ["--encoder-address", self.encoder_address, *self.decoder_args])
        wait_serving(self.address, self.startup_timeout, proc)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit status."""
        proc = self.processes.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def __enter__(self) -> "ServiceStack":
        try:
            self.start_encoder()
            self.start_decoder()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worldstream.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--image", type=Path, default=REPO / "assets" / "demo.png")
    parser.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from .client.__main__ import main as client_main

    mode = str(load_config(args.config, args.overrides).mode)
    demo = REPO / "configs" / "trajectories" / f"{mode}_demo.json"
    source = ["--trajectory", str(demo)] if demo.exists() else ["--benchmark"]
    log_dir = args.out.parent / "logs"
    print(f"starting the encoder and decoder services ({args.config}); logs in {log_dir}/", flush=True)
    with ServiceStack(args.config, args.overrides, log_dir=log_dir) as stack:
        print(f"encoder {stack.encoder_address}, decoder {stack.address}", flush=True)
        status = client_main(  # prints where the video is["--address", stack.address, "--image", str(args.image), "--mode", mode,
                              *source, "--blocks", str(args.blocks), "--out", str(args.out), "--overlay"])
    return status


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
