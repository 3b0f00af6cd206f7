import io

import av
import numpy as np
import pytest
import torch
from PIL import Image

from worldstream.api.benchmark import benchmark_trajectory
from worldstream.api.layout import BlockLayout
from worldstream.api.spaces import ACTION_SPACES
from worldstream.api.trajectory import split_track
from worldstream.client.frames import decode_jpeg
from worldstream.client.video import VideoWriter
from worldstream.media import encode_jpeg, load_image

MG2 = BlockLayout(frames_per_block=3, temporal_stride=4)


def decode_mp4(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.codec_context.name, stream.average_rate


def gradient_frames(t, h, w):
    """Smooth moving gradients (no hard edges, so yuv420p chroma subsampling loses little)."""
    y = np.linspace(0, 200, h, dtype=np.float32)[None, :, None]
    x = np.linspace(0, 200, w, dtype=np.float32)[None, None, :]
    k = np.arange(t, dtype=np.float32)[:, None, None] * 2
    frames = np.stack(np.broadcast_arrays(y + k, x + k, np.full((t, 1, 1), 128.0)), axis=-1)
    return frames.astype(np.uint8)


def test_mp4_round_trip_with_overlay(tmp_path):
    space = ACTION_SPACES["universal"]
    kb, mouse = benchmark_trajectory(space, MG2.track_frames(2), seed=0)
    blocks = split_track(MG2, kb, mouse)
    path = tmp_path / "out.mp4"
    frames = gradient_frames(21, 96, 160)
    with VideoWriter(path, fps=16, overlay=True, action_space=space) as writer:
        writer.write(frames[:9], blocks[0])
        writer.write(frames[9:], space.from_names(["forward"], [0.0, 0.1]))  # held action
    decoded, codec, rate = decode_mp4(path)
    assert codec in ("h264", "mpeg4") and writer.codec in ("libx264", "mpeg4")
    # Frames lower than HUD_MIN_HEIGHT are enlarged (here 3x, nearest) so the HUD stays in a corner.
    assert len(decoded) == 21 and decoded[0].shape == (288, 480, 3) and rate == 16
    enlarged = frames[5].repeat(3, axis=0).repeat(3, axis=1).astype(int)
    err = np.abs(decoded[5][72:, 160:].astype(int) - enlarged[72:, 160:]).mean()
    assert err < 4
    hud = np.abs(decoded[5][:20, :40].astype(int) - enlarged[:20, :40]).mean()
    assert hud > 20


def test_mp4_pads_odd_sizes_and_rejects_changes(tmp_path):
    path = tmp_path / "odd.mp4"
    with VideoWriter(path, fps=12) as writer:
        writer.write(gradient_frames(4, 33, 47))
        assert writer.size == (34, 48)
        with pytest.raises(ValueError, match="differs"):
            writer.write(gradient_frames(1, 40, 48))
        with pytest.raises(ValueError, match="uint8"):
            writer.write(np.zeros((1, 33, 47, 3), dtype=np.float32))
        writer.write(gradient_frames(1, 33, 47), ACTION_SPACES["templerun"].idle_action())  # no overlay: ignored
    with pytest.raises(ValueError, match="action_space"):
        VideoWriter(path, fps=16, overlay=True)
    with pytest.raises(ValueError, match="fps must be positive"):
        VideoWriter(path, fps=0)
    decoded, _, rate = decode_mp4(path)
    assert len(decoded) == 5 and decoded[0].shape == (34, 48, 3) and rate == 12


def test_jpeg_round_trip():
    frame = torch.from_numpy(gradient_frames(1, 64, 96)[0])  # the server encodes torch frames
    data = encode_jpeg(frame, quality=95)
    assert data[:2] == b"\xff\xd8"
    back = decode_jpeg(data)  # the client decodes to numpy
    assert back.dtype == np.uint8 and back.shape == frame.shape
    assert np.abs(back.astype(int) - frame.numpy().astype(int)).mean() < 3
    with pytest.raises(ValueError, match="not a decodable JPEG"):
        decode_jpeg(data[:20])
    assert len(encode_jpeg(frame, quality=30)) < len(data)
    with pytest.raises(ValueError):
        encode_jpeg(frame, quality=0)


def test_load_image(tmp_path):
    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (10, 20, 30, 40)).save(buf, format="PNG")
    image = load_image(buf.getvalue())
    assert image.mode == "RGB" and image.size == (20, 10) and image.getpixel((0, 0)) == (10, 20, 30)
    path = tmp_path / "img.png"
    path.write_bytes(buf.getvalue())
    assert load_image(path).size == (20, 10)
    with pytest.raises(ValueError, match="not a decodable image"):
        load_image(b"definitely not an image")
    jpeg = encode_jpeg(torch.from_numpy(gradient_frames(1, 64, 64)[0]))
    with pytest.raises(ValueError, match="not a decodable image"):
        load_image(jpeg[: len(jpeg) // 2])  # truncated
    with pytest.raises(ValueError, match="exceeds"):
        load_image(jpeg, max_pixels=100)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
