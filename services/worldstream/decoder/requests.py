"""What a client sends to the decoder, checked before the decoder spends memory or time on it.

gRPC hands the Session call its requests as raw bytes (see `server.add_to_server`). Each message's size is checked
against the limit of its kind before it is parsed: the first message is a `start`, at most the image limit plus a
little (an image or a clip); every later one is an `action` or `stop`, a few hundred bytes in any of the action's
forms, or a `switch_prompt`, a prompt's limit plus a few bytes. A message that does not parse (truncated, corrupt)
is INVALID_ARGUMENT. A start is parsed and validated, its image checked from the header, on a worker thread: it
may be 32 MiB.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from worldstream.api.spaces import ACTION_SPACES
from ..engine.generator import DecoderModels
from ..engine.text import check_prompt
from ..media import MAX_IMAGE_BYTES, probe_image
from ..serving.aio import Requests, first_request
from ..serving.errors import ServiceError, echo
from ..serving.memory import LARGE_MESSAGE_BYTES, HeapTrimmer
from ..serving.metrics import ServiceMetrics
from worldstream.v1 import session_pb2

# The fields of a start other than the image (mode, seed, options) take a few dozen bytes.
START_MAX_BYTES = MAX_IMAGE_BYTES + (4 << 10)
# A prompt is a sentence or a paragraph; the model reads 512 tokens of it at most.
MAX_PROMPT_BYTES = 64 << 10
# A `switch_prompt` is its prompt and a few bytes of framing (tags and lengths).
SWITCH_MAX_BYTES = MAX_PROMPT_BYTES + 16
# An action is a few hundred bytes at most (12 per-frame rows of a 7-key keyboard and a mouse are ~600 B).
ACTION_MAX_BYTES = 4 << 10
DEFAULT_JPEG_QUALITY = 85
_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_NOT_FIRST = "`{kind}` is only allowed as the first message; send `action`, `switch_prompt` or `stop`"


def _tag(field: str) -> bytes:
    """How a serialized SessionRequest holding `field` begins: the field's key (number, wire type 2 =
    length-delimited)."""
    return bytes([session_pb2.SessionRequest.DESCRIPTOR.fields_by_name[field].number << 3 | 2])


_START_TAG, _SWITCH_TAG = _tag("start"), _tag("switch_prompt")


class ClientMessages:
    """The requests of one Session call, each checked against its kind's size limit, then parsed. A large one
    asks `trimmer` to return the memory gRPC received it in (see serving.memory)."""

    def __init__(self, context: grpc.aio.ServicerContext, metrics: ServiceMetrics, trimmer: HeapTrimmer):
        self._requests = Requests(context)
        self._metrics = metrics
        self._trimmer = trimmer
        self._count = 0

    async def first(self, timeout: float) -> bytes:
        """The first message, still serialized (`parse_start` parses it), within the size limit of a start."""
        raw = self._received(await first_request(self._requests, timeout, "a `start` request"))
        self._check_size(raw, START_MAX_BYTES, "the first message (`start`)")
        return raw

    async def next(self) -> session_pb2.SessionRequest | None:
        """The next message, parsed, an `action`, a `switch_prompt` (its prompt checked) or a `stop`; None once the
        client half-closed."""
        raw = await anext(self._requests, None)
        if raw is None:
            return None
        self._received(raw)
        if raw[:1] == _START_TAG:  # recognised before the size check, which a start would fail
            raise ServiceError(_INVALID, _NOT_FIRST.format(kind="start"))
        if raw[:1] == _SWITCH_TAG:
            if len(raw) > SWITCH_MAX_BYTES:  # the prompt's own limit, as for start.prompt: INVALID_ARGUMENT
                raise ServiceError(_INVALID, f"message #{self._count}: a `switch_prompt` of {len(raw)} bytes; its "
                                             f"prompt may have at most {MAX_PROMPT_BYTES} (the model reads its first "
                                             "512 tokens)")
        else:
            self._check_size(raw, ACTION_MAX_BYTES, "an `action` or `stop`")
        request = parse_request(raw, self._count)
        kind = request.WhichOneof("request")
        if kind not in ("action", "stop", "switch_prompt"):
            raise ServiceError(_INVALID, _NOT_FIRST.format(kind=kind or "an empty request"))
        if kind == "switch_prompt":  # cleaning 64 KiB takes ~60 ms: not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, check_prompt_field, request.switch_prompt.prompt,
                                                             "switch_prompt.prompt")
        return request

    def _received(self, raw: bytes) -> bytes:
        self._count += 1
        self._metrics.bytes_received.inc(len(raw))
        if len(raw) >= LARGE_MESSAGE_BYTES:
            self._trimmer.soon()
        return raw

    def _check_size(self, raw: bytes, limit: int, what: str) -> None:
        if len(raw) > limit:
            raise ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"message #{self._count} has {len(raw)} bytes; {what} may have at most {limit}")


def parse_request(raw: bytes, number: int) -> session_pb2.SessionRequest:
    try:
        return session_pb2.SessionRequest.FromString(raw)
    except DecodeError as e:
        raise ServiceError(_INVALID, f"message #{number} ({len(raw)} bytes) is not a SessionRequest: {e} "
                                     "(truncated or corrupt protobuf)") from None


def require_start(request: Any) -> Any:
    """The `start` of a client's first message (any public API's request with a `request` oneof);
    INVALID_ARGUMENT otherwise."""
    if request.WhichOneof("request") != "start":
        raise ServiceError(_INVALID, f"the first message must be `start`, got "
                                     f"`{request.WhichOneof('request') or 'an empty request'}`")
    return request.start


def parse_frame_output(start: Any) -> tuple[int, int]:
    """The frame_encoding and jpeg_quality a start asks for (any public API's start with these two fields),
    defaults filled in; INVALID_ARGUMENT if out of range."""
    encoding = start.frame_encoding or session_pb2.FRAME_ENCODING_JPEG
    if encoding not in (session_pb2.FRAME_ENCODING_JPEG, session_pb2.FRAME_ENCODING_RAW_RGB):
        raise ServiceError(_INVALID, f"unknown frame_encoding {start.frame_encoding}; use JPEG or RAW_RGB")
    quality = start.jpeg_quality or DEFAULT_JPEG_QUALITY
    if quality > 100:
        raise ServiceError(_INVALID, f"jpeg_quality must be in [1, 100] (0 = {DEFAULT_JPEG_QUALITY}), got "
                                     f"{start.jpeg_quality}")
    return encoding, quality


@dataclass(frozen=True)
class StartOptions:
    mode: str
    image: bytes  # image-and-action families
    prompt: str  # text-to-video families (with `video`: what follows the clip)
    video: bytes  # a clip to continue (text-to-video deployments that condition on videos), or empty
    video_prompt: str  # what `video` shows
    seed: int
    max_blocks: int
    frame_encoding: int
    jpeg_quality: int
    pacing: int
    whole_blocks: bool  # one BlockChunk per block with all its frames (no BlockFrames before it)


def parse_start(raw: bytes, models: DecoderModels) -> StartOptions:
    """Parse the first message and check it against what this server runs, the image from its header; a
    ServiceError(INVALID_ARGUMENT) says what to fix. An empty mode means the server's. Runs on a worker thread."""
    start = require_start(parse_request(raw, 1))
    mode = start.mode or models.mode
    if mode not in ACTION_SPACES and mode != models.mode:
        raise ServiceError(_INVALID, f"unknown mode {echo(start.mode)}; Matrix-Game-2 modes are "
                                     f"{sorted(ACTION_SPACES)} and this server runs {models.mode!r}")
    if mode != models.mode:
        raise ServiceError(_INVALID, f"this server runs mode {models.mode!r}, not {start.mode!r}; connect to a "
                                     f"{start.mode} deployment")
    image, prompt, video, video_prompt = _conditioning(start, models)
    limit, why = models.max_blocks, models.block_limit
    if video:  # the clip's latents take positions of the session's reach too
        clip_blocks = -(-int(models.cfg.conditioning.max_latents) // models.frames_per_block)
        limit, why = limit - clip_blocks, f"{why}, less {clip_blocks} for the clip's latents at most"
    max_blocks = start.max_blocks or limit
    if max_blocks > limit:
        raise ServiceError(_INVALID, f"max_blocks {start.max_blocks} exceeds this server's limit of "
                                     f"{limit} blocks{' with `video`' if video else ''} ({why})")
    encoding, quality = parse_frame_output(start)
    pacing = start.pacing or session_pb2.PACING_LOCKSTEP
    if pacing not in (session_pb2.PACING_LOCKSTEP, session_pb2.PACING_REALTIME):
        raise ServiceError(_INVALID, f"unknown pacing {start.pacing}; use LOCKSTEP or REALTIME")
    return StartOptions(mode, image, prompt, video, video_prompt, start.seed, max_blocks, encoding, quality, pacing,
                        start.whole_blocks)


def check_prompt_field(prompt: str, where: str) -> None:
    """INVALID_ARGUMENT unless `prompt` (the field `where`) is within the size cap, checked first, and not empty
    once cleaned."""
    size = len(prompt.encode())
    if size > MAX_PROMPT_BYTES:
        raise ServiceError(_INVALID, f"{where} has {size} bytes; at most {MAX_PROMPT_BYTES} (the model reads its "
                                     "first 512 tokens)")
    try:
        check_prompt(prompt)
    except ValueError as e:
        raise ServiceError(_INVALID, f"{where}: {e}") from None


def _conditioning(start: session_pb2.StartSession, models: DecoderModels) -> tuple[bytes, str, bytes, str]:
    """The start's image (image-and-action families) or prompt, and a clip with its prompt where given
    (text-to-video), as the deployment's family takes."""
    family = f"{models.cfg.family} ({models.mode})"
    if models.text_to_video:
        if start.image:
            raise ServiceError(_INVALID, f"this server runs {family}, text-to-video: start the session with "
                                         "`prompt`, not `image` (image sessions need an image-model deployment)")
        check_prompt_field(start.prompt, "start.prompt")
        video = start.video  # a copy: read it once
        if not video:
            if start.video_prompt:
                raise ServiceError(_INVALID, "start.video_prompt is set without `video`: send the clip it describes, "
                                             "or drop it")
            return b"", start.prompt, b"", ""
        if not models.continues_videos:
            raise ServiceError(_INVALID, f"this server runs {family}, which does not continue videos: drop `video` "
                                         "(video-conditional sessions need a LongLive deployment, e.g. "
                                         "longlive/interactive)")
        if not start.video_prompt:
            raise ServiceError(_INVALID, "start.video_prompt is empty: a session that continues `video` needs the "
                                         "prompt that describes the clip (its frames are cached under it) besides "
                                         "`prompt` (what follows)")
        check_prompt_field(start.video_prompt, "start.video_prompt")
        return b"", start.prompt, video, start.video_prompt
    if start.prompt or start.video or start.video_prompt:
        field = "prompt" if start.prompt else "video" if start.video else "video_prompt"
        raise ServiceError(_INVALID, f"this server runs {family}, which starts from an image and takes actions: "
                                     f"send `image`, not `{field}` (prompts and clips need a text-to-video "
                                     "deployment, e.g. selfforcing/t2v or longlive/interactive)")
    image = start.image  # a copy: read it once
    if not image:
        raise ServiceError(_INVALID, "start.image is empty: send the first frame as PNG or JPEG bytes")
    try:
        probe_image(image)
    except ValueError as e:
        raise ServiceError(_INVALID, f"start.image: {e}") from None
    return image, "", b"", ""
