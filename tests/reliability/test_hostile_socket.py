"""Hostile input on the live socket: random and malformed multipart messages, oversize frames,
valid frames with absurd values, unknown tags and old protocol versions. The agent answers each
with an error (or, for what ZeroMQ itself refuses, drops the connection), stays up, serves the
next real request within a second, and its memory does not grow."""

from __future__ import annotations

import math
import random
import time

import msgspec
import psutil
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as p
from ctl import Client
from tests.harness import Agent
from tests.reliability.ledger import Ledger, Observer, budget, scaled
from tests.reliability.scenario import run_scenario

pytestmark = [pytest.mark.reliability]

TAGS = ["start", "heartbeat", "waiting", "complete", "emergency", "health", "status", "ping"]
TAGS += ["retry", "launch", "", "COMPLETE", "complete\x00", "ack", "error"]
FIELDS = ["request_id", "todo_id", "session_id", "todo_hint", "output", "timeout", "reason"]
FIELDS += ["transcript_path", "only_if_open", "all_dead", "completion_id", "surprise"]

absurd = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 2**63, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.sampled_from(["x" * 5000, "\u202e" * 100, "\x00" * 64, "../../etc/passwd"]),
    st.binary(max_size=300),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1), max_size=3),
)
bodies = st.fixed_dictionaries(
    {"type": st.sampled_from(TAGS)},
    optional={name: absurd for name in FIELDS},
)
versions = st.sampled_from([1, 1, 1, 0, 2, -1, 2**32, 2**64 - 1]) | st.integers(-(2**63), 2**64 - 1)


@st.composite
def frames(draw) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "bytes", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=600))
    frame = msgspec.msgpack.encode([draw(versions), draw(bodies)])
    if kind == "truncated":
        return frame[: draw(st.integers(min_value=0, max_value=max(len(frame) - 1, 0)))]
    return frame


# What a peer may put on the wire: a REQ-shaped message ([b"", frame]), or anything at all.
messages = st.one_of(
    frames().map(lambda f: [b"", f]),
    st.lists(st.binary(max_size=200), min_size=1, max_size=6),
    st.lists(frames(), min_size=1, max_size=4),
)


class Raw:
    """A DEALER on the agent's endpoint: it sends any multipart message we like."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, parts: list[bytes], wait: float = 2.0) -> list[bytes] | None:
        self.sock.send_multipart(parts)
        if not self.sock.poll(int(wait * 1000)):
            return None
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(0)


def _endpoint(agent: Agent) -> str:
    return f"ipc://{agent.state / 'completiond.sock'}"


def _reply(parts: list[bytes] | None) -> p.AnyReply:
    assert parts is not None, "no reply"
    assert parts[0] == b"", parts[:1]
    return p.decode_reply(parts[-1])


def _serves(agent: Agent, parent_pid: int, ledger: Ledger | None = None) -> float:
    """The same completiond, all children up, a real request answered within a second."""
    started = time.monotonic()
    client = Client(str(agent.config_path), timeout=1.0)
    pong = client.ping()
    took = time.monotonic() - started
    assert took < 1.0
    assert pong.pid == parent_pid
    assert agent.proc is not None and agent.proc.poll() is None
    status = client.status()
    assert status.agent is not None and all(status.agent.children.values())
    if ledger is not None:
        fault = ledger.fault("next real request after hostile input")
        fault.ended = started
        fault.recovered_after = took
    return took


def _rss(agent: Agent) -> int:
    assert agent.proc is not None
    return psutil.Process(agent.proc.pid).memory_info().rss


@pytest.mark.mysql
@pytest.mark.slow
@pytest.mark.timeout(budget(300))
def test_fuzzed_multipart_messages_get_an_error_and_the_agent_stays_up(
    mysql_agent, mysql_url
) -> None:
    examples = scaled(300)

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        parent = agent.proc.pid if agent.proc else 0
        raw = Raw(_endpoint(agent))

        @settings(max_examples=examples, deadline=None, database=None)
        @given(message=messages)
        def one(message: list[bytes]) -> None:
            ledger.injected += 1
            reply = _reply(raw.ask(message))
            if not (message[0] == b"" and len(message) == 2):
                # Not REQ-shaped: always a BAD_FRAME error, whatever the parts hold.
                assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.BAD_FRAME, reply
            elif isinstance(reply, p.Error):
                assert reply.code in p.ErrorCode and reply.message
            else:
                # A frame that happens to be a valid request is simply served; a completion it
                # made is one more acked completion to find in the database.
                assert isinstance(reply, p.Ack | p.Pong | p.HealthReport | p.StatusReport)
                if isinstance(reply, p.Ack) and reply.completion_id and reply.todo_id:
                    ledger.note_ack(reply.completion_id, reply.todo_id)

        try:
            one()
        finally:
            raw.close()
        _serves(agent, parent, ledger)

    run_scenario(
        "hostile input: fuzzed multipart messages",
        mysql_agent,
        mysql_url,
        None,
        scaled(2000),
        inject,
        note=f"{examples} hypothesis messages (random parts, absurd values, unknown tags, old "
        "versions) between real completions; each got an error reply",
    )


@pytest.mark.mysql
@pytest.mark.slow
@pytest.mark.timeout(budget(300))
def test_hostile_barrage_keeps_serving_and_memory_flat(mysql_agent, mysql_url) -> None:
    big = p.MAX_FRAME_BYTES
    figures: dict[str, float] = {}

    def frame(version: object, body: object) -> bytes:
        return msgspec.msgpack.encode([version, body])

    cases: list[tuple[list[bytes], p.ErrorCode | None]] = [
        ([b"", b""], p.ErrorCode.BAD_FRAME),
        ([b"", b"\xc1" * 100], p.ErrorCode.BAD_FRAME),
        ([b"", frame(0, {"type": "ping"})], p.ErrorCode.BAD_VERSION),
        ([b"", frame(2**64 - 1, {"type": "ping"})], p.ErrorCode.BAD_VERSION),
        ([b"", frame(-1, {"type": "complete", "todo_id": 1})], p.ErrorCode.BAD_VERSION),
        ([b"", frame("1", {"type": "ping"})], p.ErrorCode.BAD_FRAME),
        ([b"", frame(1, {"type": "rm -rf"})], p.ErrorCode.INVALID),
        ([b"", frame(1, {"type": "complete", "todo_id": -1})], p.ErrorCode.INVALID),
        ([b"", frame(1, {"type": "complete", "todo_id": 2**64 - 1})], p.ErrorCode.INVALID),
        ([b"", frame(1, {"type": "start", "todo_id": 1, "timeout": math.inf})], None),
        ([b"", frame(1, {"type": "start", "todo_id": 1, "timeout": math.nan})], None),
        ([b"", frame(1, {"type": "complete", "session_id": "s" * 1_000_000})], None),
        ([b"", frame(1, {"type": "ping", "request_id": "a" * 65})], p.ErrorCode.INVALID),
        ([b"", frame(1, {"type": "complete", "todo_id": 1, "x": [[[]]] * 1000})], None),
        ([b"", b"\x91" * 100_000 + b"\xc0"], p.ErrorCode.BAD_FRAME),  # nested 100k deep
        # A valid [version, body] head, then the body nested 1000 deep (issue 14, H3).
        ([b"", b"\x92\x01" + b"\x91" * 1000 + b"\xc0"], p.ErrorCode.BAD_FRAME),
        ([b"", b"\x92\x01\x81\xa4type" + b"\x91" * 100_000 + b"\xc0"], p.ErrorCode.BAD_FRAME),
        ([b"", frame(1, [1, 2, 3])], p.ErrorCode.INVALID),
        ([b"", b"x" * (big + 1)], p.ErrorCode.TOO_LARGE),
        ([b"", frame(1, {"type": "complete", "todo_id": 1, "output": "o" * (big + 10)})], None),
        ([b"garbage"], p.ErrorCode.BAD_FRAME),
        ([b"", b"", b"", b""], p.ErrorCode.BAD_FRAME),
        ([b"x" * 100_000] * 40, p.ErrorCode.BAD_FRAME),  # 4 MB in 40 parts
    ]

    def barrage(agent: Agent, ledger: Ledger, raw: Raw, parent: int) -> None:
        for parts, code in cases:
            ledger.injected += 1
            reply = _reply(raw.ask(parts, wait=5.0))
            assert isinstance(reply, p.Error), (parts[-1][:40], reply)
            if code is not None:
                assert reply.code == code, (parts[-1][:40], reply)
            else:
                assert reply.code in (
                    p.ErrorCode.INVALID,
                    p.ErrorCode.TOO_LARGE,
                    p.ErrorCode.BAD_FRAME,
                )
            assert reply.message
        # What ZeroMQ itself refuses (a frame over 4x the limit) drops the connection.
        ledger.injected += 1
        flood = Raw(_endpoint(agent))
        try:
            assert flood.ask([b"", b"z" * (4 * big + 1)], wait=1.0) is None
        finally:
            flood.close()
        # A crowd of idle connections, then a flood of garbage from many peers at once.
        crowd = [Raw(_endpoint(agent)) for _ in range(100)]
        ledger.injected += len(crowd)
        try:
            for peer in crowd:
                peer.sock.send_multipart([b"", b"\xff" * 64])
            for peer in crowd:
                assert peer.sock.poll(5000), "a peer of the crowd got no answer"
                assert isinstance(_reply(peer.sock.recv_multipart()), p.Error)
        finally:
            for peer in crowd:
                peer.close()
        _serves(agent, parent, ledger)

    rounds = scaled(3)

    def inject(agent: Agent, ledger: Ledger, observer: Observer, rng: random.Random) -> None:
        parent = agent.proc.pid if agent.proc else 0
        raw = Raw(_endpoint(agent))
        try:
            barrage(agent, ledger, raw, parent)  # warm up: buffers and caches reach their size
            warm = _rss(agent)
            for _ in range(rounds):
                barrage(agent, ledger, raw, parent)
            grown = _rss(agent) - warm
        finally:
            raw.close()
        figures["grown"] = grown / 2**20
        figures["rss"] = _rss(agent) / 2**20
        # A leak of even one frame per case would show as megabytes per round.
        assert grown < 24 * 2**20, f"parent RSS grew {grown / 2**20:.1f} MiB in {rounds} rounds"

    run_scenario(
        "hostile input: oversize, absurd, old-version, nested, crowd",
        mysql_agent,
        mysql_url,
        None,
        scaled(2000),
        inject,
        note=f"{len(cases)} crafted cases, a 16 MiB+ frame, 100 peers at once, {rounds + 1} rounds",
        note_after=lambda: (
            f"parent RSS {figures['rss']:.0f} MiB, grew {figures['grown']:+.1f} "
            f"MiB over {rounds} rounds"
        ),
    )
