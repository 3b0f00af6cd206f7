"""The `worldstream` command line: subcommands, shared flags, safe defaults, config errors, the entry points."""
import subprocess
import sys
from pathlib import Path

import av
import pytest

from worldstream.cli import build_parser, main

WORLDSTREAM = Path(sys.executable).parent / "worldstream"  # the console script of worldstream-services
SERVE = ["--port", "0", "--metrics-port", "0"]


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(WORLDSTREAM), *argv], capture_output=True, text=True, timeout=timeout)


def test_console_script_lists_every_command():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "batch", "golden", "demo", "health", "client"):
        assert command in proc.stdout


@pytest.mark.parametrize("service", ["encoder", "decoder"])
def test_services_listen_on_loopback_by_default(service):
    args = build_parser().parse_args(["serve", service, *SERVE, "--encoder-address", "127.0.0.1:1"]
                                     if service == "decoder" else ["serve", service, *SERVE])
    assert (args.host, args.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert (args.config, args.overrides, args.device) == ("mg2/universal_tiny", [], None)


def test_decoder_needs_an_encoder_address(monkeypatch, capsys):
    monkeypatch.delenv("WORLDSTREAM_ENCODER_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "decoder", *SERVE])
    assert caught.value.code == 2 and "--encoder-address" in capsys.readouterr().err
    monkeypatch.setenv("WORLDSTREAM_ENCODER_ADDRESS", "encoder:50052")
    assert build_parser().parse_args(["serve", "decoder", *SERVE]).encoder_address == "encoder:50052"


@pytest.mark.parametrize("argv", [["serve", "encoder", *SERVE], ["batch"], ["demo"]])
def test_unknown_config_key_fails_before_anything_starts(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--set", "limts.max_blocks=5"])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert "unknown config key 'limts' (did you mean 'limits'?)" in err and f"worldstream {argv[0]}: error" in err


def test_python_m_service_entry_points_are_the_serve_commands():
    for service in ("encoder", "decoder"):
        proc = subprocess.run([sys.executable, "-m", f"worldstream.{service}", "--help"], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and f"usage: worldstream serve {service}" in proc.stdout, proc.stderr


def test_health_of_nothing_is_not_serving():
    proc = run("health", "127.0.0.1:9", "--timeout", "0.5")
    assert proc.returncode == 1 and proc.stdout.strip() in ("127.0.0.1:9: UNAVAILABLE", "127.0.0.1:9: DEADLINE_EXCEEDED")


def test_client_is_the_client_distributions_command_line():
    ours = run("client", "--help")
    theirs = subprocess.run([sys.executable, "-m", "worldstream.client", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout


def test_demo_streams_through_both_services(tmp_path):
    """`make demo`'s command: both services as processes, the client, a playable video."""
    out = tmp_path / "demo.mp4"
    proc = run("demo", "--blocks", "2", "--out", str(out), "--set", "video.height=32", "--set", "video.width=64",
               timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9 + 12
    assert (tmp_path / "logs" / "decoder.log").exists()
