"""The decoder's public ingress against hostile and careless clients (issue 7, part A): bounded error messages and
trace file names."""
from __future__ import annotations

import logging
import os

import grpc

from worldstream.serving.errors import MAX_STATUS_BYTES, ServiceError
from worldstream.serving.profiling import StreamProfiler

Code = grpc.StatusCode


# ---- defect 8: errors do not echo unbounded input ------------------------------------------------------------------

def test_status_messages_are_capped():
    """Whatever goes into a ServiceError, the status message stays under MAX_STATUS_BYTES (UTF-8 included)."""
    for text in ("a" * 100_000, "é" * 100_000, "x" * 10):
        error = ServiceError(Code.INVALID_ARGUMENT, text)
        assert len(error.message.encode()) <= MAX_STATUS_BYTES
    assert ServiceError(Code.INVALID_ARGUMENT, "short").message == "short"


# ---- --profile-dir: a caller's stream id never leaves the profile directory ------------------------------------------

def test_trace_files_stay_in_the_profile_directory(tmp_path):
    """A stream id comes from the caller (the encoder names a trace after the decoder's session_id): whatever it
    holds, the trace is written inside --profile-dir, one file per id."""
    profiles = tmp_path / "a" / "b" / "profiles"
    outside = tmp_path / f"absolute-{os.getpid()}"
    profiler = StreamProfiler(profiles, logging.getLogger("test"))
    hostile = ["../../escaped", str(outside), "a/../../b", "..", "x" * 5000]
    for stream_id in hostile:
        profiler.finish(profiler.start(stream_id), stream_id)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == len(hostile) and all(p.parent == profiles for p in written), written
    assert all(len(p.name) <= 105 for p in written)
