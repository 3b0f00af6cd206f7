"""Run the condition-encoder service:

    python -m worldstream.encoder --config mg2/universal_tiny --port 50061 --metrics-port 9461 [--device cpu]
"""
from __future__ import annotations

import asyncio
import logging
import sys

import grpc

from ..service_common import (ServiceMetrics, add_health_and_reflection, base_arg_parser, bind, configure_logging,
                              load_service_config, log_event, mark_serving, serve_until_terminated, server_options)
from worldstream.v1 import encoder_pb2_grpc
from .server import SERVICE_NAME, ConditionEncoderService

log = logging.getLogger("worldstream.encoder")


def parse_args(argv: list[str] | None):
    parser = base_arg_parser("python -m worldstream.encoder",
                             "Condition encoder: image -> CLIP tokens and per-block cond_concat, streamed to decoders.")
    parser.add_argument("--max-streams", type=int, default=64, help="concurrent Encode streams (sessions) served")
    parser.add_argument("--prefetch", type=int, default=2,
                        help="blocks a stream may compute beyond the credits its decoder granted")
    parser.add_argument("--warmup-blocks", type=int, default=2,
                        help="blocks encoded from a grey picture before reporting SERVING (0 = none)")
    parser.add_argument("--idle-timeout", type=float, default=300.0,
                        help="seconds a stream waits for its decoder (first request, credit, reads) before it is "
                             "dropped; keep it above the decoders' --idle-timeout")
    return parser.parse_args(argv)


async def serve(args) -> None:
    cfg = load_service_config(args)
    metrics = ServiceMetrics("encoder")
    metrics_port = metrics.serve(args.host, args.metrics_port)
    service = ConditionEncoderService(cfg, metrics, max_streams=args.max_streams, prefetch=args.prefetch,
                                      idle_timeout=args.idle_timeout, warmup_blocks=args.warmup_blocks,
                                      profile_dir=args.profile_dir)
    server = grpc.aio.server(options=server_options(args.max_message_bytes))
    encoder_pb2_grpc.add_ConditionEncoderServiceServicer_to_server(service, server)
    health = await add_health_and_reflection(server, [SERVICE_NAME])
    port = bind(server, args.host, args.port)
    await server.start()
    log_event(log, "listening", port=port, metrics_port=metrics_port, config=args.config)
    await service.load()
    await mark_serving(health, [SERVICE_NAME])
    log_event(log, "serving", port=port)
    await serve_until_terminated(server, health, args.grace, service.terminate, log)
    metrics.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("encoder", args.log_level, args.log_format)
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
