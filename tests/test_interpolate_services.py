"""Frame interpolation (EDEN, tiny config) through the real encoder and decoder services: the client's frames equal
the in-process batch CLI's for every payload, x2 and x4; bad input gets INVALID_ARGUMENT with what to fix; a 1080p
pair fits the message limits in every payload."""
from __future__ import annotations

import io
import re

import grpc
import numpy as np
import pytest
from PIL import Image

from service_harness import metric_value  # also: services use this process's thread count (bitwise-equal frames)
from test_hardening_decoder import ico_wrapping, png_of_zeros, rss_mb
from worldstream.cli import main as services_cli
from worldstream.client.__main__ import main as client_cli
from worldstream.client.interpolate import interpolate, read_video
from worldstream.client.video import VideoWriter
from worldstream.engine.config import load_config
from worldstream.engine.eden import EdenInterpolator
from worldstream.interpolate import interpolated_clip
from worldstream.serving.processes import ServiceStack
from worldstream.v1 import interpolation_pb2, interpolation_pb2_grpc

CONFIG = "eden/interpolate_tiny"
OVERRIDES = ["limits.max_pixels=2088960"]  # the full-size limit (1088 x 1920), for the 1080p pair
CLIENT_PAYLOADS = {"tokens": "tokens_fp32", "tokens-bf16": "tokens_bf16", "frames": "frames",
                   "frames-jpeg": "frames_jpeg"}
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with ServiceStack(CONFIG, tmp_path_factory.mktemp("interpolate"), OVERRIDES, startup_timeout=120) as stack:
        yield stack


@pytest.fixture(scope="module")
def interpolator():
    return EdenInterpolator(load_config(CONFIG, OVERRIDES))


def clip(frames: int, height: int = 40, width: int = 72, seed: int = 0) -> list[np.ndarray]:
    """Frames of a slowly moving, noisy gradient (neighbouring frames alike, as in a video)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], axis=-1)
    return [np.clip(np.roll(base, 3 * t, axis=1) + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            for t in range(frames)]


def encoded(frame: np.ndarray, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format=format, **options)
    return buffer.getvalue()


def in_process(interpolator, frames, **kwargs) -> np.ndarray:
    output: list[np.ndarray] = []
    interpolated_clip(interpolator, iter(frames), sink=output.append, **kwargs)
    return np.stack(output)


@pytest.mark.parametrize("factor, payload, input_format", [
    (2, "tokens", "raw"), (2, "frames", "raw"), (4, "tokens", "raw"), (4, "frames", "raw"),
    (2, "tokens-bf16", "png"), (2, "frames-jpeg", "png")])
def test_services_give_the_batch_clis_frames(services, interpolator, factor, payload, input_format):
    frames = clip(8)  # 7 pairs: batches of 3, 3 and 1
    result = interpolate(services.address, frames, factor=factor, batch=3, payload=payload, input_format=input_format,
                         frame_encoding="raw", seed=11, keep=True)
    expected = in_process(interpolator, frames, factor=factor, batch=3, seed=11, payload=CLIENT_PAYLOADS[payload])
    assert result.frames.shape == (7 * factor + 1, 40, 72, 3)
    assert np.array_equal(result.frames, expected)
    assert np.array_equal(result.frames[::factor], np.stack(frames))  # the input frames at t * factor
    assert [(b.first_pair, b.pairs) for b in result.batches] == [(0, 3), (3, 3), (6, 1)]
    assert (result.end.input_frames, result.end.pairs, result.end.frames_sent) == (8, 7, 7 * (factor - 1))
    assert result.info.payload == interpolation_pb2.PairPayload.Value(f"PAIR_PAYLOAD_{CLIENT_PAYLOADS[payload].upper()}")
    assert all({"encode", "transfer", "decode", "frame_encode"} <= set(b.stage_seconds) for b in result.batches)


def test_jpeg_output_is_the_raw_output_compressed(services):
    frames = clip(3)
    raw = interpolate(services.address, frames, batch=2, frame_encoding="raw", keep=True).frames
    jpeg = interpolate(services.address, frames, batch=2, frame_encoding="jpeg", jpeg_quality=95, keep=True).frames
    assert np.array_equal(jpeg[::2], raw[::2])  # the client's own frames
    for new_jpeg, new_raw in zip(jpeg[1::2], raw[1::2]):
        assert np.array_equal(new_jpeg, np.asarray(Image.open(io.BytesIO(encoded(new_raw, "JPEG", quality=95)))))


def test_the_two_commands_write_the_same_video(services, tmp_path):
    source = tmp_path / "in.mp4"
    with VideoWriter(source, fps=8) as writer:
        writer.write(np.stack(clip(6)))
    batch_out, service_out = tmp_path / "batch.mp4", tmp_path / "services.mp4"
    assert services_cli(["interpolate", "--config", CONFIG, *sum((["--set", o] for o in OVERRIDES), []), "--video",
                         str(source), "--factor", "4", "--batch", "2", "--out", str(batch_out)]) == 0
    assert client_cli(["interpolate", "--address", services.address, "--video", str(source), "--factor", "4",
                       "--batch", "2", "--raw", "--out", str(service_out)]) == 0
    frames, fps, _ = read_video(service_out)
    service_frames = np.stack(list(frames)).astype(np.int16)
    assert fps == 32 and len(service_frames) == 5 * 4 + 1
    batch_frames, batch_fps, _ = read_video(batch_out)
    batch_frames = np.stack(list(batch_frames)).astype(np.int16)
    # The same frames through two processes each: equal up to the last bit of a float reduction, which the lossy
    # mp4 encoding may turn into a level here and there (byte-identical files are the usual outcome, not a rule).
    assert batch_fps == fps and batch_frames.shape == service_frames.shape
    assert np.abs(batch_frames - service_frames).mean() < 0.5




def status_of(address: str, start: interpolation_pb2.InterpolateStart, frames: list[bytes]) -> grpc.RpcError:
    requests = [interpolation_pb2.InterpolateRequest(start=start),
                *(interpolation_pb2.InterpolateRequest(frame=interpolation_pb2.ClipFrame(data=data)) for data in frames)]
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as error:
            list(interpolation_pb2_grpc.FrameInterpolationServiceStub(channel).Interpolate(iter(requests), timeout=60))
    return error.value


FRAME = clip(1)[0]
PNG = encoded(FRAME, "PNG")
RAW = interpolation_pb2.CLIP_FRAME_FORMAT_RAW_RGB


@pytest.mark.parametrize("start, frames, message", [
    ({}, [PNG, encoded(clip(1, 48, 72)[0], "PNG")], "frame 1 is 48x72, but the clip's frames are 40x72"),
    ({"frame_format": RAW}, [FRAME.tobytes(), FRAME[:32].tobytes()],
     "frame 1 has 6912 bytes; a RAW_RGB frame of 40x72 has 8640"),
    ({"height": 31}, [], "frames of 31x72 are too small: both sides must be at least 32"),
    ({"height": 1088, "width": 1928}, [], "exceed this server's limit of 2088960 pixels per frame"),
    ({}, [PNG], "the clip has 1 frame: send at least 2 frames"),
    ({}, [], "the clip has 0 frames"),
    ({}, [PNG, b"not an image"], r"frame 1 \(12 bytes\) is not a PNG or JPEG file"),
    ({}, [PNG, PNG, PNG[:len(PNG) // 2]], "frame 2: .*not a decodable image"),  # found by the encoder's decode
    ({"factor": 4, "batch": 1}, [PNG, PNG, PNG[:len(PNG) // 2]], "frame 2: .*not a decodable image"),
    ({"batch": 9}, [PNG, PNG], "batch of 9 pairs exceeds this server's limit of 8 pairs per forward; send 1 to 8"),
    ({"factor": 3}, [PNG, PNG], "factor 3: use 2"),
])
def test_bad_input_is_invalid_argument_with_what_to_fix(services, start, frames, message):
    errors_before = metric_value(services.decoder_metrics_port, "worldstream_decoder_errors_total",
                                 {"code": "INVALID_ARGUMENT"})
    error = status_of(services.address, interpolation_pb2.InterpolateStart(**{"height": 40, "width": 72, **start}),
                      frames)
    assert error.code() == Code.INVALID_ARGUMENT
    assert re.search(message, error.details()), error.details()
    assert metric_value(services.decoder_metrics_port, "worldstream_decoder_errors_total",
                        {"code": "INVALID_ARGUMENT"}) == errors_before + 1


@pytest.mark.parametrize("hostile", [ico_wrapping(png_of_zeros(12_000, 12_000)), png_of_zeros(12_000, 12_000)],
                         ids=["ico-of-144-megapixels", "png-of-144-megapixels"])
def test_hostile_frames_are_refused_from_their_header_and_the_service_goes_on(services, hostile):
    """A frame claiming 144 megapixels (as an ICO, whose reader decodes on open, or a PNG) is refused before any
    pixel is decoded; the decoder's memory stays where it was and the next clip is served."""
    rss = rss_mb(services.decoder.process.pid)
    error = status_of(services.address, interpolation_pb2.InterpolateStart(height=40, width=72), [PNG, hostile])
    assert error.code() == Code.INVALID_ARGUMENT
    assert re.search(r"frame 1 \(\d+ bytes\) is not a PNG or JPEG file", error.details()), error.details()
    assert rss_mb(services.decoder.process.pid) - rss < 32
    assert len(interpolate(services.address, clip(2), keep=True).frames) == 3


@pytest.mark.parametrize("payload", CLIENT_PAYLOADS)
def test_a_1080p_pair_fits_the_message_limits_in_every_payload(services, payload):
    frames = [np.full((1080, 1920, 3), value, dtype=np.uint8) for value in (60, 90)]
    result = interpolate(services.address, frames, batch=1, payload=payload, frame_encoding="raw", keep=True)
    assert result.frames.shape == (3, 1080, 1920, 3) and np.array_equal(result.frames[::2], np.stack(frames))
    # above the encoder -> decoder limit of 1 MiB per message (but the flat JPEGs): the payload went in chunks
    assert result.payload_bytes > (1 << 20) or payload == "frames-jpeg"
