"""The play page in a real headless Chromium (Playwright, driving the Debian `chromium` binary; nothing is
downloaded), against the gateway and both services as real processes on the tiny configs: an image deployment
(Matrix-Game-2) and text-to-video ones (Self-Forcing; LongLive, which switches prompts and continues clips). Plus
the gateway's limits
and error relay over a plain WebSocket client, and its request building in-process.

WORLDSTREAM_CHROMIUM names the browser binary (default: `chromium` or `chromium-browser` on PATH);
WORLDSTREAM_UPDATE_SCREENSHOT=1 also writes the screenshot of a playing session to docs/browser.png."""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import shutil
import sys
import urllib.request
import warnings
from pathlib import Path

import pytest

from service_harness import REPO, GatewayProcess, metric_value, running_services, wait_for

pytest.importorskip("aiohttp", reason="the gateway needs the web extra: pip install -e './client[web]'")


def find_chromium() -> str | None:
    for candidate in (os.environ.get("WORLDSTREAM_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (path := shutil.which(candidate)):
            return path
    return None


CHROMIUM = find_chromium()


def skip_loudly(reason: str):
    line = f"\n{'!' * 100}\nBROWSER TEST SKIPPED: {reason}\n{'!' * 100}\n"
    print(line, file=sys.stderr)
    warnings.warn(line)
    pytest.skip(reason)


@contextlib.contextmanager
def gateway_stack(logs: Path, gateway_args: list[str] = (), **services_kwargs):
    """Both services of a config and a gateway in front of them."""
    with running_services(logs, **services_kwargs) as services:
        gateway = GatewayProcess(services.address, logs / "gateway.log", gateway_args)
        try:
            yield services, gateway
        finally:
            gateway.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with gateway_stack(tmp_path_factory.mktemp("browser"), ["--max-sessions", "2"],
                       decoder_args=["--max-sessions", "2"]) as running:
        yield running


@pytest.fixture(scope="module")
def t2v_stack(tmp_path_factory):
    with gateway_stack(tmp_path_factory.mktemp("browser-t2v"), config="selfforcing/t2v_tiny") as running:
        yield running


@pytest.fixture(scope="module")
def longlive_stack(tmp_path_factory):
    with gateway_stack(tmp_path_factory.mktemp("browser-longlive"), config="longlive/interactive_tiny") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        skip_loudly("no Chromium found (install the Debian package: apt-get install -y chromium, or set "
                    "WORLDSTREAM_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_loudly("Playwright for Python is not installed (pip install playwright; never `playwright install`: "
                    "the test drives the system Chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def decoder_sessions(services) -> float:
    return metric_value(services.decoder_metrics_port, "worldstream_decoder_sessions_active")


def frame_count(page) -> int:
    return int(page.text_content("#frame-count"))


def open_page(browser, gateway):
    page = browser.new_page(viewport={"width": 1200, "height": 720})
    page.goto(gateway.url)
    page.wait_for_selector("#start:enabled")
    return page


def test_play_in_the_browser(browser, stack, tmp_path):  # browser first: no services without one
    """The page loads, a session starts, frames arrive and the counter advances, holding W is echoed, and
    closing the page frees the decoder's session."""
    services, gateway = stack
    page = open_page(browser, gateway)
    assert page.text_content("#transport option:checked").strip() == "JPEG over WebSocket"  # the default
    page.click("#start")
    page.wait_for_function("Number(document.getElementById('frame-count').textContent) > 0", timeout=120_000)
    first = frame_count(page)
    page.wait_for_function(f"Number(document.getElementById('frame-count').textContent) > {first}", timeout=60_000)
    assert page.evaluate("document.activeElement.id") == "game"  # Start hands the keyboard to the game view
    assert "universal" in page.text_content("#mode")

    page.keyboard.down("w")
    page.wait_for_function("document.getElementById('echo-keys').dataset.keys.split(' ').includes('W')",
                           timeout=120_000)
    assert page.is_visible("#held-keys .cap.on:text('W')") and page.is_hidden("#error")
    samples = page.evaluate("window.worldstream.stats.samples")
    assert samples and all(s["latency"] > 0 for s in samples)
    screenshot = tmp_path / "browser.png"
    page.screenshot(path=str(screenshot))
    if os.environ.get("WORLDSTREAM_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, REPO / "docs" / "browser.png")
    page.keyboard.up("w")

    assert decoder_sessions(services) == 1
    page.close()
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the closed tab's session")
    wait_for(lambda: gateway.metric("worldstream_gateway_sessions_active") == 0, 10, "the gateway to drop it")
    assert gateway.metric("worldstream_gateway_frames_sent_total", {"transport": "jpeg"}) >= first


def test_webrtc_transport_and_recording(browser, stack):
    """The WebRTC video track plays too; stopping ends the session and offers the recording as an mp4."""
    services, gateway = stack
    page = open_page(browser, gateway)
    page.select_option("#transport", "webrtc")
    page.click("input[value=corridor]")
    page.click("#start")
    page.wait_for_function("Number(document.getElementById('frame-count').textContent) >= 3", timeout=120_000)
    assert page.is_visible("#video") and page.is_hidden("#canvas")
    page.click("#stop")
    page.wait_for_selector("#download:not([hidden])", timeout=60_000)
    href = page.get_attribute("#download", "href")
    with urllib.request.urlopen(gateway.url + href, timeout=10) as response:
        mp4 = response.read()
    assert mp4[4:8] == b"ftyp" and len(mp4) > 1000
    assert "ended" in page.text_content("#status")
    page.close()
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the session")


def test_text_to_video_in_the_browser(browser, t2v_stack):
    """On a text-to-video deployment the page starts from the typed prompt: frames arrive with no key overlay and
    no switch box (Self-Forcing cannot switch prompts); a page opened afterwards offers only the prompt."""
    services, gateway = t2v_stack
    page = open_page(browser, gateway)
    assert page.is_visible("#prompt") and page.is_visible("#image-setup")  # no session has shown the family yet
    page.fill("#prompt", "a red fox runs through fresh snow")
    page.click("#start")
    page.wait_for_function("Number(document.getElementById('frame-count').textContent) >= 12", timeout=120_000)
    assert "self_forcing" in page.text_content("#mode")
    assert page.is_hidden("#overlay") and page.is_hidden("#switch") and page.is_hidden("#image-setup")
    assert "no keys" in page.text_content("#keys-help") and page.is_hidden("#error")
    page.click("#stop")
    page.wait_for_function("window.worldstream.stats.ended !== null", timeout=60_000)
    assert page.evaluate("window.worldstream.stats.ended.reason") == "client_stop"
    page.wait_for_selector("#download:not([hidden])")  # the recording, without an action overlay
    page.close()

    page = open_page(browser, gateway)
    assert page.is_visible("#prompt") and page.is_hidden("#image-setup")
    page.click("#start")  # no prompt typed: the page asks for one instead of starting
    assert "Type a prompt" in page.text_content("#error")
    page.close()
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the session")


def test_switch_prompts_while_the_video_plays(browser, longlive_stack):
    """LongLive: a new prompt typed while the video plays goes to the decoder, and the page says at which block it
    took effect once that block is on screen."""
    services, gateway = longlive_stack
    page = open_page(browser, gateway)
    page.fill("#prompt", "a red fox runs through fresh snow")
    page.click("#start")
    page.wait_for_function("Number(document.getElementById('frame-count').textContent) > 0", timeout=120_000)
    assert "longlive" in page.text_content("#mode") and page.is_hidden("#overlay")
    assert page.evaluate("document.activeElement.id") == "switch-prompt"  # ready to type the next prompt
    page.keyboard.type("a storm over the sea")
    page.click("#switch-button")
    page.wait_for_function("document.getElementById('switch-status').textContent.startsWith('prompt switched')",
                           timeout=60_000)
    switches = page.evaluate("window.worldstream.stats.switches")
    assert [s["count"] for s in switches] == [1] and switches[0]["block"] >= 1
    block = switches[0]["block"]
    assert page.text_content("#switch-status") == f"prompt switched at block {block}"
    assert int(page.text_content("#block-index")) >= block and page.is_hidden("#error")
    page.click("#stop")
    page.wait_for_function("window.worldstream.stats.ended !== null", timeout=60_000)
    page.close()
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the session")


def write_clip(path: Path) -> Path:
    """A 14-frame moving-stripes mp4 at 24 fps (9 frames at the model's 16: one block of latents), as
    tests/test_longlive_services.py makes them."""
    import numpy as np

    from worldstream.client.video import VideoWriter

    t, y, x = np.meshgrid(np.arange(14), np.arange(80), np.arange(120), indexing="ij")
    with VideoWriter(path, fps=24) as writer:
        writer.write(np.repeat(((2 * x + 9 * t + y) % 256)[..., None], 3, axis=-1).astype(np.uint8))
    return path


def test_continue_a_clip_in_the_browser(browser, longlive_stack, tmp_path):
    """LongLive: the page uploads a clip with the prompt of what it shows and the prompt of what follows; the clip's
    reconstruction plays first, then the generated blocks, and the recording holds both."""
    services, gateway = longlive_stack
    page = open_page(browser, gateway)
    page.fill("#prompt", "the stripes turn into a storm over the sea")
    page.set_input_files("#clip", str(write_clip(tmp_path / "clip.mp4")))
    page.fill("#clip-prompt", "diagonal stripes moving to the right")
    page.click("#start")
    page.wait_for_function("window.worldstream.stats.phases.join() === 'clip,block'", timeout=120_000)
    clip = page.evaluate("window.worldstream.stats.clip")
    assert clip["total"] == 9 and 1 <= clip["painted"] <= 9, clip
    assert page.text_content("#clip-frames") == f"{clip['painted']} of 9" and page.is_hidden("#error")
    assert page.text_content("#status").startswith("Playing the continuation of the clip")
    page.click("#stop")
    page.wait_for_selector("#download:not([hidden])", timeout=60_000)
    blocks = page.evaluate("window.worldstream.stats.ended.blocks")
    with urllib.request.urlopen(gateway.url + page.get_attribute("#download", "href"), timeout=10) as response:
        mp4 = tmp_path / "session.mp4"
        mp4.write_bytes(response.read())
    import av

    with av.open(str(mp4)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert blocks >= 1 and frames > 9 + (blocks - 1) * 9, (frames, blocks)  # the clip, then every block
    page.close()
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the session")


async def _switch_during(url: str, start: dict, switch: dict) -> dict:
    """Starts a session, sends `switch` once its info came; returns the next message but frames, blocks and pongs."""
    import aiohttp

    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        await ws.send_json(start)
        while (message := await ws.receive_json(timeout=60))["type"] != "info":
            assert message["type"] != "error", message
        await ws.send_json(switch)
        while (message := await ws.receive(timeout=60)).type != aiohttp.WSMsgType.TEXT or json.loads(
                message.data)["type"] in ("frames", "block", "pong"):
            pass
        return json.loads(message.data)


def test_gateway_refuses_what_a_text_session_cannot_take(t2v_stack):
    services, gateway = t2v_stack
    start = {"type": "start", "prompt": "a lighthouse at dusk"}
    answer = run_async(_switch_during(gateway.url, start, {"type": "switch", "prompt": "a storm"}))
    assert answer["code"] == "no_prompt_switching" and not answer["fatal"] and "LongLive" in answer["message"]
    answer = run_async(_switch_during(gateway.url, start, {"type": "input", "keys": ["W"], "mouse": [0, 0]}))
    assert answer["code"] == "bad_input" and "takes no keyboard or mouse" in answer["message"]
    replies = exchange(gateway.url, [{"type": "start", "image": {"demo": "corridor"}}], "error")
    assert replies[-2]["fatal"] and replies[-2]["code"] == "decoder_invalid_argument"
    assert "start the session with `prompt`" in replies[-2]["message"]
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the sessions")


def test_gateway_refuses_clips_it_cannot_start_from(t2v_stack, tmp_path):
    """Over the WebSocket: a clip over the gateway's limit and a file that is no video are refused before they reach
    the decoder; a clip on a deployment without video conditioning (Self-Forcing) ends with the decoder's
    INVALID_ARGUMENT, relayed."""
    services, gateway = t2v_stack

    def start(data: str, name: str = "clip.mp4") -> dict:
        return {"type": "start", "prompt": "the storm goes on", "video_prompt": "diagonal stripes",
                "video": {"data": data, "name": name}}

    limit = 16 << 20  # the gateway's default
    replies = exchange(gateway.url, [start("A" * (4 * (-(-(limit + 1) // 3))), "long.mp4")], "error")
    error = replies[-2]
    assert error["code"] == "video_too_large" and not error["fatal"], error
    assert "long.mp4" in error["message"] and "16 MiB" in error["message"] and "32 MiB" in error["message"]
    replies = exchange(gateway.url, [start(base64.b64encode(b"plain text, no video").decode(), "notes.mp4")],
                       "error")
    assert replies[-2]["code"] == "bad_video" and "not an MP4 or WebM video" in replies[-2]["message"]

    clip = base64.b64encode(write_clip(tmp_path / "clip.mp4").read_bytes()).decode()
    replies = exchange(gateway.url, [start(clip)], "error")
    error = replies[-2]
    assert error["fatal"] and error["code"] == "decoder_invalid_argument", error
    assert "does not continue videos" in error["message"]
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the sessions")


def test_upload_of_a_non_image_shows_an_error(browser, stack):
    _, gateway = stack
    page = open_page(browser, gateway)
    page.set_input_files("#upload", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                            "buffer": b"not a picture\n"}])
    page.wait_for_selector("#error:not([hidden])")
    assert "notes.txt" in page.text_content("#error") and "PNG or JPEG" in page.text_content("#error")
    page.set_input_files("#upload", files=[{"name": "broken.png", "mimeType": "image/png",
                                            "buffer": b"\x89PNG\r\n\x1a\n" + b"\0" * 64}])
    page.wait_for_function("document.getElementById('error').textContent.includes('broken.png')")
    assert "could not be read" in page.text_content("#error")
    page.close()


# ---- the gateway's protocol and limits, over a plain WebSocket client --------------------------------------------

def run_async(coroutine):
    """On its own thread: Playwright's sync API holds an event loop on this one."""
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, coroutine).result()


def exchange(url: str, messages: list, until: str) -> list:
    """Sends `messages` on a fresh tab WebSocket; returns the JSON messages received up to one of type `until`
    (or the close), then {"type": "closed", "code": ...}."""
    return run_async(_exchange(url, messages, until))


async def _exchange(url: str, messages: list, until: str) -> list:
    import aiohttp

    received = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        try:
            for message in messages:
                await ws.send_str(message if isinstance(message, str) else json.dumps(message))
        except ConnectionError:  # the gateway closed the socket while the message was being sent
            pass

        async def read() -> None:
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.TEXT:
                    received.append(json.loads(frame.data))
                    if received[-1]["type"] == until:
                        return

        await asyncio.wait_for(read(), 60)
        received.append({"type": "closed", "code": ws.close_code})
    return received


async def _one_tab_too_many(url: str, sessions: int) -> dict:
    """Starts `sessions` sessions in as many tabs, then one more; returns the last tab's answer."""
    import aiohttp

    start = {"type": "start", "image": {"demo": "countryside"}}
    async with aiohttp.ClientSession() as http:
        tabs = [await http.ws_connect(url.replace("http", "ws") + "/ws") for _ in range(sessions + 1)]
        try:
            for tab in tabs[:-1]:
                await tab.send_json(start)
                while (await tab.receive_json(timeout=60))["type"] != "info":
                    pass
            await tabs[-1].send_json(start)
            return await tabs[-1].receive_json(timeout=60)
        finally:
            for tab in tabs:
                await tab.close()


def test_gateway_relays_decoder_errors_and_enforces_limits(stack):
    services, gateway = stack
    garbage = base64.b64encode(b"this is no image").decode()
    replies = exchange(gateway.url, [{"type": "start", "image": {"data": garbage, "name": "x.png"}}], "error")
    error = replies[-2]
    assert error["fatal"] and error["code"] == "decoder_invalid_argument" and "INVALID_ARGUMENT" in error["message"]

    replies = exchange(gateway.url, [{"type": "start", "image": {"demo": "nope"}}], "error")
    assert replies[-2]["code"] == "bad_image" and "countryside" in replies[-2]["message"]

    flood = [{"type": "input", "keys": ["W"], "mouse": [0, 0]}] * 100
    replies = exchange(gateway.url, flood, "error")
    assert replies[-2]["code"] == "input_rate" and "per second" in replies[-2]["message"]

    # over the largest message the gateway reads (a start with a 16 MiB clip, base64): closed as it arrives
    huge = json.dumps({"type": "start", "image": {"data": "A" * (24 << 20), "name": "big.png"}})
    replies = exchange(gateway.url, [huge], "error")
    assert replies[-1]["type"] == "closed"  # 1009 (message too big), or 1006 if it came mid-send
    wait_for(lambda: gateway.metric("worldstream_gateway_errors_total", {"code": "message_too_large"}) == 1, 10,
             "the gateway to count the oversized message")
    assert gateway.metric("worldstream_gateway_errors_total", {"code": "input_rate"}) >= 1

    answer = run_async(_one_tab_too_many(gateway.url, 2))  # the gateway runs with --max-sessions 2
    assert answer["code"] == "gateway_full" and "2 sessions at most" in answer["message"]
    wait_for(lambda: decoder_sessions(services) == 0, 60, "the decoder to free the closed tabs' sessions")


# ---- the gateway's pieces, in-process ----------------------------------------------------------------------------

def test_page_start_and_switch_requests():
    from worldstream.gateway.requests import MAX_PROMPT_BYTES, PageError, session_start, switch_request
    from worldstream.v1 import session_pb2

    demos = {"corridor": REPO / "client/worldstream/gateway/static/demos/corridor.png"}

    def start(**message):
        return session_start(message, demos, max_image_bytes=1 << 20, max_video_bytes=1 << 20, jpeg_quality=70)

    text = start(prompt="a fox in snow", seed=5)
    assert (text.prompt, text.image, text.seed, text.jpeg_quality) == ("a fox in snow", b"", 5, 70)
    assert text.pacing == session_pb2.PACING_LOCKSTEP  # the gateway requests each block as the playout drains
    image = start(image={"demo": "corridor"})
    assert image.image == demos["corridor"].read_bytes() and not image.prompt
    assert image.pacing == session_pb2.PACING_REALTIME and image.frame_encoding == session_pb2.FRAME_ENCODING_JPEG
    upload = start(image={"data": base64.b64encode(b"png bytes").decode(), "name": "me.png"})
    assert upload.image == b"png bytes"
    assert switch_request({"prompt": "a storm"}).switch_prompt.prompt == "a storm"
    mp4, webm = b"\0\0\0\x20ftypisom" + b"\0" * 20, b"\x1a\x45\xdf\xa3" + b"\0" * 20
    for clip in (mp4, webm):
        video = start(prompt="a storm", video_prompt="stripes", video={"data": base64.b64encode(clip).decode()})
        assert (video.video, video.video_prompt, video.prompt) == (clip, "stripes", "a storm")
        assert video.pacing == session_pb2.PACING_LOCKSTEP
    clip = {"data": base64.b64encode(mp4).decode(), "name": "c.mp4"}

    for message, code, says in [
        ({}, "bad_start", "exactly one"),
        ({"prompt": "a fox", "image": {"demo": "corridor"}}, "bad_start", "exactly one"),
        ({"prompt": "  \n"}, "bad_prompt", "empty"),
        ({"prompt": 7}, "bad_prompt", "empty"),
        ({"prompt": "\ud800"}, "bad_prompt", "not valid Unicode"),
        ({"prompt": "é" * (MAX_PROMPT_BYTES // 2 + 1)}, "bad_prompt", f"at most {MAX_PROMPT_BYTES}"),
        ({"prompt": "a fox", "seed": -1}, "bad_seed", "whole number"),
        ({"image": {"demo": "nope"}}, "bad_image", "corridor"),
        ({"image": {"data": "not base64!", "name": "x.png"}}, "bad_image", "not valid base64"),
        ({"image": {"data": "A" * (2 << 20), "name": "big.png"}}, "image_too_large", "1 MiB"),
        ({"prompt": "a storm", "video": clip}, "bad_start", "all three"),
        ({"prompt": "a storm", "video_prompt": "stripes"}, "bad_start", "all three"),
        ({"image": {"demo": "corridor"}, "video": clip, "video_prompt": "stripes"}, "bad_start", "all three"),
        ({"prompt": "a storm", "video": clip, "video_prompt": " "}, "bad_prompt", "what the clip shows"),
        ({"prompt": "a storm", "video_prompt": "x", "video": {"data": "A" * (2 << 20), "name": "big.mp4"}},
         "video_too_large", "32 MiB"),
        ({"prompt": "a storm", "video_prompt": "x", "video": {"data": base64.b64encode(b"GIF89a..").decode(),
                                                              "name": "a.gif"}}, "bad_video", "a.gif"),
        ({"prompt": "a storm", "video_prompt": "x", "video": "clip.mp4"}, "bad_video", "BASE64"),
    ]:
        with pytest.raises(PageError) as caught:
            start(**message)
        assert caught.value.code == code and says in str(caught.value), message
    with pytest.raises(PageError) as caught:
        switch_request({"prompt": ""})
    assert caught.value.code == "bad_prompt" and "the new prompt" in str(caught.value)


def test_input_mapping_keys_mouse_and_echo():
    from worldstream.api.spaces import get_action_space
    from worldstream.gateway.input import InputError, InputMapper

    universal = InputMapper(get_action_space("universal"), pixels_per_step=10.0)
    action = universal.action({"keys": ["W", "J"], "mouse": [20, -10]})  # J looks left; the pointer went right, up
    assert action.keyboard.tolist() == [[1, 0, 0, 0]]
    assert action.mouse[0].tolist() == pytest.approx([0.1, -0.1 + 0.2])  # pitch up 1 step, yaw left 1 + right 2
    assert universal.action({"keys": [], "mouse": [1e4, 0]}).mouse.tolist() == [[0.0, 1.0]]  # clipped to the limit
    assert universal.echo(action) == {"names": ["forward"], "keys": ["W"], "mouse": pytest.approx([0.1, 0.1])}
    templerun = InputMapper(get_action_space("templerun"))
    jump_then_slide = templerun.action({"keys": ["W", "S"], "mouse": [0, 0]})  # one-hot: the newest key wins
    assert templerun.echo(jump_then_slide)["names"] == ["slide"]
    assert templerun.echo(templerun.action({"keys": [], "mouse": [0, 0]}))["names"] == []  # idle shows no key
    for bad in ({"keys": "W"}, {"keys": ["WW"]}, {"keys": ["X"]}, {"mouse": [float("nan"), 0]}, {"mouse": [1]}):
        with pytest.raises(InputError):
            universal.action(bad)


def test_playout_spaces_frames_at_the_fps_and_restarts_after_a_gap():
    from worldstream.gateway.playout import Frame, Playout

    async def play() -> list[float]:
        playout, loop = Playout(fps=50, capacity=4), asyncio.get_running_loop()

        async def produce() -> None:
            for seq in range(8):
                if seq == 4:
                    await asyncio.sleep(0.2)  # the decoder is late: the buffer runs dry
                await playout.put(Frame(seq, seq // 4, b""))
            await playout.close()

        producer = asyncio.create_task(produce())
        times = [loop.time() async for _ in playout.frames()]
        await producer
        return times

    times = run_async(play())
    period = 1 / 50
    for first, burst in ((0, range(1, 4)), (4, range(5, 8))):
        for k in burst:  # on the clock (never early; late only by the machine's load), not back to back
            assert (k - first) * period - 0.002 <= times[k] - times[first] < (k - first) * period + 0.1, times
    assert times[4] - times[3] > 0.1  # the gap: the clock restarts at frame 4 instead of rushing 4-7 out
