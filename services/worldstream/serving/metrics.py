"""Prometheus metrics of a service process, in their own registry, served over HTTP by a fixed set of threads."""
from __future__ import annotations

import concurrent.futures
import http.server
import socket
import threading

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import MetricsHandler

_REPORTED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL)
# The /metrics server: requests handled at once, connections that may wait for a worker (more are closed as they
# arrive), and the seconds a connection gets to send its request.
METRICS_WORKERS = 4
METRICS_QUEUED_CONNECTIONS = 16
METRICS_REQUEST_TIMEOUT = 5.0
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServiceMetrics:
    """The Prometheus metrics of one service process, named `worldstream_<service>_<metric>`."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        common = {"namespace": "worldstream", "subsystem": service, "registry": self.registry}
        self.sessions_active = Gauge("sessions_active", "Sessions (streams) holding state right now", **common)
        self.blocks_served = Counter("blocks_served", "Blocks delivered to callers", **common)
        self.block_stage_seconds = Histogram("block_stage_seconds", "Duration of each stage of a block",
                                             ["stage"], buckets=_LATENCY_BUCKETS, **common)
        self.prompt_switches = Counter(
            "prompt_switches", "Prompt switches that took effect (LongLive sessions, decoder only); one made "
            "once frames are cached (after block 0, or with a continued clip) re-caches the attention window: the "
            "\"recache\" stage of block_stage_seconds", **common)
        self.time_to_first_frame_seconds = Histogram(
            "time_to_first_frame_seconds", "From the start request to the first frames handed to the transport",
            buckets=_LATENCY_BUCKETS, **common)
        self.bytes_sent = Counter("bytes_sent", "Serialized bytes of response messages", **common)
        self.bytes_received = Counter("bytes_received", "Serialized bytes of request messages", **common)
        self.encoder_request_seconds = Histogram(
            "encoder_request_seconds", "Latency of condition-encoder requests (open = an image to its CLIP tokens "
            "or a prompt to its text context, block = one cond_concat, video = a clip decoded, VAE-encoded and sent "
            "as its conditioning latents: encoder only)", ["request"], buckets=_LATENCY_BUCKETS, **common)
        self.errors = Counter("errors", "Calls that ended with a non-OK gRPC status", ["code"], **common)
        for code in _REPORTED_CODES:  # export zeros, so that rates and alerts work before the first error
            self.errors.labels(code=code.name)
        self._http_server = None

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP (accepting on a daemon thread); returns the bound port."""
        handler = type("Handler", (MetricsHandler.factory(self.registry),), {"timeout": METRICS_REQUEST_TIMEOUT})
        self._http_server = BoundedHTTPServer((host, port), handler, METRICS_WORKERS, METRICS_QUEUED_CONNECTIONS)
        threading.Thread(target=self._http_server.serve_forever, name="metrics-accept", daemon=True).start()
        return self._http_server.server_port

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None


class BoundedHTTPServer(http.server.HTTPServer):
    """An HTTP server whose connections are handled by `workers` threads, with at most `queued` more waiting.
    (prometheus_client's own server is a ThreadingHTTPServer: one thread per open connection, without bound.)
    Connections beyond that are closed at once; a handler's `timeout` bounds how long a silent one holds a worker."""
    request_queue_size = 128  # the listen backlog: a burst of connections is accepted (and refused) at once

    def __init__(self, address: tuple[str, int], handler: type, workers: int, queued: int):
        self.address_family = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="metrics")
        self._slots = threading.BoundedSemaphore(workers + queued)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self._pool.submit(self._handle, request, client_address)

    def _handle(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError:  # the client went away
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)
