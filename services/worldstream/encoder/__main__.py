"""`python -m worldstream.encoder ARGS`, the same as `worldstream serve encoder ARGS`: the condition-encoder service.

    worldstream serve encoder --config mg2/universal_tiny --port 50061 --metrics-port 9461 [--device cpu]

Here: the encoder's own flags and how the service is put together; the rest is `serving.bootstrap`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..serving.bootstrap import Service
from ..serving.metrics import ServiceMetrics
from ..serving.security import SecurityConfigError, TokenAuthInterceptor, is_loopback, read_token


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-streams", type=int, default=64, help="concurrent Encode streams (sessions) served")
    parser.add_argument("--prefetch", type=int, default=2,
                        help="blocks a stream may compute beyond the credits its decoder granted")
    parser.add_argument("--warmup-blocks", type=int, default=2,
                        help="blocks encoded from a grey picture before reporting SERVING (0 = none)")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds a stream waits for its decoder (first request, credit, reads) before it is "
                             "dropped; keep it above the decoders' --idle-timeout")
    parser.add_argument("--token-file", type=Path,
                        help="file holding the internal token (>= 16 characters, e.g. `openssl rand -hex 32`): Encode "
                             "calls without `authorization: Bearer TOKEN` fail with UNAUTHENTICATED. Listening "
                             "beyond loopback needs this or mutual TLS (--tls-client-ca)")


def build(args: argparse.Namespace, cfg, metrics: ServiceMetrics) -> Service:
    # Imported here, not above: building the command line must not load torch (`worldstream health` is quick).
    from worldstream.v1 import encoder_pb2_grpc
    from ..wire import MAX_MESSAGE_BYTES
    from .server import SERVICE_NAME, ConditionEncoderService

    if not (args.token_file or args.tls_client_ca or is_loopback(args.host)):
        raise SecurityConfigError(f"the encoder API is internal: listening on {args.host} needs --token-file or mutual "
                                  "TLS (--tls-cert, --tls-key, --tls-client-ca), or --host 127.0.0.1")
    token = read_token(args.token_file) if args.token_file else None

    def refused() -> None:
        metrics.errors.labels(code="UNAUTHENTICATED").inc()

    if cfg.family == "eden":  # one model family per deployment: frame pairs instead of image conditioning
        from .pairs import PairEncoderService

        service = PairEncoderService(cfg, metrics, max_streams=args.max_streams, idle_timeout=args.idle_timeout,
                                     warm_up=args.warmup_blocks > 0)
    else:
        service = ConditionEncoderService(cfg, metrics, max_streams=args.max_streams, prefetch=args.prefetch,
                                          idle_timeout=args.idle_timeout, warmup_blocks=args.warmup_blocks,
                                          profile_dir=args.profile_dir)
    return Service(name=SERVICE_NAME,
                   register=lambda server: encoder_pb2_grpc.add_ConditionEncoderServiceServicer_to_server(service,
                                                                                                         server),
                   load=service.load, terminate=service.terminate,
                   interceptors=[TokenAuthInterceptor(token, [SERVICE_NAME], refused)]
                   if token else [],
                   max_send_bytes=MAX_MESSAGE_BYTES,  # what a decoder accepts: every tensor goes in chunks
                   log_fields={"config": args.config, "token": token is not None})


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["serve", "encoder", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
