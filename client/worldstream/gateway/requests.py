"""The page's start and switch messages -> the decoder's requests, with the page's mistakes as `PageError`s (shown
on the page, the session not spent). The decoder checks everything again; these checks only make the common
mistakes cheap and, for a switch, not fatal to the session playing. Uploads (an image, a clip) are base64 in the
start message: their size is checked on the base64 text, before it is decoded."""
from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worldstream.client.session import start_request
from worldstream.v1 import session_pb2

MAX_PROMPT_BYTES = 65536  # StartSession.prompt and SwitchPrompt.prompt (session.proto)
# The decoder refuses a start message over 32 MiB (session.proto, StartSession.video); a clip leaves room for the
# two prompts and the other fields.
MAX_START_VIDEO_BYTES = (32 << 20) - (256 << 10)


class PageError(Exception):
    """Something the page asked for that cannot be done; `code` and the message are shown on the page."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def session_start(message: dict[str, Any], demos: Mapping[str, Path], max_image_bytes: int, max_video_bytes: int,
                  jpeg_quality: int) -> session_pb2.StartSession:
    """The decoder's start for the page's: from a `prompt` (text-to-video deployments), optionally continuing a
    `video` clip that `video_prompt` describes (deployments with video conditioning), or from an `image`.

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
    has_video = message.get("video") is not None
    if has_video != (message.get("video_prompt") is not None) or (has_video and not has_prompt):
        raise PageError("bad_start", "a clip start has all three of `video` (the clip), `video_prompt` (what the "
                                     "clip shows) and `prompt` (what happens next)")
    common = dict(seed=seed, frame_encoding="jpeg", jpeg_quality=jpeg_quality)
    if has_video:
        # Sniffed before the prompts are checked: a wrong file is the likelier mistake, and it is the one to fix.
        video = video_bytes(message["video"], max_video_bytes)
        return start_request(None, prompt=prompt_text(message["prompt"], "the prompt of what happens next"),
                             pacing="lockstep", video=video,
                             video_prompt=prompt_text(message["video_prompt"], "the prompt of what the clip shows"),
                             **common)
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
        data = uploaded(spec, limit, "image", "images")
        if not data:
            raise PageError("bad_image", f"{upload_name(spec)} is empty; choose a PNG or JPEG image")
        return data
    raise PageError("bad_image", "choose a conditioning image: `image` is {\"demo\": NAME} or "
                                 "{\"data\": BASE64, \"name\": FILE}")


def video_bytes(spec: Any, limit: int) -> bytes:
    """An MP4 or WebM clip (the encoder decodes it; anything else is refused here, before it travels)."""
    if not (isinstance(spec, dict) and isinstance(spec.get("data"), str)):
        raise PageError("bad_video", "choose a clip to continue: `video` is {\"data\": BASE64, \"name\": FILE}")
    data = uploaded(spec, limit, "video", "clips (the decoder takes a start message of 32 MiB at most); trim the "
                                          "clip to a few seconds")
    if not is_video(data):
        raise PageError("bad_video", f"{upload_name(spec)} is not an MP4 or WebM video; choose a short .mp4 or "
                                     ".webm clip")
    return data


def is_video(data: bytes) -> bool:
    """An ISO media file (MP4: an `ftyp` box first) or a Matroska one (WebM: the EBML magic)."""
    return data[4:8] == b"ftyp" or data[:4] == b"\x1a\x45\xdf\xa3"


def uploaded(spec: dict[str, Any], limit: int, kind: str, limit_of: str) -> bytes:
    """The bytes of a base64 upload, its size checked on the base64 text first; `limit_of` ends the message."""
    too_large = PageError(f"{kind}_too_large", f"{upload_name(spec)} is larger than the gateway's limit of "
                                                f"{mib(limit)} for {limit_of}")
    if len(spec["data"]) > 4 * (-(-limit // 3)):
        raise too_large
    try:
        data = base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError):
        raise PageError(f"bad_{kind}", f"{upload_name(spec)}: the upload is not valid base64") from None
    if len(data) > limit:  # the base64 bound is exact to 3 bytes only
        raise too_large
    return data


def upload_name(spec: dict[str, Any]) -> str:
    return str(spec.get("name", "the upload"))[:200]


def mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"
