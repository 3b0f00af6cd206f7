"""The one start-up path of both service processes: listen, serve metrics, register health and reflection,
load the models, report SERVING (while a dependency is ready, if the service has one), and stop gracefully on
SIGTERM. The service itself comes in as a `Service` built from its already loaded config."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from .health import SERVING, add_health_and_reflection, follow_dependency, set_serving
from .logs import configure_logging, log_event
from .memory import return_large_buffers
from .metrics import ServiceMetrics
from .security import ServerTLS, add_tls_server_arguments

LOOPBACK = "127.0.0.1"
# Largest request message a service accepts: a 40-megapixel PNG upload fits, anything bigger is refused by
# gRPC itself with RESOURCE_EXHAUSTED before it reaches a handler.
DEFAULT_MAX_RECEIVE_BYTES = 32 << 20
# Largest response message: a raw-RGB block of 12 frames at 352x640 is 8.1 MB.
DEFAULT_MAX_SEND_BYTES = 64 << 20
DEFAULT_GRACE_SECONDS = 10.0
# Bounds on what callers can hold open. A decoder reaches each encoder over one connection carrying all its
# sessions' Encode streams, so the per-connection stream limit must stay above any decoder's --max-sessions.
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_MAX_STREAMS_PER_CONNECTION = 64
DEFAULT_MAX_CALLS = 256


async def _nothing() -> None:
    pass


@dataclass
class Service:
    """What a service plugs into `serve`."""
    name: str  # full name of its gRPC service, for health and reflection
    register: Callable[[grpc.aio.Server], None]  # adds the servicer to the server
    load: Callable[[], Awaitable[None]]  # builds and warms up the models (NOT_SERVING meanwhile)
    terminate: Callable[[], Awaitable[None]]  # after SIGTERM: wind the running streams down
    close: Callable[[], Awaitable[None]] = _nothing  # after the server has stopped
    # A dependency without which calls cannot succeed: SERVING only while this says it is ready.
    dependency_ready: Callable[[], Awaitable[bool]] | None = None
    dependency: str = ""
    dependency_check_interval: float = 2.0
    log_fields: dict[str, Any] = field(default_factory=dict)  # logged once it listens
    interceptors: Sequence[grpc.aio.ServerInterceptor] = ()  # e.g. the encoder's token check
    max_send_bytes: int = DEFAULT_MAX_SEND_BYTES  # largest response message


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every service process takes (next to the config flags and its own)."""
    parser.add_argument("--host", default=LOOPBACK,
                        help="address the gRPC server listens on (default: loopback only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, required=True, help="gRPC port (0 = any free port, logged)")
    parser.add_argument("--metrics-host", default=LOOPBACK, help="address of the Prometheus /metrics endpoint")
    parser.add_argument("--metrics-port", type=int, required=True, help="Prometheus /metrics HTTP port")
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_RECEIVE_BYTES,
                        help="largest request message accepted; larger ones fail with RESOURCE_EXHAUSTED")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open client connections; more are closed as they arrive")
    parser.add_argument("--max-streams-per-connection", type=int, default=DEFAULT_MAX_STREAMS_PER_CONNECTION,
                        help="concurrent calls on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); a client's further "
                             "calls wait. The encoder's must exceed every decoder's --max-sessions")
    parser.add_argument("--max-calls", type=int, default=DEFAULT_MAX_CALLS,
                        help="concurrent calls of all connections together (health checks included); more fail "
                             "with RESOURCE_EXHAUSTED")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_SECONDS,
                        help="seconds running streams get to finish after SIGTERM")
    parser.add_argument("--profile-dir", type=Path, help="write a torch.profiler Chrome trace per session here "
                                                          "(one session at a time is traced)")
    parser.add_argument("--log-level", default=os.environ.get("WORLDSTREAM_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=("json", "kv"), default="json")
    add_tls_server_arguments(parser)


def server_options(max_receive_bytes: int, max_send_bytes: int = DEFAULT_MAX_SEND_BYTES,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS,
                   max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.max_concurrent_streams", max_streams_per_connection),
            # Dead peers are noticed within ~30 s even when a session waits for them.
            ("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1),
            # A connection is closed (GOAWAY) after ~5 min; its running calls go on to their end. Clients then
            # re-resolve, so decoders find encoder pods added to a pool (dns:///, docs/deploy.md).
            ("grpc.max_connection_age_ms", 300_000)]


def serve(process: str, args: argparse.Namespace, build: Callable[[ServiceMetrics], Service]) -> int:
    """Run the service process `process` ("encoder", "decoder") until SIGTERM or SIGINT; `build` makes the
    service around the process's metrics. Returns the exit status."""
    configure_logging(process, args.log_level, args.log_format)
    return_large_buffers()
    asyncio.run(_serve(process, args, build))
    return 0


async def _serve(process: str, args: argparse.Namespace, build: Callable[[ServiceMetrics], Service]) -> None:
    log = logging.getLogger(f"worldstream.{process}")
    tls = ServerTLS.from_args(args)
    metrics = ServiceMetrics(process)
    service = build(metrics)  # checks the service's own flags before anything listens
    server = grpc.aio.server(options=server_options(args.max_message_bytes, service.max_send_bytes,
                                                    args.max_connections, args.max_streams_per_connection),
                             interceptors=service.interceptors, maximum_concurrent_rpcs=args.max_calls)
    service.register(server)
    names = [service.name]
    health = await add_health_and_reflection(server, names)
    address = f"{args.host}:{args.port}"
    port = server.add_secure_port(address, tls.credentials()) if tls else server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"cannot listen on {address} (in use?)")
    metrics_port = metrics.serve(args.metrics_host, args.metrics_port)
    await server.start()
    log_event(log, "listening", host=args.host, port=port, tls=tls is not None,
              mutual_tls=tls is not None and tls.client_ca is not None, metrics_host=args.metrics_host,
              metrics_port=metrics_port, **service.log_fields)
    try:
        await service.load()
    except BaseException:  # stop cleanly, so that the cause is the last thing logged
        await server.stop(None)
        metrics.shutdown()
        raise
    if service.dependency_ready is None:
        await set_serving(health, names, True)
        log_event(log, "serving", port=port)
        readiness = None
    else:  # alive now; ready once the dependency answers
        await health.set("", SERVING)
        readiness = asyncio.create_task(follow_dependency(health, names, service.dependency_ready,
                                                          service.dependency_check_interval, service.dependency, log))

    await _terminated()
    log_event(log, "shutting down", grace_seconds=args.grace)
    if readiness is not None:
        readiness.cancel()
    await health.enter_graceful_shutdown()  # NOT_SERVING from now on
    await service.terminate()
    await server.stop(args.grace)  # refuses new calls; cancels whatever still runs after the grace period
    await service.close()
    metrics.shutdown()
    log_event(log, "stopped")


async def _terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
