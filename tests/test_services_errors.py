"""Every error of the WorldSessionService API returns its gRPC status while another session on the same server goes on."""
from __future__ import annotations

import math
import signal

import grpc
import pytest

from service_harness import (SMALL_FRAMES, call_status, free_port, metric_value, png_bytes, running_services,
                             start_decoder, wait_for)
from worldstream.api.spaces import get_action_space
from worldstream.client import SessionStream, start_request
from worldstream.v1 import session_pb2

IMAGE = png_bytes(seed=3)
MAX_MESSAGE_BYTES = 1_000_000
SPACE = get_action_space("universal")
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    with running_services(tmp_path_factory.mktemp("errors"), decoder_args=[
            "--max-sessions", "2", "--max-message-bytes", str(MAX_MESSAGE_BYTES), "--idle-timeout", "120",
            *SMALL_FRAMES], encoder_args=SMALL_FRAMES) as running:
        yield running


class Witness:
    """A LOCKSTEP session kept open through the module; `step()` proves it still makes progress."""

    def __init__(self, address: str):
        self.stream = SessionStream(address, start_request(IMAGE, "universal", seed=5, max_blocks=40))
        self.blocks = iter(self.stream)
        self.next_index = 0

    def step(self) -> None:
        self.stream.send(SPACE.from_names(["forward"]))
        block = next(self.blocks)
        assert block.index == self.next_index and block.frames.shape[0] == (9 if block.index == 0 else 12)
        self.next_index += 1


@pytest.fixture(scope="module")
def witness(services):
    witness = Witness(services.address)
    yield witness
    witness.stream.close()


def start(mode: str = "universal", image: bytes = IMAGE, max_blocks: int = 3) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(start=session_pb2.StartSession(mode=mode, image=image, max_blocks=max_blocks))


def action(**fields) -> session_pb2.SessionRequest:
    return session_pb2.SessionRequest(action=session_pb2.Action(**fields))


@pytest.mark.parametrize("requests, code, message", [
    ([start(image=b"\x89PNG\r\n\x1a\n definitely not a picture")], Code.INVALID_ARGUMENT, "image"),
    ([start(image=b"")], Code.INVALID_ARGUMENT, "image is empty"),
    ([start(mode="doom")], Code.INVALID_ARGUMENT, "unknown mode 'doom'"),
    ([start(mode="gta_drive")], Code.INVALID_ARGUMENT, "runs mode 'universal'"),
    ([start(max_blocks=10_000)], Code.INVALID_ARGUMENT, "max_blocks"),
    ([action(keyboard=[1, 0, 0, 0])], Code.INVALID_ARGUMENT, "first message must be `start`"),
    ([start(), start()], Code.INVALID_ARGUMENT, "only allowed as the first message"),
    ([start(), action(keyboard=[1, 0])], Code.INVALID_ARGUMENT, "4 keyboard keys"),
    ([start(), action(keyboard=[2, 0, 0, 0])], Code.INVALID_ARGUMENT, "[0, 1]"),
    ([start(), action(keys=["forward"], mouse=[0.0, 5.0])], Code.INVALID_ARGUMENT, "|value| <= 1"),
    ([start(), action(keyboard=[0, 0, 0, 0], mouse=[math.nan, 0.0])], Code.INVALID_ARGUMENT, "finite"),
    ([start(), action(keys=["jump"])], Code.INVALID_ARGUMENT, "unknown key name"),
    ([start(), action(frames=[session_pb2.ActionFrame(keyboard=[1, 0, 0, 0], mouse=[0, 0])] * 12)],
     Code.INVALID_ARGUMENT, "spans 9 pixel frames"),
    ([start(max_blocks=1), action(keys=["forward"]), action(keys=["forward"])], Code.OUT_OF_RANGE, "past the end"),
    ([start(), action(keys=["forward"]), session_pb2.SessionRequest(stop=session_pb2.StopSession()),
      action(keys=["forward"])], Code.OUT_OF_RANGE, "after `stop`"),
    ([start(image=b"\0" * (MAX_MESSAGE_BYTES + 1000))], Code.RESOURCE_EXHAUSTED, ""),
], ids=["undecodable-image", "empty-image", "unknown-mode", "mode-not-served", "too-many-blocks", "no-start",
        "second-start", "wrong-size", "keyboard-out-of-range", "mouse-out-of-range", "nan", "unknown-key",
        "wrong-frame-rows", "action-after-end", "message-after-stop", "message-too-large"])
def test_error_status(services, witness, requests, code, message):
    error = call_status(services.address, requests)
    assert error.code() == code, error.details()
    assert message in error.details()
    witness.step()


def test_too_many_sessions(services, witness):
    """max-sessions 2: the witness plus one more; the third is refused, and admitted again once one ends."""
    holder = SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=2))
    try:
        error = call_status(services.address, [start()])
        assert error.code() == Code.RESOURCE_EXHAUSTED and "2 sessions at most" in error.details()
        witness.step()
    finally:
        holder.close()
    wait_for(lambda: metric_value(services.decoder_metrics_port, "worldstream_decoder_sessions_active") == 1, 30,
             "the holder session to be released")
    with SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=1)) as again:
        again.send(SPACE.from_names([]))
        assert len(list(again)) == 1


def test_errors_are_counted(services, witness):
    """Each failed call adds one to errors_total{code} (the test makes its own errors: it may run alone)."""
    def errors(code: str) -> float:
        return metric_value(services.decoder_metrics_port, "worldstream_decoder_errors_total", {"code": code})

    before = {code: errors(code) for code in ("INVALID_ARGUMENT", "OUT_OF_RANGE")}
    assert call_status(services.address, [start(mode="doom")]).code() == Code.INVALID_ARGUMENT
    assert call_status(services.address, [start(), action(keys=["jump"])]).code() == Code.INVALID_ARGUMENT
    assert call_status(services.address, [start(max_blocks=1), action(keys=["forward"]), action(keys=["forward"])]
                       ).code() == Code.OUT_OF_RANGE
    # The status reaches the client as the handler ends; the counter is updated just before.
    wait_for(lambda: errors("OUT_OF_RANGE") == before["OUT_OF_RANGE"] + 1, 10, "the OUT_OF_RANGE count")
    assert errors("INVALID_ARGUMENT") == before["INVALID_ARGUMENT"] + 2
    witness.step()


def test_encoder_with_another_config_is_a_deployment_error(services, witness, tmp_path):
    """A decoder whose frame size differs from its encoder's fails sessions with INTERNAL, naming the cause."""
    port = free_port()
    decoder = start_decoder(tmp_path / "decoder.log", port, free_port(), services.encoder_address,
                            ["--warmup-blocks", "0"])
    try:
        error = call_status(f"127.0.0.1:{port}", [start()])
        assert error.code() == Code.INTERNAL and "same config" in error.details()
    finally:
        decoder.stop()
    witness.step()


def test_encoder_down_is_unavailable_then_recovers(tmp_path):
    """Killing the encoder fails new sessions with UNAVAILABLE; a session whose conditioning already arrived
    goes on; once the encoder is back, new sessions work again over the same channel."""
    with running_services(tmp_path, decoder_args=["--encoder-connect-timeout", "3", *SMALL_FRAMES],
                          encoder_args=SMALL_FRAMES) as services:
        survivor = SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=2))
        survivor.send(SPACE.from_names(["forward"]))
        survivor.send(SPACE.from_names(["left"]))  # block 1 is taken, and its conditioning sent, once both are in
        wait_for(lambda: metric_value(services.encoder_metrics_port, "worldstream_encoder_blocks_served_total") == 2,
                 60, "the encoder to send both blocks of the survivor")
        services.encoder.signal(signal.SIGKILL)
        services.encoder.wait(10)

        error = call_status(services.address, [start(), action(keys=["forward"])])
        assert error.code() == Code.UNAVAILABLE and "encoder" in error.details()

        assert len(list(survivor)) == 2 and survivor.end.reason == session_pb2.END_REASON_MAX_BLOCKS
        survivor.close()

        services.start_encoder()  # same port and arguments

        def session_works() -> bool:
            try:
                with SessionStream(services.address, start_request(IMAGE, "universal", max_blocks=1)) as stream:
                    stream.send(SPACE.from_names([]))
                    return len(list(stream)) == 1
            except grpc.RpcError as e:
                assert e.code() == Code.UNAVAILABLE, e.details()
                return False
        wait_for(session_works, 30, "a session to succeed after the encoder restart", interval=0.5)
