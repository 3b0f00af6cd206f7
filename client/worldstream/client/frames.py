"""The frames of a received block as numpy uint8 arrays [T, H, W, 3]."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from worldstream.v1 import session_pb2


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes -> uint8 RGB frame [H, W, 3] (ValueError if undecodable)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"frame bytes ({len(data)} B): not a decodable JPEG ({e})") from None


def decode_frames(block: session_pb2.BlockChunk | session_pb2.BlockFrames | session_pb2.VideoFrames,
                  info: session_pb2.SessionInfo, where: str | None = None) -> np.ndarray:
    """The frames of a `block` or `block_frames` response (or of a `video_frames` one, named by `where`) as uint8
    [T, H, W, 3]."""
    where = where or f"block {block.block_index}"
    shape = (info.height, info.width, 3)
    if info.frame_encoding == session_pb2.FRAME_ENCODING_RAW_RGB:
        size = info.height * info.width * 3
        for data in block.frames:
            if len(data) != size:
                raise ValueError(f"{where}: a raw frame of {len(data)} bytes, expected "
                                 f"{info.height}x{info.width}x3 = {size}")
        frames = [np.frombuffer(data, dtype=np.uint8).reshape(shape) for data in block.frames]
    else:
        frames = [decode_jpeg(data) for data in block.frames]
        for frame in frames:
            if frame.shape != shape:
                raise ValueError(f"{where}: a JPEG frame of {frame.shape[0]}x{frame.shape[1]}, "
                                 f"the session's frames are {info.height}x{info.width}")
    return np.stack(frames)
