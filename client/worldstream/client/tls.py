"""TLS and mutual TLS of the channels a caller opens: to the decoder (the client, the gateway, `worldstream
health`) and, in the services, to the encoder. Light (grpc only), so that the services share it.

Certificates and keys come from files, never from the command line, where `ps` would show them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

# Any server answers it (UNIMPLEMENTED without a health service): only used to learn why a channel is not connected.
_PROBE_METHOD = "/grpc.health.v1.Health/Check"


class SecurityConfigError(ValueError):
    """Security flags that do not fit together, or files that cannot be read (reported before anything connects)."""


def read_file(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read {path}: {e.strerror}") from None


@dataclass(frozen=True)
class ChannelTLS:
    """How a caller reaches a TLS server: the CA its certificate chains to (None: the system's roots), the
    caller's own certificate and key for mutual TLS, and the name to expect in the server's certificate
    when it differs from the target's host name."""
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("a client certificate needs both its certificate and its key file")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=read_file(self.ca), private_key=read_file(self.key),
                                            certificate_chain=read_file(self.cert))

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def add_tls_channel_arguments(parser: argparse.ArgumentParser, prefix: str = "", what: str = "the server") -> None:
    """--{prefix}tls, --{prefix}tls-ca, --{prefix}tls-cert, --{prefix}tls-key, --{prefix}tls-server-name; each
    of them turns TLS on."""
    parser.add_argument(f"--{prefix}tls", action="store_true",
                        help=f"reach {what} over TLS, trusting the system's CA roots (or --{prefix}tls-ca)")
    parser.add_argument(f"--{prefix}tls-ca", type=Path,
                        help=f"reach {what} over TLS, trusting this PEM CA bundle")
    parser.add_argument(f"--{prefix}tls-cert", type=Path,
                        help=f"client certificate (PEM) presented to {what} for mutual TLS (with the key); "
                             "implies TLS")
    parser.add_argument(f"--{prefix}tls-key", type=Path, help="PEM private key of the client certificate")
    parser.add_argument(f"--{prefix}tls-server-name",
                        help=f"name expected in {what}'s certificate, when it differs from the address's host")


def channel_tls_from_args(args: argparse.Namespace, prefix: str = "") -> ChannelTLS | None:
    """The ChannelTLS of flags added by `add_tls_channel_arguments`, or None for a plaintext channel."""
    attr = prefix.replace("-", "_")
    ca, cert, key, name = (getattr(args, f"{attr}tls_{field}") for field in ("ca", "cert", "key", "server_name"))
    if not (getattr(args, f"{attr}tls") or ca or cert or key or name):
        return None
    return ChannelTLS(ca, cert, key, name)


def open_channel(address: str, tls: ChannelTLS | None, options: list[tuple[str, object]] = (), *, aio: bool = True):
    """A gRPC channel to `address` (grpc.aio when `aio`, else blocking): over TLS when `tls` is given."""
    grpc_module = grpc.aio if aio else grpc
    if tls is None:
        return grpc_module.insecure_channel(address, options=list(options))
    return grpc_module.secure_channel(address, tls.credentials(), options=[*options, *tls.channel_options()])


def wait_connected(channel: grpc.Channel, what: str, timeout: float) -> None:
    """Wait up to `timeout` seconds for a blocking channel to connect; else ConnectionError with gRPC's last
    connection error (refused, or why the TLS handshake failed: a CA that does not trust the server, a name
    that does not match, no client certificate ...)."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        return
    except grpc.FutureTimeoutError:
        pass
    try:  # a call that does not wait for a connection fails at once, with the reason
        channel.unary_unary(_PROBE_METHOD)(b"", timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            reason = e.details()
            if reason.endswith("Socket closed"):  # all a caller learns of a handshake that the server refused
                reason += " (by a server that wants TLS, or a client certificate?)"
            raise ConnectionError(f"cannot reach {what} within {timeout:g} s: {reason}") from None
    # any other answer came from a server: connected after all
