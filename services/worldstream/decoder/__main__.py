"""`python -m worldstream.decoder ARGS`, the same as `worldstream serve decoder ARGS`: the decoder service (the
public WorldSessionService API).

    worldstream serve decoder --config mg2/universal_tiny --port 50051 --metrics-port 9451 \
        --encoder-address 127.0.0.1:50061 --max-sessions 4 --idle-timeout 60 [--profile-dir out/profiles]

Here: the decoder's own flags and how the service is put together; the rest is `serving.bootstrap`. The decoder
reports SERVING only while its encoder does (checked every --encoder-check-interval seconds).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..serving.bootstrap import Service
from ..serving.metrics import ServiceMetrics
from ..serving.security import add_client_security_arguments, client_security_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    encoder_address = os.environ.get("WORLDSTREAM_ENCODER_ADDRESS")
    parser.add_argument("--encoder-address", default=encoder_address, required=not encoder_address,
                        help="host:port of the encoder service (default: $WORLDSTREAM_ENCODER_ADDRESS)")
    parser.add_argument("--max-sessions", type=int, default=4,
                        help="concurrent sessions; more are refused with RESOURCE_EXHAUSTED")
    parser.add_argument("--idle-timeout", type=float, default=60.0,
                        help="seconds a session waits for the client's next message (LOCKSTEP) or reads "
                             "before it is ended")
    parser.add_argument("--frame-workers", type=int, default=2, help="threads encoding frames (JPEG) for all sessions")
    parser.add_argument("--warmup-blocks", type=int, default=None,
                        help="blocks of a throw-away session run before reporting SERVING (default: every shape "
                             "the compiled block loop takes; 0 = none)")
    parser.add_argument("--encoder-window", type=int, default=2,
                        help="blocks of conditioning the encoder may send ahead of the block loop (credits)")
    parser.add_argument("--encoder-connect-timeout", type=float, default=5.0,
                        help="seconds a new session waits for an unreachable encoder before UNAVAILABLE")
    parser.add_argument("--encoder-timeout", type=float, default=60.0,
                        help="seconds to wait for any one answer of the encoder")
    parser.add_argument("--encoder-check-interval", type=float, default=2.0,
                        help="seconds between health checks of the encoder; this service reports SERVING only "
                             "while the encoder does")
    add_client_security_arguments(parser, "encoder-", "the encoder")


def build(args: argparse.Namespace, cfg, metrics: ServiceMetrics) -> Service:
    if cfg.family == "eden":  # one model family per deployment: frame interpolation instead of world sessions
        from .interpolation import build_service

        return build_service(args, cfg, metrics)
    # Imported here, not above: building the command line must not load torch (`worldstream health` is quick).
    from ..encoder.client import EncoderClient
    from .server import SERVICE_NAME, WorldSessionService, add_to_server
    from .sessions import SessionManager

    encoder = EncoderClient(args.encoder_address, metrics, connect_timeout=args.encoder_connect_timeout,
                            request_timeout=args.encoder_timeout, window=args.encoder_window,
                            **client_security_from_args(args, "encoder-"))
    manager = SessionManager(encoder, metrics, max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                             frame_workers=args.frame_workers, profile_dir=args.profile_dir)
    service = WorldSessionService(cfg, manager, metrics, args.warmup_blocks)
    return Service(name=SERVICE_NAME,
                   register=lambda server: add_to_server(service, server),
                   load=service.load, terminate=manager.terminate, close=encoder.close,
                   dependency_ready=lambda: encoder.serving(timeout=args.encoder_check_interval),
                   dependency=f"encoder at {args.encoder_address}",
                   dependency_check_interval=args.encoder_check_interval,
                   log_fields={"config": args.config, "encoder_address": args.encoder_address})


def main(argv: list[str] | None = None) -> int:
    from ..cli import main as cli_main

    return cli_main(["serve", "decoder", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
