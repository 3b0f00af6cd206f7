"""The `worldstream` command line: every front-end of worldstream-services in one program.

    worldstream serve encoder --config mg2/universal --port 50052 --metrics-port 9102
    worldstream serve decoder --config mg2/universal --port 50051 --metrics-port 9101 --encoder-address HOST:PORT
    worldstream batch --config mg2/universal_tiny --blocks 10 --out out/batch.mp4 --overlay
    worldstream interpolate --config eden/interpolate_tiny --video in.mp4 --factor 2 --out out/interpolated.mp4
    worldstream golden ../shared/golden/*.safetensors
    worldstream demo                  # both services and the client on the tiny config, writes out/demo.mp4
    worldstream play                  # both services and the browser gateway; prints the page's URL
    worldstream health HOST:PORT      # exit status 0 iff the server reports SERVING
    worldstream client ARGS...        # the client's own command line (worldstream-client)

Building the parser loads no model code, so that quick commands stay quick; each command imports what it runs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .decoder.__main__ import add_arguments as add_decoder_arguments, build as build_decoder
from .encoder.__main__ import add_arguments as add_encoder_arguments, build as build_encoder
from .engine.config import CONFIG_ROOT, ConfigError, add_config_arguments, config_from_args, overrides_from_args
from .interpolate import add_arguments as add_interpolate_arguments, run as run_interpolate
from .serving.bootstrap import add_server_arguments, serve
from .serving.security import SecurityConfigError, add_tls_channel_arguments, channel_tls_from_args

DEMO_IMAGE = Path(__file__).resolve().parent / "assets" / "demo.png"


def run_service(process: str, build):
    def run(args: argparse.Namespace) -> int:
        cfg = config_from_args(args)
        return serve(process, args, lambda metrics: build(args, cfg, metrics))
    return run


def run_batch(args: argparse.Namespace) -> int:
    from .batch import run

    return run(args)


def run_golden(args: argparse.Namespace) -> int:
    from .golden.cli import check_files

    return check_files(args.files)


def run_demo(args: argparse.Namespace) -> int:
    """Both services as child processes on loopback, then the client for the mode's demo trajectory."""
    mode = str(config_from_args(args).mode)  # a bad config fails here, before anything starts

    from worldstream.client.__main__ import main as client_main
    from .serving.processes import ServiceStack

    trajectory = CONFIG_ROOT / "trajectories" / f"{mode}_demo.json"
    source = ["--trajectory", str(trajectory)] if trajectory.exists() else ["--benchmark"]
    log_dir = args.out.parent / "logs"
    print(f"starting the encoder and decoder services ({args.config}); logs in {log_dir}/", flush=True)
    with ServiceStack(args.config, log_dir, overrides_from_args(args)) as stack:
        print(f"encoder {stack.encoder_address}, decoder {stack.address}", flush=True)
        return client_main(["play", "--address", stack.address, "--image", str(args.image), *source,
                            "--blocks", str(args.blocks), "--out", str(args.out), "--overlay"])  # prints the path


def run_play(args: argparse.Namespace) -> int:
    """Both services as child processes on loopback, and the browser gateway in this process until Ctrl-C."""
    config_from_args(args)  # a bad config fails here, before anything starts

    from worldstream.gateway.__main__ import main as gateway_main
    from .serving.processes import ServiceStack

    print(f"starting the encoder and decoder services ({args.config}); logs in {args.logs}/", flush=True)
    with ServiceStack(args.config, args.logs, overrides_from_args(args)) as stack:
        return gateway_main(["--decoder", stack.address, "--host", args.host, "--port", str(args.port)])


def run_health(args: argparse.Namespace) -> int:
    from .serving.health import serving_status

    status = serving_status(args.address, args.timeout, channel_tls_from_args(args), args.service)
    print(f"{args.address}{' ' + args.service if args.service else ''}: {status}")
    return 0 if status == "SERVING" else 1


def run_client(argv: list[str]) -> int:
    from worldstream.client.__main__ import main as client_main

    return client_main(argv)


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--image", type=Path, default=DEMO_IMAGE, help="first frame (PNG/JPEG)")
    parser.add_argument("--prompt", action="append", help="text-to-video configs (selfforcing/..., longlive/...): "
                        "the video to generate, in words (instead of --image and actions); LongLive: repeat it, "
                        "one per --switch-at after the first (and one before them for the --video clip)")
    parser.add_argument("--switch-at", action="append", type=int, metavar="BLOCK",
                        help="LongLive: the block from which the next --prompt takes over (repeatable)")
    parser.add_argument("--video", type=Path, help="LongLive: a clip to continue (its first frames at the config's "
                                                   "fps, cached under the first --prompt; the next one follows)")
    parser.add_argument("--blocks", type=int, help="blocks to generate (9 frames, then 12 each; default 10, or "
                                                   "fewer where the config's sessions are shorter)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--trajectory", type=Path, help="trajectory JSON file (worldstream.trajectory.v1)")
    source.add_argument("--benchmark-seed", type=int, default=0,
                        help="seed of the reference benchmark trajectory (the default action source)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--out", type=Path, default=Path("out/batch.mp4"))
    parser.add_argument("--overlay", action="store_true", help="draw the keyboard/mouse state on the frames")
    parser.add_argument("--profile", type=Path, help="write a Chrome trace of the run here")


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--blocks", type=int, default=10, help="blocks to stream")
    parser.add_argument("--image", type=Path, default=DEMO_IMAGE, help="first frame (PNG/JPEG)")
    parser.add_argument("--out", type=Path, default=Path("out/demo.mp4"), help="video to write")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldstream", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = commands.add_parser("serve", help="run a service (encoder or decoder)")
    services = serve_parser.add_subparsers(dest="service", required=True, metavar="SERVICE")
    for process, help_text, add_own, build in [
            ("encoder", "condition encoder: image -> CLIP tokens and per-block cond_concat, streamed to decoders",
             add_encoder_arguments, build_encoder),
            ("decoder", "world-model decoder: interactive sessions (actions in, frames out), the public API",
             add_decoder_arguments, build_decoder)]:
        service = services.add_parser(process, help=help_text, description=help_text[0].upper() + help_text[1:])
        add_config_arguments(service)
        add_server_arguments(service)
        add_own(service)
        service.set_defaults(run=run_service(process, build))

    batch = commands.add_parser("batch", help="generate a video offline, in this process")
    add_batch_arguments(batch)
    batch.set_defaults(run=run_batch)

    golden = commands.add_parser("golden", help="check golden test vectors (fp32, atol = rtol = 1e-4)")
    golden.add_argument("files", nargs="+", type=Path, help="golden .safetensors files")
    golden.set_defaults(run=run_golden)

    interpolate = commands.add_parser("interpolate", help="interpolate a video offline, in this process (eden)")
    add_interpolate_arguments(interpolate)
    interpolate.set_defaults(run=run_interpolate)

    demo = commands.add_parser("demo", help="both services and the client on loopback; writes a video")
    add_demo_arguments(demo)
    demo.set_defaults(run=run_demo)

    play = commands.add_parser("play", help="both services and the browser gateway on loopback; prints the URL")
    add_config_arguments(play)
    play.add_argument("--host", default="127.0.0.1", help="address the page is served on")
    play.add_argument("--port", type=int, default=8080, help="port the page is served on")
    play.add_argument("--logs", type=Path, default=Path("out/logs"), help="folder for the services' logs")
    play.set_defaults(run=run_play)

    health = commands.add_parser("health", help="exit 0 iff the server's grpc.health.v1 check says SERVING")
    health.add_argument("address", metavar="HOST:PORT")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    health.add_argument("--service", default="", metavar="NAME",
                        help="a service's own status (readiness; the decoder's includes reaching its encoder), "
                             "e.g. worldstream.v1.WorldSessionService; default: the overall status (liveness)")
    add_tls_channel_arguments(health)
    health.set_defaults(run=run_health)

    commands.add_parser("client", add_help=False, help="the streaming client (`worldstream client --help`)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["client"]:  # the client distribution parses its own flags
        return run_client(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, SecurityConfigError) as err:
        parser.exit(2, f"worldstream {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
