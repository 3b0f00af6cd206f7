"""The servicer side of opening a stream, shared by the services that serve one stream per session or clip: no
new stream while the models load or the service shuts down, the first request within the idle timeout (and, on
the internal API, of the kind the protocol starts with), at most a configured number of streams at once."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from .aio import Requests, first_request
from .errors import ServiceError
from .metrics import ServiceMetrics


class StreamSlots:
    """Which streams a service admits: none while `loaded` is False or once it terminates, at most `limit` at once
    (each counted in `sessions_active`). `full` is the RESOURCE_EXHAUSTED message, with `{limit}` in it."""

    def __init__(self, service: str, limit: int, metrics: ServiceMetrics, full: str):
        self.service = service
        self.limit = limit
        self.metrics = metrics
        self.full = full
        self.active = 0
        self.terminating = False

    async def terminate(self) -> None:
        """Refuse new streams; running ones continue until the server's grace period ends."""
        self.terminating = True

    def check_open(self, loaded: bool) -> None:
        if not loaded or self.terminating:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"the {self.service} is loading its models or shutting "
                                                            "down; retry shortly")

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold one of the slots while the stream runs; RESOURCE_EXHAUSTED if all are taken."""
        if self.active >= self.limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, self.full.format(limit=self.limit))
        self.active += 1
        self.metrics.sessions_active.inc()
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.sessions_active.dec()


async def opening_request(requests: Requests, timeout: float, metrics: ServiceMetrics, what: str) -> Any:
    """The first request of a stream (`what` names what it should be), counted in `bytes_received`;
    INVALID_ARGUMENT if the stream ends first, DEADLINE_EXCEEDED if none comes within `timeout` seconds."""
    first = await first_request(requests, timeout, what)
    metrics.bytes_received.inc(first.ByteSize())
    return first


def require_kind(first: Any, kind: str) -> Any:
    """The `kind` field of the `request` oneof of an internal stream's first request; INVALID_ARGUMENT if it holds
    another one."""
    if first.WhichOneof("request") != kind:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"the first request must be `{kind}`, got "
                                                             f"`{first.WhichOneof('request') or 'nothing'}`")
    return getattr(first, kind)
