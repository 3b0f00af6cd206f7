"""Errors of a call and the gRPC status each one is reported with."""
from __future__ import annotations

import grpc

# Status messages are cut to this many UTF-8 bytes: they travel in a trailer (percent-encoded, and a client refuses
# trailers over 8 KiB by default, which turns the status into RESOURCE_EXHAUSTED) and are logged.
MAX_STATUS_BYTES = 1024
# A caller's input repeated in a message is cut to this many characters.
MAX_ECHO_CHARS = 64


def echo(value: str | bytes) -> str:
    """The caller's `value` for an error message: its repr, cut to MAX_ECHO_CHARS characters."""
    if len(value) <= MAX_ECHO_CHARS:
        return repr(value)
    return f"{value[:MAX_ECHO_CHARS]!r}... ({len(value)} in all)"


def _capped(message: str) -> str:
    encoded = message.encode()
    if len(encoded) <= MAX_STATUS_BYTES:
        return message
    return encoded[:MAX_STATUS_BYTES - 20].decode(errors="ignore") + " [message cut]"


class ServiceError(Exception):
    """An error to report to the caller as a gRPC status with an actionable message (capped in length: it may
    repeat the caller's input)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        message = _capped(message)
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
