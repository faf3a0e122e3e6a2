"""The one-shot clients' stream socket (agent.streamdoor), driven with real Unix sockets and the
time passed in; the agent's own answer is replaced by a recording function (our seam)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import protocol as p
from agent.streamdoor import CONNECTION_TIMEOUT, StreamDoor

pytestmark = pytest.mark.timeout(30)


class Recorder:
    """Answers each frame with b"re:" + frame, and remembers what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], list[int], float]] = []

    def __call__(self, frames: list[bytes], requesters: list[int], now: float) -> list[bytes]:
        self.calls.append((frames, requesters, now))
        return [b"re:" + frame for frame in frames]


@pytest.fixture
def door(tmpdir_short: Path) -> Iterator[StreamDoor]:
    opened = StreamDoor(tmpdir_short / "s.stream", zmq.Poller(), max_peers=4, max_held=1 << 30)
    opened.bind(0o600, None)
    try:
        yield opened
    finally:
        opened.close()


def client(door: StreamDoor) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(os.fspath(door.path))
    return sock


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_frame_is_answered_once_whole_and_the_connection_closed(door: StreamDoor) -> None:
    answer = Recorder()
    sock = client(door)
    sock.sendall(b"part one, ")
    assert door.serve(100.0, answer) == 0  # not whole until the client shuts its side
    sock.sendall(b"part two")
    sock.shutdown(socket.SHUT_WR)
    assert door.serve(100.5, answer) == 1
    assert read_all(sock) == b"re:part one, part two"
    assert answer.calls == [([b"part one, part two"], [os.geteuid()], 100.5)]
    assert door.next_deadline() is None  # nothing left open


def test_frames_that_arrive_together_are_answered_in_one_batch(door: StreamDoor) -> None:
    answer = Recorder()
    socks = [client(door) for _ in range(3)]
    for index, sock in enumerate(socks):
        sock.sendall(b"frame %d" % index)
        sock.shutdown(socket.SHUT_WR)
    assert door.serve(1.0, answer) == 3
    assert len(answer.calls) == 1
    assert sorted(answer.calls[0][0]) == [b"frame 0", b"frame 1", b"frame 2"]
    assert sorted(read_all(s) for s in socks) == [b"re:frame 0", b"re:frame 1", b"re:frame 2"]


def test_a_connection_that_never_finishes_is_closed_unanswered_at_its_deadline(
    door: StreamDoor,
) -> None:
    answer = Recorder()
    slow = client(door)
    slow.sendall(b"half a frame")
    door.serve(50.0, answer)
    assert door.next_deadline() == 50.0 + CONNECTION_TIMEOUT
    # Others are answered meanwhile.
    other = client(door)
    other.sendall(b"whole")
    other.shutdown(socket.SHUT_WR)
    assert door.serve(51.0, answer) == 1
    assert read_all(other) == b"re:whole"
    door.serve(50.0 + CONNECTION_TIMEOUT, answer)
    assert read_all(slow) == b""  # closed without an answer: the client queues its request
    assert [frames for frames, _, _ in answer.calls] == [[b"whole"]]
    assert door.next_deadline() is None


def test_a_frame_over_the_limit_reaches_the_decoder_as_too_large_only(door: StreamDoor) -> None:
    answer = Recorder()
    sock = client(door)
    big = b"x" * (p.MAX_FRAME_BYTES + 100_000)
    sent = 0
    now = 1.0
    sock.setblocking(False)
    while sent < len(big):  # the door reads as the client writes
        try:
            sent += sock.send(big[sent : sent + 65536])
        except BlockingIOError:
            door.serve(now, answer)
    sock.shutdown(socket.SHUT_WR)
    sock.setblocking(True)
    while not answer.calls:
        door.serve(now, answer)
    (frame,) = answer.calls[0][0]
    assert len(frame) == p.MAX_FRAME_BYTES + 1  # one byte over: enough to be refused
    with pytest.raises(p.ProtocolError) as refused:
        p.decode_request(frame)
    assert refused.value.code == p.ErrorCode.TOO_LARGE


def test_a_stale_socket_file_is_replaced_and_close_removes_it(tmpdir_short: Path) -> None:
    path = tmpdir_short / "stale.stream"
    path.write_text("left by a crash")
    door = StreamDoor(path, zmq.Poller(), max_peers=4, max_held=1 << 30)
    door.bind(0o660, None)
    try:
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o660
    finally:
        door.close()
    assert not path.exists()


def test_a_client_that_goes_away_costs_nothing(door: StreamDoor) -> None:
    answer = Recorder()
    sock = client(door)
    sock.sendall(b"then gone")
    sock.close()  # an EOF without a shutdown first: still a whole frame, answered into the void
    door.serve(1.0, answer)
    assert door.next_deadline() is None


OTHER = 4242  # a user other than the agent's (the tests run as one user: SO_PEERCRED is faked)


@pytest.fixture
def others_door(tmpdir_short: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StreamDoor]:
    monkeypatch.setattr("agent.streamdoor._peer_uid", lambda sock: OTHER)
    opened = StreamDoor(tmpdir_short / "o.stream", zmq.Poller(), max_peers=8, max_held=100)
    opened.bind(0o600, None)
    try:
        yield opened
    finally:
        opened.close()


def test_another_users_unfinished_frames_keep_at_most_max_held_bytes(
    others_door: StreamDoor,
) -> None:
    answer = Recorder()
    first, second = client(others_door), client(others_door)
    first.sendall(b"a" * 80)
    others_door.serve(1.0, answer)
    second.sendall(b"b" * 80)  # 160 bytes kept would be over the 100
    others_door.serve(1.0, answer)
    second.sendall(b"more, read and dropped")
    second.shutdown(socket.SHUT_WR)
    others_door.serve(1.0, answer)
    refused = p.decode_reply(read_all(second))
    assert isinstance(refused, p.Error) and refused.code == p.ErrorCode.OVER_QUOTA
    assert "limits.bytes_per_minute" in refused.message
    assert answer.calls == []  # the parent never saw it
    first.shutdown(socket.SHUT_WR)
    others_door.serve(1.0, answer)
    assert read_all(first) == b"re:" + b"a" * 80
    # What was kept is given back when a frame is answered, refused or dropped.
    third = client(others_door)
    third.sendall(b"c" * 100)
    third.shutdown(socket.SHUT_WR)
    others_door.serve(2.0, answer)
    assert read_all(third) == b"re:" + b"c" * 100


def test_a_user_not_allowed_has_nothing_kept_and_reaches_the_gate_with_an_empty_frame(
    tmpdir_short: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent.streamdoor._peer_uid", lambda sock: OTHER)
    door = StreamDoor(
        tmpdir_short / "n.stream", zmq.Poller(), max_peers=8, max_held=100, allowed=[OTHER + 1]
    )
    door.bind(0o600, None)
    try:
        answer = Recorder()
        sock = client(door)
        sock.sendall(b"x" * 1000)  # over max_held too: not kept, so not counted
        sock.shutdown(socket.SHUT_WR)
        door.serve(1.0, answer)
        assert read_all(sock) == b"re:"
        assert answer.calls == [([b""], [OTHER], 1.0)]
    finally:
        door.close()
