"""torch.profiler Chrome traces of single streams."""
from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

import torch

from .logs import log_event

MAX_NAME_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class StreamProfiler:
    """torch.profiler Chrome traces, one file per stream, into `directory` (None: off). The profiler is
    process-wide and records the thread that starts it, so it is started and stopped on the stream's WorkerLane
    and only one stream at a time is traced."""

    def __init__(self, directory: Path | None, logger: logging.Logger):
        self.directory = directory
        self.logger = logger
        self._lock = threading.Lock()

    def start(self, stream_id: str) -> torch.profiler.profile | None:
        if self.directory is None:
            return None
        if not self._lock.acquire(blocking=False):
            log_event(self.logger, "not profiled: another stream holds the profiler", stream_id=stream_id)
            return None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
        profiler.__enter__()
        return profiler

    def finish(self, profiler: torch.profiler.profile | None, stream_id: str) -> None:
        if profiler is None:
            return
        try:
            profiler.__exit__(None, None, None)
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / trace_file_name(stream_id)
            profiler.export_chrome_trace(str(path))
            log_event(self.logger, "profile written", stream_id=stream_id[:MAX_NAME_CHARS], path=str(path))
        finally:
            self._lock.release()


def trace_file_name(stream_id: str) -> str:
    """A file name for the trace of `stream_id`, which may come from a caller: only letters, digits, `-` and `_`
    (anything else, path separators and dots included, becomes `_`), at most MAX_NAME_CHARS of them, so that
    the trace lands in the profile directory whatever the id."""
    return _UNSAFE.sub("_", stream_id[:MAX_NAME_CHARS]) + ".json"
