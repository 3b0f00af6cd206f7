"""The pixel-rate action track of a session (spec §3.4 `replace` semantics) and the block layout of a config.

Each block's action overwrites the block's own span of the track; the model reads `window_rows(b)` (see
`worldstream.api.layout` for the arithmetic). Only Python ints and slicing are used, so writing and reading
the track never waits for a device.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from worldstream.api.layout import BlockLayout
from worldstream.api.spaces import ActionSpace, BlockAction


def config_layout(cfg: DictConfig) -> BlockLayout:
    """The block layout of a model config: `pipeline.frames_per_block` latent frames per block, the VAE's
    temporal stride (x2 per temporal down-sampling stage) and, with an action module, its window of
    `dit.action.windows_size` latent frames."""
    stride = 2 ** sum(bool(down) for down in cfg.vae.temperal_downsample)
    action = cfg.dit.get("action")
    if action is None:  # text-to-video: no actions to window
        return BlockLayout(int(cfg.pipeline.frames_per_block), stride)
    if int(action.vae_time_compression_ratio) != stride:
        raise ValueError(f"dit.action.vae_time_compression_ratio is {action.vae_time_compression_ratio}, but the "
                         f"VAE (vae.temperal_downsample) compresses time by {stride}")
    return BlockLayout(int(cfg.pipeline.frames_per_block), stride, int(action.windows_size) * stride)


class ActionTrack:
    """A session's pixel-rate action rows (float32 torch tensors), preallocated for `max_blocks` blocks."""

    def __init__(self, layout: BlockLayout, keyboard_dim: int, mouse_dim: int, max_blocks: int,
                 device: torch.device | str | None = None):
        if max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
        if mouse_dim not in (0, 2):
            raise ValueError(f"mouse_dim must be 0 or 2, got {mouse_dim}")
        layout.window(0)  # the track serves windows: fail now if the layout has none
        rows = layout.track_frames(max_blocks)
        self.layout = layout
        self.max_blocks = max_blocks
        self.keyboard = torch.zeros(rows, keyboard_dim, dtype=torch.float32, device=device)
        self.mouse = torch.zeros(rows, 2, dtype=torch.float32, device=device) if mouse_dim else None
        self.blocks_written = 0  # blocks [0, blocks_written) hold actions

    @classmethod
    def for_space(cls, space: ActionSpace, layout: BlockLayout, max_blocks: int,
                  device: torch.device | str | None = None) -> ActionTrack:
        return cls(layout, space.keyboard_dim, space.mouse_dim, max_blocks, device)

    @classmethod
    def from_full(cls, layout: BlockLayout, keyboard: torch.Tensor, mouse: torch.Tensor | None = None) -> ActionTrack:
        """Track holding a whole pixel-rate trajectory (keyboard [N, K], mouse [N, 2]; N rows of whole blocks)."""
        if keyboard.dim() != 2:
            raise ValueError(f"keyboard must be [N, K], got {list(keyboard.shape)}")
        blocks = layout.blocks_in_track(keyboard.shape[0], "keyboard track")
        if mouse is not None and mouse.shape != (keyboard.shape[0], 2):
            raise ValueError(f"mouse must be [{keyboard.shape[0]}, 2], got {list(mouse.shape)}")
        track = cls(layout, keyboard.shape[1], 0 if mouse is None else 2, blocks, keyboard.device)
        track.keyboard.copy_(keyboard)
        if mouse is not None:
            track.mouse.copy_(mouse)
        track.blocks_written = blocks
        return track

    def write_block(self, b: int, action: BlockAction) -> None:
        """Write block b's action over its span: one row per pixel frame, or one row held over it. Blocks are
        written in order; rewriting an already written block is allowed."""
        if not 0 <= b <= min(self.blocks_written, self.max_blocks - 1):
            raise ValueError(f"cannot write block {b}: the next block is {self.blocks_written} and the track "
                             f"holds {self.max_blocks} blocks")
        if action.keyboard.shape[1] != self.keyboard.shape[1]:
            raise ValueError(f"action has {action.keyboard.shape[1]} keyboard keys, track has {self.keyboard.shape[1]}")
        if (action.mouse is None) != (self.mouse is None):
            raise ValueError("action and track disagree on having a mouse channel")
        start, stop = self.layout.span(b)
        if action.n_rows not in (1, stop - start):
            raise ValueError(f"block action has {action.n_rows} rows; block {b} spans {stop - start} pixel frames "
                             "(give 1 row to hold it, or one row per pixel frame)")
        # copy_ broadcasts a held row over the span.
        self.keyboard[start:stop].copy_(torch.from_numpy(action.keyboard))
        if self.mouse is not None:
            self.mouse[start:stop].copy_(torch.from_numpy(action.mouse))
        self.blocks_written = max(self.blocks_written, b + 1)

    def window_rows(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows block b's action module reads (`BlockLayout.window`; MG2: 20 rows [12b-12, 12b+7]), rows < 0
        reading row 0: keyboard [rows, K], mouse [rows, 2] or None. May be views of the track, valid until the
        next write."""
        self._check_written(b)
        start, stop = self.layout.window(b)
        return _window(self.keyboard, start, stop), None if self.mouse is None else _window(self.mouse, start, stop)

    def prefix(self, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows up to the end of block b: the action prefix the reference passes to the model for block b."""
        self._check_written(b)
        stop = self.layout.span(b)[1]
        return self.keyboard[:stop], None if self.mouse is None else self.mouse[:stop]

    def _check_written(self, b: int) -> None:
        if not 0 <= b < self.blocks_written:
            raise ValueError(f"block {b} has no action yet (blocks written: {self.blocks_written})")


def _window(track: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if start >= 0:
        return track[start:stop]
    # The reference front-pads the track with copies of row 0.
    return torch.cat([track[:1].expand(-start, -1), track[:stop]])
