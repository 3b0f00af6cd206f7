"""Run the decoder service (the public WorldSessionService API):

    python -m worldstream.decoder --config mg2/universal_tiny --port 50051 --metrics-port 9451 \
        --encoder-address 127.0.0.1:50061 --max-sessions 4 --idle-timeout 60 [--profile-dir out/profiles]
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys

import grpc

from ..encoder.client import EncoderClient
from ..service_common import (ServiceMetrics, add_health_and_reflection, base_arg_parser, bind, configure_logging,
                              load_service_config, log_event, mark_serving, serve_until_terminated, server_options)
from worldstream.v1 import session_pb2_grpc
from .server import SERVICE_NAME, WorldSessionService
from .sessions import SessionManager

log = logging.getLogger("worldstream.decoder")


def parse_args(argv: list[str] | None):
    parser = base_arg_parser("python -m worldstream.decoder",
                             "World-model decoder: interactive sessions (actions in, frames out) over gRPC.")
    parser.add_argument("--encoder-address", default=os.environ.get("WORLDSTREAM_ENCODER_ADDRESS"),
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
    args = parser.parse_args(argv)
    if not args.encoder_address:
        parser.error("--encoder-address (or WORLDSTREAM_ENCODER_ADDRESS) is required")
    return args


async def serve(args) -> None:
    cfg = load_service_config(args)
    metrics = ServiceMetrics("decoder")
    metrics_port = metrics.serve(args.host, args.metrics_port)
    encoder = EncoderClient(args.encoder_address, metrics, connect_timeout=args.encoder_connect_timeout,
                            request_timeout=args.encoder_timeout, window=args.encoder_window)
    manager = SessionManager(encoder, metrics, max_sessions=args.max_sessions, idle_timeout=args.idle_timeout,
                             frame_workers=args.frame_workers, profile_dir=args.profile_dir)
    service = WorldSessionService(cfg, manager, metrics, args.warmup_blocks)
    server = grpc.aio.server(options=server_options(args.max_message_bytes))
    session_pb2_grpc.add_WorldSessionServiceServicer_to_server(service, server)
    health = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, args.host, args.port)
    await server.start()
    log_event(log, "listening", port=port, metrics_port=metrics_port, config=args.config,
              encoder_address=args.encoder_address)
    await service.load()
    await mark_serving(health, [SERVICE_NAME])
    log_event(log, "serving", port=port)
    await serve_until_terminated(server, health, args.grace, manager.terminate, log)
    await encoder.close()
    metrics.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("decoder", args.log_level, args.log_format)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
