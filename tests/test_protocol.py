"""The wire protocol: round trips and every bad-input path."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as p

REQUESTS = [
    p.Start(request_id="r1", todo_id=7, session_id="s", timeout=60.0, transcript_path="/t.jsonl"),
    p.Heartbeat(request_id="r2", session_id="s", event="PostToolUse"),
    p.Waiting(request_id="r3", todo_hint="7", reason="permission_prompt: Bash"),
    p.Complete(request_id="r4", todo_id=7, output="<b>done</b>\x00", tmux_target="w:1"),
    p.Emergency(request_id="r5", todo_id=7, reason="stuck"),
    p.Health(request_id="r6"),
    p.Status(request_id="r7", todo_id=7),
    p.Ping(),
    p.Retry(all_dead=True),
]
REPLIES = [
    p.Ack(request_id="r", state="accepted", todo_id=1, completion_id="c"),
    p.Error(code=p.ErrorCode.INVALID, message="no"),
    p.Pong(version=1, pid=5),
    p.HealthReport(status="OK", checks=[p.Check(name="journal", status="OK", message="m")]),
    p.StatusReport(todo=p.TodoStatus(todo_id=1, entries=[], deadlines=[])),
]


@pytest.mark.parametrize("message", REQUESTS, ids=lambda m: type(m).__name__)
def test_requests_round_trip(message: p.Request) -> None:
    assert p.decode_request(p.encode(message)) == message


@pytest.mark.parametrize("message", REPLIES, ids=lambda m: type(m).__name__)
def test_replies_round_trip(message: p.Reply) -> None:
    assert p.decode_reply(p.encode(message)) == message


def _frame(version: int, body: object) -> bytes:
    return msgspec.msgpack.encode([version, body])


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"", p.ErrorCode.BAD_FRAME),
        (b"\xc1", p.ErrorCode.BAD_FRAME),
        (msgspec.msgpack.encode({"type": "ping"}), p.ErrorCode.BAD_FRAME),
        (_frame(99, {"type": "ping"}), p.ErrorCode.BAD_VERSION),
        (_frame(1, {"type": "launch"}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "complete", "todo_id": 0}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "complete", "todo_id": -5}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "complete", "todo_id": 2**63}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "complete", "todo_id": "7"}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "complete", "surprise": 1}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "start", "timeout": -1}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "ping", "request_id": "bad id with spaces"}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "status", "todo_id": 1.5}), p.ErrorCode.INVALID),
        (_frame(1, {"type": "waiting", "reason": "x" * 5000}), p.ErrorCode.INVALID),
        (b"\x92\x01" + b"\xc6" + (p.MAX_FRAME_BYTES).to_bytes(4, "big"), p.ErrorCode.BAD_FRAME),
        (b"x" * (p.MAX_FRAME_BYTES + 1), p.ErrorCode.TOO_LARGE),
    ],
)
def test_bad_frames_raise_protocol_error_with_code(frame: bytes, code: p.ErrorCode) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(frame)
    assert info.value.code == code
    assert str(info.value)


def test_old_version_error_says_what_to_do() -> None:
    with pytest.raises(p.ProtocolError, match="same release"):
        p.decode_request(_frame(0, {"type": "ping"}))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_decode_to_a_request_or_a_clean_error(data: bytes) -> None:
    try:
        message = p.decode_request(data)
    except p.ProtocolError as exc:
        assert isinstance(exc.code, p.ErrorCode)
    else:
        assert isinstance(message, p.Request)


_text = st.text(max_size=200)
_ids = st.integers(min_value=1, max_value=2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(
    todo_id=st.none() | _ids,
    output=st.none() | st.text(max_size=2000),
    session=st.none() | _text,
    only_if_open=st.booleans(),
)
def test_every_complete_round_trips(todo_id, output, session, only_if_open) -> None:
    message = p.Complete(
        request_id=p.new_request_id(),
        todo_id=todo_id,
        output=output,
        session_id=session,
        only_if_open=only_if_open,
    )
    assert p.decode_request(p.encode(message)) == message
