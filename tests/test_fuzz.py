"""Fuzz targets (Hypothesis): the public session API over gRPC against a real decoder + encoder process pair,
and the TensorChunk wire codec in-process.

Properties: the services never crash and answer every call with OK or a documented status and a short message;
a call that ends OK is a well-formed session (info, blocks 0..n-1 with the right frames, end); a script built
only from valid messages succeeds and its blocks echo its actions; memory, threads and sessions come back after
the run. The codec either decodes a chunk stream consistently or raises WireFormatError with a short message,
never allocating more than its cap (or the expected tensor) plus the bytes it received.

A short run is part of the suite; WORLDSTREAM_FUZZ_SCALE=20 runs twenty times as many examples. A failure prints
a `@reproduce_failure` blob, and the example is kept in .hypothesis/ for the next run.
"""
from __future__ import annotations

import functools
import io
import math
import os
import struct
import time
import tracemalloc
import zlib
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings, strategies as st
from PIL import Image

from service_harness import (CONFIG, SMALL_FRAMES, health_status, metric_value, png_bytes, running_services,
                             wait_for)
from worldstream.api.spaces import get_action_space
from worldstream.client.session import MAX_RECEIVE_BYTES
from worldstream.engine.config import load_config
from worldstream.v1 import session_pb2, tensor_pb2
from worldstream.wire import TensorAssembler, WireFormatError, pack_tensor

FUZZ_SCALE = float(os.environ.get("WORLDSTREAM_FUZZ_SCALE", "1"))
Code = grpc.StatusCode
# The statuses the session API documents for a caller's input (README "Services", session.proto). INTERNAL is a
# bug by definition, UNKNOWN an escaped exception.
DOCUMENTED = {Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE, Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE,
              Code.DEADLINE_EXCEEDED, Code.CANCELLED}
MAX_DETAILS_BYTES = 2048  # a status message says what to fix; it never echoes input at length
CALL_TIMEOUT = 30.0  # seconds; a fuzz call that reaches it has hung
SPACE = get_action_space("universal")
SERVED = load_config(CONFIG, [value for value in SMALL_FRAMES if value != "--set"])  # what the services run
SERVER_MAX_BLOCKS = int(SERVED.limits.max_blocks)
# RSS a service may keep after the run above its level after the warm-up (allocator caches, gRPC buffers).
RSS_SLACK_BYTES = 200 << 20
THREAD_SLACK = 4


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, round(examples * FUZZ_SCALE)), deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- generated images ----------------------------------------------------------------------------------------

@functools.cache
def picture(size: tuple[int, int], fmt: str) -> bytes:
    """A real picture of `size` (height, width) encoded as `fmt`."""
    if fmt == "PNG":
        return png_bytes(seed=size[0] * 7 + size[1], size=size)
    with Image.open(io.BytesIO(png_bytes(size=size))) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=fmt)
        return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, followed by a tiny compressed stream (a decompression
    bomb's header: the size must be refused before anything is decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + chunk(b"IEND", b""))


def filler(size: int, byte: int) -> bytes:
    return bytes([byte]) * size


def mutated(data: bytes, draw) -> bytes:
    """`data` truncated, with bytes overwritten, or with bytes appended."""
    how = draw(st.sampled_from(["truncate", "overwrite", "append"]))
    if how == "truncate" or not data:
        return data[:draw(st.integers(0, max(0, len(data) - 1)))]
    if how == "overwrite":
        at = draw(st.integers(0, len(data) - 1))
        patch = draw(st.binary(min_size=1, max_size=8))
        return data[:at] + patch + data[at + len(patch):]
    return data + draw(st.binary(min_size=1, max_size=64))


VALID_SIZES = [(32, 32), (48, 80), (120, 200), (64, 40)]
# Sizes near and over the limits; rare, they cost time on the wire.
LARGE_SIZES = [64 << 10, 1 << 20, 4 << 20, (30 << 20), (32 << 20) + 1]


@st.composite
def images(draw) -> tuple[bytes, bool]:
    """(image bytes, whether the image is valid by the README: PNG or JPEG, a sensible size)."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["tiny", "other-format", "bomb", "bomb", "mutated", "mutated",
                                                 "random", "random", "empty", "large"]))
    if kind == "valid":
        return picture(draw(st.sampled_from(VALID_SIZES)), draw(st.sampled_from(["PNG", "JPEG"]))), True
    if kind == "tiny":
        return picture((draw(st.integers(1, 3)), draw(st.integers(1, 3))), "PNG"), False
    if kind == "other-format":
        return picture((32, 32), draw(st.sampled_from(["GIF", "BMP", "TIFF", "WEBP", "ICO", "PPM"]))), False
    if kind == "bomb":
        return png_claiming(draw(st.integers(1, 1 << 31)), draw(st.integers(1, 1 << 31))), False
    if kind == "mutated":
        return mutated(picture(draw(st.sampled_from(VALID_SIZES)), draw(st.sampled_from(["PNG", "JPEG"]))),
                       draw), False
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512)), False
    if kind == "empty":
        return b"", False
    return filler(draw(st.sampled_from(LARGE_SIZES)), draw(st.sampled_from([0, 0x89, 0xFF]))), False


# ---- generated requests ---------------------------------------------------------------------------------------

@dataclass
class Script:
    """The messages of one call (serialized, as on the wire) and what they should do."""
    messages: list[bytes]
    valid: bool  # every message valid by construction: the call must succeed
    lockstep: bool = True  # the start's pacing (what a valid script's blocks are checked against)
    actions: list[session_pb2.Action] = field(default_factory=list)  # the valid actions, in order


@st.composite
def valid_starts(draw) -> session_pb2.StartSession:
    """A start this server accepts, for a short session."""
    return session_pb2.StartSession(
        mode=draw(st.sampled_from(["", "universal"])), image=picture(draw(st.sampled_from(VALID_SIZES)),
                                                                    draw(st.sampled_from(["PNG", "JPEG"]))),
        seed=draw(st.integers(0, 2**64 - 1)), max_blocks=draw(st.integers(1, 3)),
        frame_encoding=draw(st.sampled_from([0, 1, 2])), jpeg_quality=draw(st.integers(0, 100)),
        pacing=draw(st.sampled_from([0, 1, 2])), whole_blocks=draw(st.booleans()))


@st.composite
def starts(draw) -> tuple[session_pb2.StartSession, bool]:
    """(a start of any kind, whether it is valid)."""
    image, image_ok = draw(images())
    mode = draw(st.one_of(st.sampled_from(["", "universal"]), st.sampled_from(["gta_drive", "templerun", "doom"]),
                          st.text(max_size=40), st.integers(1, 1 << 20).map(lambda n: "m" * n)))
    max_blocks = draw(st.one_of(st.integers(1, 2), st.just(0), st.integers(0, 2**32 - 1)))
    encoding = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(-2**31, 2**31 - 1)))
    quality = draw(st.one_of(st.integers(0, 100), st.integers(0, 2**32 - 1)))
    pacing = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(-2**31, 2**31 - 1)))
    start = session_pb2.StartSession(mode=mode, image=image, seed=draw(st.integers(0, 2**64 - 1)),
                                     max_blocks=max_blocks, frame_encoding=encoding, jpeg_quality=quality,
                                     pacing=pacing)
    valid = (image_ok and mode in ("", "universal") and max_blocks <= SERVER_MAX_BLOCKS and encoding in (0, 1, 2)
             and quality <= 100 and pacing in (0, 1, 2))
    return start, valid


unit = st.floats(0, 1, width=32)
mouse_value = st.floats(-SPACE.mouse_limit, SPACE.mouse_limit, width=32)
any_float = st.floats(width=32)  # NaN, infinities, subnormals, -0.0


@st.composite
def valid_actions(draw, block_index: int | None) -> session_pb2.Action:
    """An action the universal mode accepts for `block_index` (None: REALTIME, where per-frame rows are refused)."""
    mouse = draw(st.one_of(st.just([]), st.lists(mouse_value, min_size=2, max_size=2)))
    form = draw(st.sampled_from(["idle", "keys", "keyboard"] + (["frames"] if block_index is not None else [])))
    if form == "idle":
        return session_pb2.Action(mouse=mouse)
    if form == "keys":
        return session_pb2.Action(keys=draw(st.lists(st.sampled_from(SPACE.key_names), unique=True)), mouse=mouse)
    if form == "keyboard":
        return session_pb2.Action(keyboard=draw(st.lists(unit, min_size=4, max_size=4)), mouse=mouse)
    rows = 9 if block_index == 0 else 12
    with_mouse = draw(st.booleans())
    return session_pb2.Action(frames=[session_pb2.ActionFrame(
        keyboard=draw(st.lists(unit, min_size=4, max_size=4)),
        mouse=draw(st.lists(mouse_value, min_size=2, max_size=2)) if with_mouse else []) for _ in range(rows)])


@functools.cache  # building one takes a while
def huge_vector(n: int) -> session_pb2.Action:
    return session_pb2.Action(keyboard=[0.5] * n)


hostile_actions = st.one_of(
    st.builds(session_pb2.Action, keyboard=st.lists(any_float, max_size=12), mouse=st.lists(any_float, max_size=5)),
    st.builds(session_pb2.Action, keys=st.lists(st.one_of(st.sampled_from(SPACE.key_names), st.text(max_size=30)),
                                                max_size=8)),
    st.builds(session_pb2.Action, keyboard=st.lists(unit, max_size=4), keys=st.lists(st.sampled_from(SPACE.key_names),
                                                                                    max_size=2)),
    st.builds(session_pb2.Action, frames=st.lists(st.builds(session_pb2.ActionFrame,
                                                            keyboard=st.lists(any_float, max_size=5),
                                                            mouse=st.lists(any_float, max_size=3)), max_size=14)),
    st.sampled_from([1_000, 100_000, 1_000_000, 8_400_000]).map(huge_vector),  # up to 33.6 MB, over the limit
)


def request(**fields) -> bytes:
    return session_pb2.SessionRequest(**fields).SerializeToString()


STOP = request(stop=session_pb2.StopSession())


@st.composite
def first_messages(draw) -> Script:
    """One message, then half-close: a start of any kind, another message kind, or broken bytes."""
    kind = draw(st.sampled_from(["start", "start", "start", "mutated-start", "other", "bytes"]))
    if kind in ("start", "mutated-start"):
        start, valid = draw(starts())
        message = request(start=start)
        if kind == "start":
            return Script([message], valid, start.pacing != session_pb2.PACING_REALTIME)
        return Script([mutated(message, draw)], False)
    if kind == "other":
        return Script([draw(st.sampled_from([STOP, b""])) if draw(st.booleans())
                       else request(action=draw(valid_actions(0)))], False)
    return Script([draw(st.binary(max_size=256))], False)


@st.composite
def scripts(draw) -> Script:
    """A start, then up to a dozen actions (mostly valid), stops, repeated starts or broken messages."""
    start, valid = draw(st.one_of(valid_starts().map(lambda start: (start, True)), starts()))
    lockstep = start.pacing != session_pb2.PACING_REALTIME
    script = Script([request(start=start)], valid, lockstep)
    count = draw(st.integers(0, 12))
    for index in range(count):
        kind = draw(st.sampled_from(["valid"] * 6 + ["hostile", "stop", "start", "empty", "mutated"]))
        if kind == "valid":
            action = draw(valid_actions(len(script.actions) if lockstep else None))
            script.messages.append(request(action=action))
            script.actions.append(action)
            continue
        # Only a stop as the last message keeps a script valid; anything after it is OUT_OF_RANGE.
        script.valid = script.valid and kind == "stop" and index == count - 1
        if kind == "hostile":
            script.messages.append(request(action=draw(hostile_actions)))
        elif kind == "stop":
            script.messages.append(STOP)
        elif kind == "start":
            script.messages.append(request(start=draw(starts())[0]))
        elif kind == "empty":
            script.messages.append(b"")
        else:
            script.messages.append(mutated(request(action=draw(valid_actions(index))), draw))
    # LOCKSTEP: an action beyond max_blocks is OUT_OF_RANGE.
    script.valid = script.valid and (not lockstep or len(script.actions) <= (start.max_blocks or SERVER_MAX_BLOCKS))
    return script


# ---- the services and one fuzz call ---------------------------------------------------------------------------

@dataclass
class Outcome:
    responses: list[session_pb2.SessionResponse]
    code: grpc.StatusCode
    details: str
    seconds: float


class FuzzClient:
    """Sends serialized messages as they are (broken ones included) on one channel."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length",
                                                                 MAX_RECEIVE_BYTES)])
        self.session = self.channel.stream_stream("/worldstream.v1.WorldSessionService/Session",
                                                  request_serializer=None,
                                                  response_deserializer=session_pb2.SessionResponse.FromString)
        self.calls = self.messages = 0

    def run(self, script: Script) -> Outcome:
        self.calls += 1
        self.messages += len(script.messages)
        started = time.monotonic()
        responses = []
        call = self.session(iter(script.messages), timeout=CALL_TIMEOUT)
        try:
            for response in call:
                responses.append(response)
        except grpc.RpcError:
            pass
        return Outcome(responses, call.code(), call.details() or "", time.monotonic() - started)


class Sample:
    """RSS and thread count of a process, from /proc."""

    def __init__(self, pid: int):
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
        self.rss = int(fields["VmRSS"].split()[0]) * 1024
        self.threads = int(fields["Threads"])


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("fuzz"), decoder_args=[
            "--max-sessions", "2", "--idle-timeout", "10", *SMALL_FRAMES], encoder_args=SMALL_FRAMES) as running:
        yield running


@pytest.fixture(scope="module")
def client(services):
    client = FuzzClient(services.address)
    yield client
    print(f"\nfuzz: {client.calls} calls, {client.messages} messages")
    client.channel.close()


@pytest.fixture(scope="module")
def baseline(services, client):
    """The services' threads as started, and their RSS after a warm-up that reaches every code path once (sessions
    run, rejected starts, the largest message accepted and one refused) and runs short sessions back to back, as the
    fuzz does (the encoder's memory grows with the streams it has in flight, up to a level: docs/reliability.md)."""
    warm_up = [[request(start=session_pb2.StartSession(image=picture((48, 80), "PNG"), max_blocks=2)),
                request(action=session_pb2.Action()), request(action=session_pb2.Action(keys=["left"]))],
               [request(start=session_pb2.StartSession(mode="doom"))],
               [request(start=session_pb2.StartSession(image=filler(30 << 20, 0)))],
               [request(start=session_pb2.StartSession(image=filler((32 << 20) + 1, 0)))]]
    warm_up += [[request(start=session_pb2.StartSession(image=picture(size, fmt), max_blocks=2))]
                for size in VALID_SIZES for fmt in ("PNG", "JPEG") for _ in range(4)]
    started = {name: Sample(process.process.pid).threads for name, process in services_by_name(services).items()}
    for messages in warm_up:
        client.run(Script(messages, False))
    wait_until_idle(services, started)
    return {name: (started[name], Sample(process.process.pid).rss)
            for name, process in services_by_name(services).items()}


def services_by_name(services) -> dict:
    return {"decoder": services.decoder, "encoder": services.encoder}


def wait_until_idle(services, threads: dict[str, int]) -> None:
    """Until no session is left and each service has at most THREAD_SLACK threads more than `threads` (the
    encoder finishes the work in flight of streams the decoder ended)."""
    for name, process in services_by_name(services).items():
        port = getattr(services, f"{name}_metrics_port")
        wait_for(lambda: metric_value(port, f"worldstream_{name}_sessions_active") == 0, 30,
                 f"the {name} to release every session")
        wait_for(lambda: Sample(process.process.pid).threads <= threads[name] + THREAD_SLACK, 30,
                 f"the {name}'s threads to come back to {threads[name]} + {THREAD_SLACK}")


def check(script: Script, outcome: Outcome, services) -> None:
    assert services.decoder.process.poll() is None, f"the decoder died:\n{services.decoder.log()[-3000:]}"
    assert services.encoder.process.poll() is None, f"the encoder died:\n{services.encoder.log()[-3000:]}"
    assert outcome.seconds < CALL_TIMEOUT - 1, f"the call hung ({outcome.code.name}: {outcome.details})"
    if outcome.code != Code.OK:
        assert outcome.code in DOCUMENTED, f"undocumented status {outcome.code.name}: {outcome.details}"
        assert outcome.details, f"{outcome.code.name} without a message"
        # gRPC's own verdict on a status message too long for its metadata limit: the server echoed input.
        assert "metadata size exceeds" not in outcome.details, outcome.details
        assert len(outcome.details.encode()) <= MAX_DETAILS_BYTES, (
            f"{outcome.code.name} message of {len(outcome.details.encode())} bytes: {outcome.details[:200]}...")
        assert not script.valid, f"a valid script failed with {outcome.code.name}: {outcome.details}"
    check_responses(script, outcome)


def check_responses(script: Script, outcome: Outcome) -> None:
    """Whatever arrived is a well-formed prefix of a session; an OK call is a whole one."""
    kinds = [response.WhichOneof("response") for response in outcome.responses]
    if not kinds:
        assert outcome.code != Code.OK, "a call ended OK without any response"
        return
    assert kinds[0] == "info" and "info" not in kinds[1:], kinds
    info = outcome.responses[0].info
    assert (info.height, info.width, info.mode) == (SERVED.video.height, SERVED.video.width, "universal")
    blocks, actions, frames = [], [], []  # each block's frames: its early ones (`block_frames`), then its `block`'s
    for response in outcome.responses:
        if (kind := response.WhichOneof("response")) in ("block_frames", "block"):
            part = getattr(response, kind)
            assert (part.block_index, part.first_frame) == (len(blocks), len(frames)), (kind, part.block_index,
                                                                                         part.first_frame)
            frames += part.frames
            if kind == "block":
                assert part.frame_count == len(part.frames)
                blocks.append(frames)
                actions.append(part.action)
                frames = []
    assert len(blocks) <= info.max_blocks
    for index, block in enumerate(blocks):
        assert len(block) == (info.first_block_frames if index == 0 else info.block_frames)
        for frame in block:
            if info.frame_encoding == session_pb2.FRAME_ENCODING_RAW_RGB:
                assert len(frame) == info.height * info.width * 3
            else:
                assert frame[:2] == b"\xff\xd8", "a JPEG frame that does not start with SOI"
    if "end" in kinds:
        assert kinds[-1] == "end" and kinds.count("end") == 1, kinds
        assert outcome.code == Code.OK, f"`end` sent, then {outcome.code.name}: {outcome.details}"
        assert outcome.responses[-1].end.blocks_generated == len(blocks)
    else:
        assert outcome.code != Code.OK, "a call ended OK without `end`"
    if script.valid and script.lockstep:
        assert actions == script.actions, (
            f"blocks do not echo the actions sent: {len(blocks)} blocks for {len(script.actions)} actions, "
            f"{session_pb2.Pacing.Name(info.pacing)}, responses {kinds}")


# ---- session API ----------------------------------------------------------------------------------------------

def test_first_message(services, client, baseline):
    @fuzz_settings(400)
    @given(first_messages())
    def fuzz(script):
        check(script, client.run(script), services)
    fuzz()


def test_session_scripts(services, client, baseline):
    @fuzz_settings(150)
    @given(scripts())
    def fuzz(script):
        check(script, client.run(script), services)
    fuzz()


def test_services_stay_bounded(services, client, baseline):
    """After the runs above: both services healthy, no session left, threads back near their number at start-up,
    RSS near its level after the warm-up."""
    assert health_status(services.address) == 1  # SERVING
    wait_until_idle(services, {name: threads for name, (threads, _) in baseline.items()})
    for name, process in services_by_name(services).items():
        rss = baseline[name][1]
        after = Sample(process.process.pid).rss
        assert after - rss <= RSS_SLACK_BYTES, f"{name} RSS grew from {rss >> 20} MiB to {after >> 20} MiB"


# ---- wire format ----------------------------------------------------------------------------------------------

WIRE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool]
MAX_TENSOR_BYTES = 64 << 10


@st.composite
def tensors(draw) -> torch.Tensor:
    """A tensor of any wire dtype and a small shape, with arbitrary bits (NaN payloads included)."""
    dtype = draw(st.sampled_from(WIRE_DTYPES))
    shape = draw(st.lists(st.integers(0, 6), max_size=4))
    raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(math.prod(shape) * dtype.itemsize)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    if dtype == torch.bool:
        return (flat % 2).bool().reshape(shape)
    return flat.view(dtype).reshape(shape)


def tensor_bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@fuzz_settings(300)
@given(tensors(), st.integers(1, 64))
def test_wire_round_trip(tensor, max_chunk_bytes):
    """Any tensor, any chunk size, through serialized chunks: the same bits back."""
    wire = [chunk.SerializeToString() for chunk in pack_tensor("t", tensor, max_chunk_bytes)]
    assembler = TensorAssembler(MAX_TENSOR_BYTES)
    done = [assembler.add(tensor_pb2.TensorChunk.FromString(raw)) for raw in wire]
    assert all(item is None for item in done[:-1])
    name, decoded = done[-1]
    assert name == "t" and decoded.dtype == tensor.dtype and decoded.shape == tensor.shape
    assert tensor_bits(decoded) == tensor_bits(tensor)


hostile_chunks = st.builds(
    tensor_pb2.TensorChunk, name=st.one_of(st.text(max_size=8), st.integers(1, 1 << 14).map(lambda n: "n" * n)),
    dtype=st.integers(-2**31, 2**31 - 1),
    shape=st.lists(st.one_of(st.integers(-2, 8), st.integers(-2**63, 2**63 - 1)), max_size=18),
    total_bytes=st.one_of(st.integers(0, 256), st.integers(0, 2**64 - 1)),
    offset=st.one_of(st.just(0), st.integers(0, 256), st.integers(0, 2**64 - 1)), data=st.binary(max_size=300))
Spec = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@st.composite
def chunk_streams(draw) -> tuple[list[tensor_pb2.TensorChunk], Spec | None]:
    """Valid chunk streams with edits, arbitrary chunks, and chunks parsed from arbitrary bytes; and what the
    receiver expects (nothing, the first valid tensor's dtype and shape, or another)."""
    first = draw(tensors())
    expected = draw(st.sampled_from([None, {"x": (first.dtype, tuple(first.shape))}, {"x": (torch.float32, (2, 3))}]))
    kind = draw(st.sampled_from(["edited", "edited", "hostile", "bytes"]))
    if kind == "hostile":
        return draw(st.lists(hostile_chunks, max_size=8)), expected
    if kind == "bytes":
        chunks = []
        for raw in draw(st.lists(st.binary(max_size=64), max_size=8)):
            try:
                chunks.append(tensor_pb2.TensorChunk.FromString(raw))
            except Exception:  # protobuf's DecodeError: not a chunk at all
                pass
        return chunks, expected
    chunks = [chunk for tensor in [first, *draw(st.lists(tensors(), max_size=2))]
              for chunk in pack_tensor("x", tensor, draw(st.integers(1, 64)))]
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(chunks) - 1))
        edit = draw(st.sampled_from(["replace", "insert", "drop", "duplicate", "swap", "field"]))
        if edit == "replace":
            chunks[at] = draw(hostile_chunks)
        elif edit == "insert":
            chunks.insert(at, draw(hostile_chunks))
        elif edit == "drop" and len(chunks) > 1:
            del chunks[at]
        elif edit == "duplicate":
            chunks.insert(at, chunks[at])
        elif edit == "swap":
            other = draw(st.integers(0, len(chunks) - 1))
            chunks[at], chunks[other] = chunks[other], chunks[at]
        elif edit == "field":
            chunk = tensor_pb2.TensorChunk()
            chunk.CopyFrom(chunks[at])
            field_name = draw(st.sampled_from(["name", "dtype", "shape", "total_bytes", "offset", "data"]))
            replacement = draw(hostile_chunks)
            chunk.ClearField(field_name)
            if field_name == "shape":
                chunk.shape.extend(replacement.shape)
            else:
                setattr(chunk, field_name, getattr(replacement, field_name))
            chunks[at] = chunk
    return chunks, expected


# Found by the fuzz: a tensor starting inside another, with a long name.
RESTART_WITH_LONG_NAME = [next(pack_tensor("x", torch.zeros(2), 4)),
                          tensor_pb2.TensorChunk(name="n" * 4096, dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1],
                                                 total_bytes=4, data=b"1234")]


@fuzz_settings(800)
@given(chunk_streams())
@example((RESTART_WITH_LONG_NAME, None))
def test_wire_rejects_or_decodes_consistently(stream):
    """A chunk stream decodes into tensors that match their header (and what the receiver expects), or raises a
    WireFormatError with a short message. Memory stays within the receiver's cap plus the bytes received (and
    transient copies of one message's fields)."""
    chunks, expected = stream
    assembler = TensorAssembler(MAX_TENSOR_BYTES, expected)
    cap = MAX_TENSOR_BYTES if expected is None else math.prod(expected["x"][1]) * expected["x"][0].itemsize
    header = None
    received = largest = 0
    tracemalloc.start()
    try:
        try:
            for chunk in chunks:
                if chunk.offset == 0:
                    header = chunk
                received += len(chunk.data)
                largest = max(largest, chunk.ByteSize())
                done = assembler.add(chunk)
                if done is not None:
                    name, tensor = done
                    assert name == header.name and list(tensor.shape) == list(header.shape)
                    assert tensor.numel() * tensor.element_size() == header.total_bytes <= MAX_TENSOR_BYTES
                    if expected is not None:
                        assert (tensor.dtype, tuple(tensor.shape)) == expected[name]
            assembler.finish()
        except WireFormatError as error:
            assert len(str(error)) <= MAX_DETAILS_BYTES, f"a {len(str(error))}-character error: {str(error)[:200]}"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= cap + received + 4 * largest + (256 << 10), f"peak {peak} bytes for {received} bytes received"
