"""MP4 writing with an optional action HUD. PyAV is imported when a video is opened, so the client runs
without it (`pip install 'worldstream-client[video]'` adds it)."""
from __future__ import annotations

import os
import warnings
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from worldstream.api.spaces import ActionSpace, BlockAction


def import_av() -> ModuleType:
    """PyAV, or a RuntimeError that says how to install it."""
    try:
        import av
    except ImportError:
        raise RuntimeError("writing mp4 needs PyAV, which is not installed: pip install 'worldstream-client[video]'"
                           ) from None
    return av


def _as_frames(frames: np.ndarray) -> np.ndarray:
    array = np.asarray(frames)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {array.dtype} {list(array.shape)}")
    return array


def _encoder_available(av: ModuleType, codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
        return True
    except ValueError:  # av's UnknownCodecError
        return False


class VideoWriter:
    """Writes uint8 RGB frames to an H.264 (yuv420p) MP4. Odd frame sizes are padded by one edge row/column
    (yuv420p needs even sizes). With `overlay`, frames written with an action get a HUD of that action in
    `action_space`; frames lower than HUD_MIN_HEIGHT are first enlarged by an integer factor (nearest
    neighbour), so that the HUD covers a corner of a tiny config's frames rather than most of them.
    Falls back to MPEG-4 Part 2 (with a warning) if this PyAV build has no libx264; `codec` says which."""

    def __init__(self, path: str | os.PathLike, fps: int | Fraction, crf: int = 18, overlay: bool = False,
                 action_space: ActionSpace | None = None):
        if overlay and action_space is None:
            raise ValueError("the action overlay needs the action_space (key names) of the mode")
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self._av = import_av()
        self.path = Path(path)
        self.fps = Fraction(fps)
        self.crf = crf
        self.hud_space = action_space if overlay else None
        self.codec = "libx264"
        if not _encoder_available(self._av, self.codec):
            warnings.warn("PyAV has no libx264 encoder; writing MPEG-4 Part 2 ('mpeg4') instead", RuntimeWarning)
            self.codec = "mpeg4"
        self.size: tuple[int, int] | None = None  # (height, width) as encoded, before any HUD enlargement
        self.scale = 1  # HUD enlargement factor
        self.frames_written = 0
        self._container = None
        self._stream = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, height: int, width: int) -> None:
        self.size = (height + height % 2, width + width % 2)
        if self.hud_space is not None:
            self.scale = -(-HUD_MIN_HEIGHT // self.size[0])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = self._av.open(str(self.path), mode="w")
        stream = self._container.add_stream(self.codec, rate=self.fps)
        stream.height, stream.width = self.size[0] * self.scale, self.size[1] * self.scale
        stream.pix_fmt = "yuv420p"
        if self.codec == "libx264":
            stream.options = {"crf": str(self.crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 8_000_000
        self._stream = stream

    def write(self, frames: np.ndarray, action: BlockAction | None = None) -> None:
        """Append frames uint8 [T, H, W, 3]. `action` (drawn with `overlay`): the block's action, held (1 row)
        or one row per frame."""
        array = _as_frames(frames)
        if self._container is None:
            if self.frames_written:
                raise ValueError("writer is closed")
            self._open(array.shape[1], array.shape[2])
        height, width = self.size
        if array.shape[1] not in (height, height - 1) or array.shape[2] not in (width, width - 1):
            raise ValueError(f"frame size {array.shape[1]}x{array.shape[2]} differs from the video's {height}x{width}")
        pad = ((0, 0), (0, height - array.shape[1]), (0, width - array.shape[2]), (0, 0))
        if any(p[1] for p in pad):
            array = np.pad(array, pad, mode="edge")
        hud_rows = None
        if self.hud_space is not None and action is not None:
            hud_rows = _hud_rows(action, array.shape[0])
        for i, frame in enumerate(array):
            image = Image.fromarray(frame)
            if self.scale > 1:
                image = image.resize((image.width * self.scale, image.height * self.scale), Image.NEAREST)
            if hud_rows is not None:
                draw_action_hud(image, self.hud_space, *hud_rows[i])
            video_frame = self._av.VideoFrame.from_image(image)
            video_frame.pts = self.frames_written
            video_frame.time_base = 1 / self.fps
            for packet in self._stream.encode(video_frame):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (idempotent)."""
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = self._stream = None


def _hud_rows(action: BlockAction, n_frames: int) -> list[tuple[list[float], list[float] | None]]:
    rows = action.rows(n_frames)
    keyboard = rows.keyboard.tolist()
    mouse = rows.mouse.tolist() if rows.mouse is not None else [None] * n_frames
    return list(zip(keyboard, mouse))


HUD_MIN_HEIGHT = 288  # the HUD is ~50 px high: keep it to a corner of the frame
_HUD_BG = (0, 0, 0)
_HUD_DIM = (150, 150, 150)
_HUD_PRESSED = (255, 210, 0)


def draw_action_hud(image: Image.Image, space: ActionSpace, keyboard: list[float],
                    mouse: list[float] | None) -> None:
    """Draw key names (pressed ones highlighted) and the mouse vector in the top-left corner of `image`."""
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    line = 12
    name_width = max(int(draw.textlength(name, font=font)) for name in space.key_names) + 6
    gauge = 2 * line if mouse is not None else 0
    panel_h = max(line * space.keyboard_dim, 2 * gauge + line if mouse is not None else 0) + 4
    draw.rectangle([0, 0, name_width + 2 * gauge + 6, panel_h], fill=_HUD_BG)
    for i, (name, value) in enumerate(zip(space.key_names, keyboard)):
        top = 2 + i * line
        if value >= 0.5:
            draw.rectangle([2, top, name_width, top + line - 1], fill=_HUD_PRESSED)
        draw.text((5, top), name, fill=_HUD_BG if value >= 0.5 else _HUD_DIM, font=font)
    if mouse is not None:
        # Circle of radius `gauge`; one camera step reaches half the radius. Pitch is positive up.
        cx, cy = name_width + 4 + gauge, 2 + gauge
        draw.ellipse([cx - gauge, cy - gauge, cx + gauge, cy + gauge], outline=_HUD_DIM)
        scale = gauge / (2 * space.camera_step)
        dx = max(-gauge, min(gauge, mouse[1] * scale))
        dy = max(-gauge, min(gauge, -mouse[0] * scale))
        draw.line([cx, cy, cx + dx, cy + dy], fill=_HUD_PRESSED, width=2)
        draw.text((name_width + 4, 2 + 2 * gauge), f"{mouse[0]:+.2f},{mouse[1]:+.2f}", fill=_HUD_DIM, font=font)

