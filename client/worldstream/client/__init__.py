"""Light client of the WorldSessionService API: library (`run_session`, `SessionStream`; frames are numpy uint8
arrays) and CLI (`worldstream-client play`, `python -m worldstream.client play`). Imports no torch, and PyAV only
to write a video."""
from .frames import decode_frames
from .session import ReceivedBlock, SessionResult, SessionStream, run_session, start_request
from .tls import ChannelTLS

__all__ = ["ChannelTLS", "ReceivedBlock", "SessionResult", "SessionStream", "decode_frames", "run_session",
           "start_request"]
