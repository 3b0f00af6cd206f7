"""Client of the WorldSessionService API: library (`run_session`, `SessionStream`) and CLI (`python -m worldstream.client`)."""
from .session import ReceivedBlock, SessionResult, SessionStream, decode_frames, run_session, start_request

__all__ = ["ReceivedBlock", "SessionResult", "SessionStream", "decode_frames", "run_session", "start_request"]
