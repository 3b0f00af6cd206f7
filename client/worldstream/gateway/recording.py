"""The session as an mp4 for the page's download button: the frames with the applied action drawn on them (image
sessions; text sessions have none) (`worldstream.client.video.VideoWriter`, PyAV), encoded on one worker thread so
the event loop never waits."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
from pathlib import Path

import numpy as np

from worldstream.api.spaces import ActionSpace, BlockAction
from worldstream.client.video import VideoWriter

log = logging.getLogger("worldstream.gateway")


class Recording:
    def __init__(self, directory: Path, fps: int, space: ActionSpace | None):
        self.token = secrets.token_urlsafe(16)  # the download URL is the only way to it
        self.path = directory / f"{self.token}.mp4"
        self.finished = False
        self.failed: BaseException | None = None
        self._writer = VideoWriter(self.path, fps, overlay=space is not None, action_space=space)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="recording")

    def write(self, frames: np.ndarray, action: BlockAction | None) -> None:
        """Queues a block (blocks are written in order); does not wait for the encoder."""
        self._worker.submit(self._writer.write, frames, action).add_done_callback(self._check)

    def _check(self, future: concurrent.futures.Future) -> None:
        if not future.cancelled() and future.exception() is not None and self.failed is None:
            self.failed = future.exception()
            log.error("recording %s failed: %r", self.path.name, self.failed)

    async def finish(self) -> None:
        """Writes what is queued and closes the file; `finished` says whether it can be downloaded."""
        await asyncio.get_running_loop().run_in_executor(self._worker, self._writer.close)
        self._worker.shutdown()
        self.finished = self.failed is None and self._writer.frames_written > 0

    async def discard(self) -> None:
        """Drops the recording (its tab closed or started another session); blocks still queued are skipped."""
        await asyncio.get_running_loop().run_in_executor(None, self._close_and_delete)

    def _close_and_delete(self) -> None:
        try:
            self._worker.shutdown(cancel_futures=True)  # waits for the block being written
            self._writer.close()
        finally:
            self.path.unlink(missing_ok=True)
