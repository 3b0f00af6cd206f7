"""Prometheus metrics of a service process, in their own registry, served over HTTP."""
from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_REPORTED_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                   grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                   grpc.StatusCode.INTERNAL)
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
