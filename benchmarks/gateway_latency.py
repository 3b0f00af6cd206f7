"""The web gateway's added latency: a frame leaves the decoder (the `send_time` of the `BlockFrames` or `BlockChunk`
that carried it) -> painted in the page.

    python benchmarks/gateway_latency.py --seconds 40 --transports jpeg webrtc --json out/gateway_latency.json

Starts the encoder and decoder services on the tiny config, the gateway, and a headless Chromium (the system's
`chromium`, driven by Playwright), then plays one session per transport for `--seconds`, holding W every other
two seconds. The page timestamps each painted frame (JPEG: the animation frame after the draw; WebRTC:
`requestVideoFrameCallback`'s expected display time) and maps it to the gateway's clock with the offset of its
best WebSocket ping; the services and the gateway run on this machine, so their clocks are the same.

Per transport it prints median, p10 and p90 over frames of:
- decoder -> paint, first frames: the first frame of each block (pure transport: no playout wait);
- decoder -> paint, all frames: includes the playout, which spaces a block's frames 1/fps apart;
- decoder -> gateway: the message's send_time to its arrival at the gateway;
- playout wait: arrival at the gateway to the frame leaving it (WebRTC: taken by the encoder);
- gateway -> paint: the frame leaving the gateway to painted;
and frames painted per second while blocks flowed, the spread of paint intervals inside blocks, and the
bytes per frame received by the page.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from worldstream.serving.processes import ServiceStack, free_port

COLUMNS = [("first", "decoder -> paint, first frame of a block"), ("latency", "decoder -> paint, all frames"),
           ("to_gateway", "decoder -> gateway"), ("sent", "playout wait in the gateway"),
           ("to_page", "gateway -> paint")]


def spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"n": len(ordered), "median": statistics.median(ordered), "p10": pick(0.1), "p90": pick(0.9)}


def start_gateway(decoder: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "worldstream.gateway", "--decoder", decoder, "--port",
                                    str(port)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as response:
                if json.load(response)["status"] == "ok":
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    process.terminate()
    raise TimeoutError(f"the gateway did not become healthy; log in {log_path}")


def play(browser, url: str, transport: str, seconds: float) -> dict:
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#start:enabled")
    page.select_option("#transport", transport)
    page.uncheck("#record")  # the mp4 encoder would compete for the CPU
    page.click("#start")
    page.wait_for_function("window.worldstream.stats.frames > 0 || window.worldstream.stats.errors.length",
                           timeout=180_000)
    if errors := page.evaluate("window.worldstream.stats.errors"):
        raise RuntimeError(f"the {transport} session failed: {errors}")
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        page.keyboard.down("w")
        page.wait_for_timeout(2000)
        page.keyboard.up("w")
        page.wait_for_timeout(2000)
    stats = page.evaluate("window.worldstream.stats")
    fps = page.evaluate("window.worldstream.session.info.fps")
    if transport == "webrtc":
        stats["bytes"] = page.evaluate("""async () => {
            let bytes = 0;
            (await window.worldstream.session.pc.getStats()).forEach((r) => {
                if (r.type === "inbound-rtp" && r.kind === "video") bytes += r.bytesReceived + r.headerBytesReceived;
            });
            return bytes; }""")
    page.close()
    return summarize(stats, fps)


def summarize(stats: dict, fps: int) -> dict:
    samples = [s for s in stats["samples"] if s["block"] > 0]  # block 0 waits for the first conditioning
    result = {name: spread([s[name] for s in samples if s[name] is not None]) for name in
              ("latency", "to_gateway", "sent", "to_page")}
    result["first"] = spread([s["latency"] for s in samples if s["first"]])
    by_message: dict[tuple[int, int], list[dict]] = {}
    for s in samples:
        by_message.setdefault((s["block"], s["part"]), []).append(s)
    # Paint intervals between consecutive frames of one message (one send_time: the latency difference); the
    # playout aims at 1000 / fps.
    result["interval"] = spread([b["latency"] - a["latency"] for block in by_message.values()
                                 for a, b in zip(block, block[1:]) if b["seq"] == a["seq"] + 1])
    result["fps"] = fps
    result["frames"] = stats["frames"]
    result["blocks"] = len({s["block"] for s in samples})
    result["bytes_per_frame"] = stats["bytes"] / max(1, stats["frames"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mg2/universal_tiny")
    parser.add_argument("--seconds", type=float, default=40.0, help="play time per transport")
    parser.add_argument("--transports", nargs="+", choices=["jpeg", "webrtc"], default=["jpeg", "webrtc"])
    parser.add_argument("--chromium", default=os.environ.get("WORLDSTREAM_CHROMIUM") or shutil.which("chromium"))
    parser.add_argument("--logs", type=Path, default=Path("out/gateway_latency_logs"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.chromium:
        parser.error("no chromium on PATH (apt-get install -y chromium) and no --chromium")
    from playwright.sync_api import sync_playwright

    args.logs.mkdir(parents=True, exist_ok=True)
    results = {}
    with ServiceStack(args.config, args.logs) as services:
        gateway, url = start_gateway(services.address, args.logs / "gateway.log")
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True)
                for transport in args.transports:
                    results[transport] = play(browser, url, transport, args.seconds)
                browser.close()
        finally:
            gateway.terminate()
            gateway.wait(15)
    for transport, result in results.items():
        print(f"\n{transport}: {result['frames']} frames painted over {result['blocks']} blocks at "
              f"{result['fps']} fps, {result['bytes_per_frame'] / 1024:.1f} KiB per frame")
        print(f"{'ms':<42} {'median':>8} {'p10':>8} {'p90':>8} {'n':>6}")
        for key, label in [*COLUMNS, ("interval", "paint interval inside a block")]:
            s = result[key]
            if s["n"]:
                print(f"{label:<42} {s['median']:8.1f} {s['p10']:8.1f} {s['p90']:8.1f} {s['n']:6d}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": args.config, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
