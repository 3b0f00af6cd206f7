"""Code shared by the encoder and decoder gRPC services: command line and config, structured logs, Prometheus
metrics, gRPC status mapping, health + reflection, worker threads, and serving until SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from omegaconf import DictConfig
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .engine.config import load_config

T = TypeVar("T")

# Largest request message a service accepts: a 40-megapixel PNG upload fits, anything bigger is refused by
# gRPC itself with RESOURCE_EXHAUSTED before it reaches a handler.
DEFAULT_MAX_RECEIVE_BYTES = 32 << 20
# Largest response message: a raw-RGB block of 12 frames at 352x640 is 8.1 MB.
DEFAULT_MAX_SEND_BYTES = 64 << 20
DEFAULT_GRACE_SECONDS = 10.0


# ---- errors -----------------------------------------------------------------------------------------------

class ServiceError(Exception):
    """An error to report to the caller as a gRPC status with an actionable message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class ClientGone(Exception):
    """The caller cancelled or disconnected; nothing can be sent to it any more."""


def status_from_rpc_error(error: grpc.RpcError, what: str) -> ServiceError:
    """Map an error of a call to another service onto the status this service reports: the caller's mistakes
    (INVALID_ARGUMENT) and overload (RESOURCE_EXHAUSTED) keep their code, a dependency that refuses our
    configuration (FAILED_PRECONDITION) is this deployment's fault (INTERNAL), anything else is UNAVAILABLE,
    which tells the caller to retry."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return ServiceError(code, f"{what}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return ServiceError(grpc.StatusCode.INTERNAL, f"{what} refuses this deployment's configuration: {details}")
    return ServiceError(grpc.StatusCode.UNAVAILABLE, f"{what} failed ({code.name}: {details}); retry later")


# ---- structured logs ----------------------------------------------------------------------------------------

class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, logger, event, plus the record's `fields`."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class KeyValueFormatter(JsonLineFormatter):
    """`ts=... level=... event="..." key=value ...` lines, for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        entry = json.loads(super().format(record))
        return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}"
                        for k, v in entry.items())


def configure_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(service) if fmt == "json" else KeyValueFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with structured `fields` (they become JSON keys)."""
    logger.log(level, event, extra={"fields": fields})


# ---- metrics ------------------------------------------------------------------------------------------------

_REPORTED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.INTERNAL)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The Prometheus metrics of one service process, in their own registry, named
    `worldstream_<service>_<metric>`."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        common = {"namespace": "worldstream", "subsystem": service, "registry": self.registry}
        self.sessions_active = Gauge("sessions_active", "Sessions (streams) holding state right now", **common)
        self.blocks_served = Counter("blocks_served", "Blocks delivered to callers", **common)
        self.block_stage_seconds = Histogram("block_stage_seconds", "Duration of each stage of a block",
                                             ["stage"], buckets=_LATENCY_BUCKETS, **common)
        self.time_to_first_frame_seconds = Histogram(
            "time_to_first_frame_seconds", "From the start request to the first block handed to the transport",
            buckets=_LATENCY_BUCKETS, **common)
        self.bytes_sent = Counter("bytes_sent", "Serialized bytes of response messages", **common)
        self.bytes_received = Counter("bytes_received", "Serialized bytes of request messages", **common)
        self.encoder_request_seconds = Histogram(
            "encoder_request_seconds", "Latency of condition-encoder requests (open = image to CLIP tokens, "
            "block = one cond_concat)", ["request"], buckets=_LATENCY_BUCKETS, **common)
        self.errors = Counter("errors", "Calls that ended with a non-OK gRPC status", ["code"], **common)
        for code in _REPORTED_CODES:  # export zeros, so that rates and alerts work before the first error
            self.errors.labels(code=code.name)
        self._http_server = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a daemon thread; returns the bound port."""
        self._http_server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http_server.server_port

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server = None


# ---- running a call -------------------------------------------------------------------------------------------

async def run_call(handler: Awaitable[None], context: grpc.aio.ServicerContext, metrics: ServiceMetrics,
                   logger: logging.Logger, call: str) -> None:
    """Run one RPC body: map ServiceError to its status, count failures by code, never let a bug of one call
    escape as anything but INTERNAL. Cancellation (client gone) is counted and propagated."""
    try:
        await handler
    except ServiceError as e:
        if context.cancelled():  # the error is a consequence of the caller leaving
            metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
            log_event(logger, "call cancelled", call=call, detail=e.message)
            return
        metrics.errors.labels(code=e.code.name).inc()
        log_event(logger, "call failed", logging.WARNING, call=call, code=e.code.name, detail=e.message)
        await context.abort(e.code, e.message)
    except ClientGone:
        metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
        log_event(logger, "call cancelled", call=call)
    except asyncio.CancelledError:
        metrics.errors.labels(code=grpc.StatusCode.CANCELLED.name).inc()
        log_event(logger, "call cancelled", call=call)
        raise
    except grpc.aio.AbortError:
        raise
    except Exception as e:  # a bug: report it without taking down other sessions
        metrics.errors.labels(code=grpc.StatusCode.INTERNAL.name).inc()
        logger.exception("call crashed", extra={"fields": {"call": call}})
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {call}: {type(e).__name__}: {e}")


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """Await with a time limit (asyncio.TimeoutError when it passes). Unlike asyncio.wait_for before Python 3.12,
    a cancellation of the caller is never swallowed when the awaited operation completes at the same moment."""
    task = asyncio.ensure_future(awaitable)
    task.add_done_callback(_discard_result)  # an abandoned task's error is not worth a warning
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    finally:
        task.cancel()  # no-op when done
    if not done:
        raise asyncio.TimeoutError
    return task.result()


def _discard_result(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved


async def write_with_timeout(context: grpc.aio.ServicerContext, message: Any, metrics: ServiceMetrics,
                             timeout: float) -> None:
    """Write one response; a caller that reads nothing for `timeout` seconds is dropped."""
    if context.cancelled():
        raise ClientGone
    try:
        await within(context.write(message), timeout)
    except asyncio.TimeoutError:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"the caller read no response for {timeout:g} s; dropping the stream") from None
    except Exception as e:  # grpc raises internal error types when the call died under the write
        if context.cancelled() or context.done():
            raise ClientGone from None
        raise ServiceError(grpc.StatusCode.INTERNAL, f"writing a response failed: {e}") from None
    metrics.bytes_sent.inc(message.ByteSize())


async def run_together(main: Awaitable[T], *helpers: Awaitable[None]) -> T:
    """Run `main` alongside helper coroutines (readers, producers). The first helper to fail cancels `main` and
    its error is raised; a helper that returns normally just stops. Everything left is cancelled when `main`
    ends or when the caller is cancelled."""
    main_task = asyncio.ensure_future(main)
    helper_tasks = [asyncio.ensure_future(h) for h in helpers]
    pending: set[asyncio.Future] = {main_task, *helper_tasks}
    try:
        while True:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if main_task in done:
                return main_task.result()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
    finally:
        for task in (main_task, *helper_tasks):
            task.cancel()
        await asyncio.gather(main_task, *helper_tasks, return_exceptions=True)


async def first_request(requests: Any, timeout: float, what: str) -> Any:
    """The first message of a request stream; INVALID_ARGUMENT if the stream ends first, DEADLINE_EXCEEDED if
    nothing comes within `timeout` seconds."""
    try:
        return await within(anext(requests), timeout)
    except StopAsyncIteration:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the stream closed before its first message ({what})"
                           ) from None
    except asyncio.TimeoutError:
        raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"no first message ({what}) within {timeout:g} s") from None


class WorkerLane:
    """A dedicated thread for the sequential work of one stream (device work, profiling), so that it never runs
    on the event loop."""

    def __init__(self, name: str):
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    def close(self, finalizer: Callable[[], None]) -> asyncio.Future:
        """Queue `finalizer` after the work already queued and let the thread end. Synchronous, so that a second
        cancellation of the caller cannot skip it; the returned future completes once `finalizer` has run."""
        done = self._executor.submit(finalizer)
        self._executor.shutdown(wait=False)
        return asyncio.wrap_future(done)


class StreamProfiler:
    """torch.profiler Chrome traces, one file per stream, into `directory` (None: off). The profiler is
    process-wide and records the thread that starts it, so it is started and stopped on the stream's WorkerLane
    and only one stream at a time is traced."""

    def __init__(self, directory: Path | None, logger: logging.Logger):
        self.directory = directory
        self.logger = logger
        self._lock = threading.Lock()

    def start(self, stream_id: str) -> torch.profiler.profile | None:
        if self.directory is None:
            return None
        if not self._lock.acquire(blocking=False):
            log_event(self.logger, "not profiled: another stream holds the profiler", stream_id=stream_id)
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
        return profiler

    def finish(self, profiler: torch.profiler.profile | None, stream_id: str) -> None:
        if profiler is None:
            return
        try:
            profiler.__exit__(None, None, None)
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"{stream_id}.json"
            profiler.export_chrome_trace(str(path))
            log_event(self.logger, "profile written", stream_id=stream_id, path=str(path))
        finally:
            self._lock.release()


# ---- server plumbing --------------------------------------------------------------------------------------------

def server_options(max_receive_bytes: int, max_send_bytes: int = DEFAULT_MAX_SEND_BYTES) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            # Dead peers are noticed within ~30 s even when a session waits for them.
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]


async def add_health_and_reflection(server: grpc.aio.Server, service_names: Sequence[str]
                                    ) -> health_aio.HealthServicer:
    """Register grpc.health.v1 (NOT_SERVING until `mark_serving`) and server reflection."""
    health = health_aio.HealthServicer()
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server)
    return health


async def mark_serving(health: health_aio.HealthServicer, service_names: Sequence[str]) -> None:
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve_until_terminated(server: grpc.aio.Server, health: health_aio.HealthServicer, grace: float,
                                 on_terminate: Callable[[], Awaitable[None]], logger: logging.Logger) -> None:
    """Wait for SIGTERM or SIGINT, then shut down gracefully: report NOT_SERVING, refuse new calls, let
    `on_terminate` wind the running streams down, and cancel whatever is still running after `grace`."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log_event(logger, "shutting down", grace_seconds=grace)
    await health.enter_graceful_shutdown()
    await on_terminate()
    await server.stop(grace)
    log_event(logger, "stopped")


def bind(server: grpc.aio.Server, host: str, port: int) -> int:
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise SystemExit(f"cannot listen on {host}:{port} (in use?)")
    return bound


# ---- command line and config --------------------------------------------------------------------------------

def base_arg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", default="mg2/universal_tiny", help="config name under configs/ or a .yaml path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set limits.max_blocks=100 (repeatable)")
    parser.add_argument("--device", help="device override, e.g. cpu or cuda:1 (default: the config's)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (gRPC and metrics)")
    parser.add_argument("--port", type=int, required=True, help="gRPC port (0 = any free port, logged)")
    parser.add_argument("--metrics-port", type=int, required=True, help="Prometheus /metrics HTTP port")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_RECEIVE_BYTES,
                        help="largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS,
                        help="seconds running streams get to finish after SIGTERM")
    parser.add_argument("--profile-dir", type=Path, help="write a torch.profiler Chrome trace per session here "
                                                          "(one session at a time is traced)")
    parser.add_argument("--log-level", default=os.environ.get("WORLDSTREAM_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=("json", "kv"), default="json")
    return parser


def load_service_config(args: argparse.Namespace) -> DictConfig:
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    return load_config(args.config, overrides)


