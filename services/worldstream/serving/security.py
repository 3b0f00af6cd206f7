"""Transport security of the services: TLS and mutual TLS for servers (for channels: worldstream.client.tls), and
the shared token that callers of the internal encoder API present (`authorization: Bearer TOKEN`).

Certificates, keys and tokens come from files (Kubernetes Secrets and compose secrets are mounted as files),
never from the command line, where `ps` would show them.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import grpc

# The channel side (ChannelTLS, its flags, open_channel) is the client distribution's, shared with the services.
from worldstream.client.tls import (ChannelTLS, SecurityConfigError, add_tls_channel_arguments,  # noqa: F401
                                    channel_tls_from_args, open_channel, read_file)

MIN_TOKEN_CHARS = 16
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate chain and key (PEM), and the CA that client certificates must chain to when
    mutual TLS is on."""
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerTLS | None:
        if not (args.tls_cert or args.tls_key or args.tls_client_ca):
            return None
        if not (args.tls_cert and args.tls_key):
            raise SecurityConfigError("TLS needs both --tls-cert and --tls-key (--tls-client-ca adds mutual TLS)")
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(read_file(self.key), read_file(self.cert))],
                                           root_certificates=read_file(self.client_ca),
                                           require_client_auth=self.client_ca is not None)


def read_token(path: Path) -> str:
    """The shared token in `path` (surrounding whitespace ignored): at least MIN_TOKEN_CHARS printable ASCII
    characters, e.g. `openssl rand -hex 32`."""
    token = read_file(path).decode(errors="replace").strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise SecurityConfigError(f"the token in {path} must be at least {MIN_TOKEN_CHARS} printable ASCII "
                                  "characters without spaces (e.g. `openssl rand -hex 32 > FILE`)")
    return token


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that presents `token` (nothing when there is none)."""
    return () if token is None else ((AUTHORIZATION, f"Bearer {token}"),)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `services` (full gRPC service names) that do not present the token, with
    UNAUTHENTICATED and before any request message is read. Other services (health, reflection) stay open, so
    that probes need no secret."""

    def __init__(self, token: str, services: Collection[str], on_refused: Callable[[], None] = lambda: None):
        self._expected = f"Bearer {token}".encode()
        self._services = frozenset(services)
        self._on_refused = on_refused

    def _authorized(self, metadata) -> bool:
        presented = [value for key, value in (metadata or ()) if key == AUTHORIZATION]
        # compare_digest: the time taken says nothing about how much of the token was right.
        return len(presented) == 1 and hmac.compare_digest(str(presented[0]).encode(), self._expected)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        service = details.method.lstrip("/").split("/")[0]
        if handler is None or service not in self._services or self._authorized(details.invocation_metadata):
            return handler
        self._on_refused()
        return _refusing(handler)


_REFUSAL = "this API needs the internal token: send `authorization: Bearer TOKEN` metadata (the decoder's " \
           "--encoder-token-file)"


async def _refuse(request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _REFUSAL)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with UNAUTHENTICATED."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
            }[(handler.request_streaming, handler.response_streaming)]
    return make(_refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def add_tls_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="serve TLS with this PEM certificate chain (with --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", type=Path,
                        help="mutual TLS: require a client certificate that chains to this PEM CA bundle")


def add_client_security_arguments(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    """A service's flags for reaching a secured server: TLS (`add_tls_channel_arguments`) and
    --{prefix}token-file."""
    add_tls_channel_arguments(parser, prefix, what)
    parser.add_argument(f"--{prefix}token-file", type=Path,
                        help=f"file holding the token {what} requires (its --token-file), sent with every call")


def client_security_from_args(args: argparse.Namespace, prefix: str) -> dict:
    """`tls` and `token` (keyword arguments of a client) from the flags of `add_client_security_arguments`."""
    token_file = getattr(args, f"{prefix.replace('-', '_')}token_file")
    return {"tls": channel_tls_from_args(args, prefix), "token": read_token(token_file) if token_file else None}
