"""The page's start and switch messages -> the decoder's requests, with the page's mistakes as `PageError`s (shown
on the page, the session not spent). The decoder checks everything again; these checks only make the common
mistakes cheap and, for a switch, not fatal to the session playing."""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worldstream.client.session import start_request
from worldstream.v1 import session_pb2

MAX_PROMPT_BYTES = 65536  # StartSession.prompt and SwitchPrompt.prompt (session.proto)


class PageError(Exception):
    """Something the page asked for that cannot be done; `code` and the message are shown on the page."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def session_start(message: dict[str, Any], demos: Mapping[str, Path], max_image_bytes: int,
                  jpeg_quality: int) -> session_pb2.StartSession:
    """The decoder's start for the page's: from a `prompt` (text-to-video deployments) or an `image`.

    Image sessions run REALTIME: every block takes the latest input. Text sessions have no input, so they run
    LOCKSTEP and the gateway requests each block with an empty action as the playout drains (`LiveSession`): the
    decoder stays a couple of blocks ahead of the viewer, and a prompt switch shows that soon after it is sent."""
    seed = message.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise PageError("bad_seed", "the seed must be a whole number from 0 to 2^63 - 1")
    has_prompt, has_image = message.get("prompt") is not None, message.get("image") is not None
    if has_prompt == has_image:
        raise PageError("bad_start", "start a session with a `prompt` (text-to-video deployments) or an `image` "
                                     "(image deployments), exactly one of the two")
    common = dict(seed=seed, frame_encoding="jpeg", jpeg_quality=jpeg_quality)
    if has_prompt:
        return start_request(None, prompt=prompt_text(message["prompt"], "the prompt"), pacing="lockstep", **common)
    return start_request(image_bytes(message["image"], demos, max_image_bytes), pacing="realtime", **common)


def switch_request(message: dict[str, Any]) -> session_pb2.SessionRequest:
    prompt = prompt_text(message.get("prompt"), "the new prompt")
    return session_pb2.SessionRequest(switch_prompt=session_pb2.SwitchPrompt(prompt=prompt))


def prompt_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PageError("bad_prompt", f"{what} is empty; type what the video should show")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate from the page's JSON
        raise PageError("bad_prompt", f"{what} is not valid Unicode text") from None
    if size > MAX_PROMPT_BYTES:
        raise PageError("bad_prompt", f"{what} has {size} bytes of UTF-8; the decoder takes at most "
                                      f"{MAX_PROMPT_BYTES} (the model reads its first 512 tokens anyway)")
    return value


def image_bytes(spec: Any, demos: Mapping[str, Path], limit: int) -> bytes:
    if isinstance(spec, dict) and isinstance(spec.get("demo"), str):
        path = demos.get(spec["demo"])
        if path is None:
            raise PageError("bad_image", f"no demo image {spec['demo']!r}; choose one of {', '.join(sorted(demos))}")
        return path.read_bytes()
    if isinstance(spec, dict) and isinstance(spec.get("data"), str):
        name = str(spec.get("name", "the upload"))[:200]
        if len(spec["data"]) > 4 * (-(-limit // 3)):
            raise PageError("image_too_large", f"{name} is larger than the gateway's limit of {mib(limit)}")
        try:
            data = base64.b64decode(spec["data"], validate=True)
        except (binascii.Error, ValueError):
            raise PageError("bad_image", f"{name}: the upload is not valid base64") from None
        if not data:
            raise PageError("bad_image", f"{name} is empty; choose a PNG or JPEG image")
        return data
    raise PageError("bad_image", "choose a conditioning image: `image` is {\"demo\": NAME} or "
                                 "{\"data\": BASE64, \"name\": FILE}")


def mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"
