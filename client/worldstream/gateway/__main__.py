"""`worldstream-gateway` (or `python -m worldstream.gateway`): serves the play page for a decoder service.

    worldstream-gateway --decoder 127.0.0.1:50051 --host 127.0.0.1 --port 8080
    worldstream-gateway --decoder decoder.example:50051 --tls-ca ca.pem [--tls-cert me.pem --tls-key me.key]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from worldstream.client.tls import add_tls_channel_arguments, channel_tls_from_args
from .app import TRANSPORTS, Gateway, Limits, serve


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(prog="worldstream-gateway", description=__doc__.splitlines()[0])
    parser.add_argument("--decoder", default=os.environ.get("WORLDSTREAM_DECODER_ADDRESS", "127.0.0.1:50051"),
                        help="decoder service address HOST:PORT (default: $WORLDSTREAM_DECODER_ADDRESS or "
                             "127.0.0.1:50051)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--transport", choices=TRANSPORTS, default="jpeg",
                        help="default frame transport of the page (it can pick the other)")
    parser.add_argument("--max-sessions", type=int, default=defaults.max_sessions,
                        help="sessions played at once (one per playing tab)")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                        help="largest uploaded conditioning image")
    parser.add_argument("--max-video-bytes", type=int, default=defaults.max_video_bytes,
                        help="largest clip a video-conditional session continues (at most 32 MiB less 256 KiB: the "
                             "decoder's limit on a start message)")
    parser.add_argument("--input-rate", type=float, default=defaults.input_rate,
                        help="input messages per second per tab")
    parser.add_argument("--jpeg-quality", type=int, default=85, help="quality of the decoder's JPEG frames")
    parser.add_argument("--recordings-dir", type=Path, default=None,
                        help="where session recordings are kept while their tab is open (default: a temporary "
                             "folder)")
    add_tls_channel_arguments(parser, what="the decoder service")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for chatty in ("aiohttp.access", "aioice", "aiortc"):  # a line per request, per ICE check
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        limits = Limits(max_sessions=args.max_sessions, max_image_bytes=args.max_image_bytes,
                        max_video_bytes=args.max_video_bytes,
                        input_rate=args.input_rate, input_burst=max(1, round(args.input_rate / 2)))
        gateway = Gateway(args.decoder, limits, args.transport, args.jpeg_quality, args.recordings_dir,
                          channel_tls_from_args(args))
    except ValueError as e:
        print(f"worldstream-gateway: {e}", file=sys.stderr)
        return 2

    async def run() -> None:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await serve(gateway, args.host, args.port)

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
