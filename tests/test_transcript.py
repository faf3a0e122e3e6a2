"""The transcript reader finds the final answer of the last turn, from the end of the file."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.transcript import await_final_message, final_text, last_main_message

FIXTURE = Path(__file__).parent / "fixtures" / "claude-code" / "transcript.jsonl"
FINAL_ANSWER = (
    "Das Login-Formular validiert jetzt E-Mail und Passwort.\n\nAlle 12 Tests laufen grün."
)


def assistant(message_id, *blocks, sidechain=False, stop_reason=None, content=None) -> str:
    return json.dumps(
        {
            "type": "assistant",
            "isSidechain": sidechain,
            "message": {
                "id": message_id,
                "role": "assistant",
                "content": list(blocks) if content is None else content,
                "stop_reason": stop_reason,
            },
        }
    )


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def tool_use(name: str = "Bash") -> dict:
    return {"type": "tool_use", "id": "toolu_1", "name": name, "input": {"command": "ls"}}


def user(content) -> str:
    return json.dumps({"type": "user", "isSidechain": False, "message": {"content": content}})


def write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_fixture_final_answer_joins_both_lines_of_the_last_message():
    assert final_text(FIXTURE) == FINAL_ANSWER
    message = last_main_message(FIXTURE)
    assert message is not None
    assert message.message_id == "msg_02"
    assert message.turn_ended


def test_sidechain_lines_after_the_answer_are_ignored(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", text("main answer"), stop_reason="end_turn"),
        assistant("msg_side", text("subagent chatter"), sidechain=True, stop_reason="end_turn"),
    )
    assert final_text(path) == "main answer"


def test_tool_use_and_thinking_blocks_are_not_text(tmp_path):
    thinking = {"type": "thinking", "thinking": "secret reasoning"}
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", thinking, text("visible"), tool_use(), text("also visible")),
    )
    assert final_text(path) == "visible\n\nalso visible"


def test_last_message_with_only_tool_use_has_empty_text(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", text("earlier answer"), stop_reason="end_turn"),
        assistant("msg_2", tool_use(), stop_reason="tool_use"),
    )
    assert final_text(path) == ""


def test_malformed_and_half_written_lines_are_skipped(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b"not json at all\n"
        + assistant("msg_1", text("first half")).encode()
        + b'\n{"type": "assistant", broken\n'
        + b"[1, 2, 3]\n"
        + b"\xff\xfe garbage \x00\n"
        + assistant("msg_1", text("second half"), stop_reason="end_turn").encode()
        + b'\n{"type": "assistant", "isSidechain": false, "message": {"id": "msg_2", "cont'
    )
    assert final_text(path) == "first half\n\nsecond half"


def test_plain_string_content_is_text(tmp_path):
    path = write(tmp_path / "t.jsonl", assistant("msg_1", content="just a string"))
    assert final_text(path) == "just a string"


def test_lines_of_one_message_are_joined_across_interleaved_lines(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_0", text("previous turn"), stop_reason="end_turn"),
        user("next task"),
        assistant("msg_1", text("part one")),
        json.dumps({"type": "system", "isSidechain": False, "content": "noise"}),
        assistant("msg_s", text("sidechain"), sidechain=True),
        assistant("msg_1", text("part two"), stop_reason="end_turn"),
    )
    assert final_text(path) == "part one\n\npart two"


def test_message_without_id_stands_alone(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", text("older")),
        assistant(None, text("synthetic")),
    )
    assert final_text(path) == "synthetic"


def test_no_main_chain_assistant_message_is_none(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert final_text(empty) is None
    only_side = write(
        tmp_path / "side.jsonl",
        user("hello"),
        assistant("msg_s", text("sidechain"), sidechain=True),
    )
    assert final_text(only_side) is None


def test_missing_file_and_fifo_raise_oserror_without_blocking(tmp_path):
    with pytest.raises(FileNotFoundError):
        final_text(tmp_path / "missing.jsonl")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        final_text(fifo)


def test_big_transcript_is_read_quickly_from_the_end(tmp_path):
    path = tmp_path / "big.jsonl"
    filler = user([{"type": "tool_result", "content": "x" * 10_000}]) + "\n"
    older = assistant("msg_old", text("old answer"), stop_reason="end_turn") + "\n"
    with path.open("w", encoding="utf-8") as out:
        for _ in range(4_000):  # ~44 MB of tool results and earlier answers
            out.write(filler)
            out.write(older)
        # The final message spans several read chunks: each line is ~700 KB.
        out.write(assistant("msg_final", text("A" * 700_000)) + "\n")
        out.write(filler)
        out.write(assistant("msg_final", text("B" * 700_000), stop_reason="end_turn") + "\n")
    assert path.stat().st_size > 40_000_000

    started = time.perf_counter()
    result = final_text(path)
    elapsed = time.perf_counter() - started

    assert result == "A" * 700_000 + "\n\n" + "B" * 700_000
    assert elapsed < 1.0


def test_huge_sparse_transcript_reads_only_the_tail(tmp_path):
    # 20 GB of holes before the real lines: reading forwards would never finish in time.
    path = tmp_path / "sparse.jsonl"
    with path.open("wb") as out:
        out.truncate(20 * 1024**3)
        out.seek(0, os.SEEK_END)
        out.write(b"\n" + assistant("msg_1", text("earlier")).encode() + b"\n")
        out.write(assistant("msg_2", text("final"), stop_reason="end_turn").encode() + b"\n")
    started = time.perf_counter()
    assert final_text(path) == "final"
    assert time.perf_counter() - started < 1.0


def test_scan_window_bounds_how_far_back_it_reads(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", text("far back")),
        user([{"type": "tool_result", "content": "y" * 100_000}]),
    )
    assert final_text(path, max_bytes=50_000) is None
    assert final_text(path) == "far back"


class FakeTime:
    """A clock that advances only when slept on; ``on_sleep`` may change the world meanwhile."""

    def __init__(self, on_sleep=None):
        self.now = 1000.0
        self.slept = 0.0
        self.on_sleep = on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        if self.on_sleep:
            self.on_sleep()


def test_last_line_written_after_the_stop_hook_is_picked_up(tmp_path):
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    # The Stop hook fired before msg_02's second line and the system line were written.
    path = write(tmp_path / "t.jsonl", *lines[:-2])
    appended = []

    def claude_code_writes_the_rest():
        if not appended and time_.slept >= 0.3:
            appended.append(True)
            with path.open("a", encoding="utf-8") as out:
                out.write(lines[-2] + "\n")

    time_ = FakeTime(claude_code_writes_the_rest)
    message = await_final_message(path, wait=2.0, clock=time_.clock, sleep=time_.sleep)

    assert message is not None
    assert message.text == FINAL_ANSWER
    assert time_.slept < 1.0  # returned as soon as the turn had ended, not after the full wait


def test_without_a_turn_end_signal_it_waits_out_the_time_and_takes_what_is_there(tmp_path):
    path = write(tmp_path / "t.jsonl", assistant("msg_1", text("answer, no stop reason")))
    time_ = FakeTime()
    message = await_final_message(path, wait=2.0, clock=time_.clock, sleep=time_.sleep)
    assert message is not None
    assert message.text == "answer, no stop reason"
    assert time_.slept == pytest.approx(2.0)


def test_turn_still_in_tool_use_is_not_taken_as_final_while_waiting(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        assistant("msg_1", text("Ich sehe mir zuerst die Tests an."), tool_use()),
    )
    stages = iter(
        [
            user([{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]),
            assistant("msg_2", text("fertig"), stop_reason="end_turn"),
        ]
    )

    def next_line():
        line = next(stages, None)
        if line:
            with path.open("a", encoding="utf-8") as out:
                out.write(line + "\n")

    time_ = FakeTime(next_line)
    message = await_final_message(path, wait=2.0, clock=time_.clock, sleep=time_.sleep)
    assert message is not None
    assert message.text == "fertig"
