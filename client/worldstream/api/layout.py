"""How a session's blocks map to pixel frames and to action rows (spec §2.7, §3.4, §3.5): the one place of that
arithmetic. The server builds its `BlockLayout` from its config, a client from `SessionInfo`.

Actions live at pixel rate: one row per output frame. With n latent frames per block and temporal stride s (the
VAE's temporal compression), latent frame f covers pixel frame 0 (f = 0) or pixel frames [s(f-1)+1, sf+1).
So block 0 spans 1 + s(n-1) frames and every later block sn (Matrix-Game-2, n = 3, s = 4: 9, then 12), and a
session of B blocks has snB - (s-1) rows. Latent frame f is conditioned on the W rows [sf-W, sf-1] (rows < 0
read row 0; W = 12), so block b reads the rows [snb-W, sn(b+1)-s-1]: the tail of the previous block's action and
most of its own (the model's built-in latency).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockLayout:
    frames_per_block: int  # latent frames per block
    temporal_stride: int  # pixel frames per latent frame
    window_frames: int | None = None  # action rows one latent frame reads (model side; None where not needed)

    def __post_init__(self):
        if self.frames_per_block < 1 or self.temporal_stride < 1:
            raise ValueError(f"frames_per_block and temporal_stride must be >= 1, got {self.frames_per_block} "
                             f"and {self.temporal_stride}")
        if self.window_frames is not None and self.window_frames < 1:
            raise ValueError(f"window_frames must be >= 1, got {self.window_frames}")

    @classmethod
    def from_block_frames(cls, first_block_frames: int, block_frames: int) -> BlockLayout:
        """The layout whose block 0 has `first_block_frames` pixel frames and later blocks `block_frames`
        (as `SessionInfo` states them): 1 + s(n-1) and sn give s and n."""
        stride = block_frames - first_block_frames + 1
        if stride < 1 or block_frames < stride or block_frames % stride:
            raise ValueError(f"block 0 with {first_block_frames} pixel frames and later blocks with {block_frames} "
                             "fit no layout (expected 1 + s*(n-1) and s*n for n latent frames of stride s)")
        return cls(block_frames // stride, stride)

    @property
    def first_block_frames(self) -> int:
        return 1 + self.temporal_stride * (self.frames_per_block - 1)

    @property
    def block_frames(self) -> int:
        """Pixel frames of every block after block 0."""
        return self.temporal_stride * self.frames_per_block

    def frames(self, b: int) -> int:
        """Pixel frames of block b."""
        return self.first_block_frames if b == 0 else self.block_frames

    def track_frames(self, blocks: int) -> int:
        """Pixel frames (action rows) of a session of `blocks` blocks."""
        return self.block_frames * blocks - (self.temporal_stride - 1)

    def span(self, b: int) -> tuple[int, int]:
        """[start, stop) of block b's own pixel rows."""
        stop = self.track_frames(b + 1)
        return (0 if b == 0 else stop - self.block_frames), stop

    def blocks_in_track(self, rows: int, what: str) -> int:
        """Number of blocks of a full pixel-rate track of `rows` rows (ValueError unless it is whole blocks)."""
        blocks, extra = divmod(rows + self.temporal_stride - 1, self.block_frames)
        if blocks < 1 or extra:
            whole = ", ".join(str(self.track_frames(b)) for b in (1, 2, 3))
            raise ValueError(f"{what} has {rows} rows; a track of B blocks has {self.block_frames}*B-"
                             f"{self.temporal_stride - 1} rows ({whole}, ...)")
        return blocks

    def window(self, b: int) -> tuple[int, int]:
        """[start, stop) of the rows block b's action module reads; start < 0 for the first blocks, whose
        rows before 0 read row 0."""
        if self.window_frames is None:
            raise ValueError("this layout has no action window (window_frames); it comes from the model config")
        start = self.block_frames * b - self.window_frames
        return start, start + self.temporal_stride * (self.frames_per_block - 1) + self.window_frames
