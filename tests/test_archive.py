"""Archives are complete copies, appear atomically, never follow links out, never overwrite."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.archive import (
    NOTES_FILE,
    STAGING_MAX_AGE,
    archive_orphan,
    archive_session,
    remove_stale_staging,
)

NOW = 1_796_000_000.7


@pytest.fixture
def session(tmp_path) -> Path:
    session = tmp_path / "claude_session_42"
    (session / "logs" / "deep").mkdir(parents=True)
    (session / "output.md").write_text("# Done\n", encoding="utf-8")
    (session / "logs" / "run.log").write_bytes(b"log line\n")
    (session / "logs" / "deep" / "x.bin").write_bytes(bytes(range(256)))
    return session


@pytest.fixture
def transcript(tmp_path) -> Path:
    path = tmp_path / "5b1e7c2a.jsonl"
    path.write_text('{"type": "summary"}\n', encoding="utf-8")
    return path


def hidden_entries(root: Path) -> list[str]:
    return [name for name in os.listdir(root) if name.startswith(".")]


def test_session_transcript_and_report_are_copied(tmp_path, session, transcript):
    root = tmp_path / "archive"
    result = archive_session(
        root, 42, NOW, session_dir=session, transcript=transcript, report_html="<p>ü</p>"
    )

    assert result.path == root / "todo_42_1796000000"
    assert (result.path / "session" / "output.md").read_text() == "# Done\n"
    assert (result.path / "session" / "logs" / "run.log").read_bytes() == b"log line\n"
    assert (result.path / "session" / "logs" / "deep" / "x.bin").read_bytes() == bytes(range(256))
    assert (result.path / "transcript.jsonl").read_text() == '{"type": "summary"}\n'
    assert (result.path / "report.html").read_text(encoding="utf-8") == "<p>ü</p>"
    assert result.files == 5
    assert result.bytes == 7 + 9 + 256 + 20 + len("<p>ü</p>".encode())
    assert result.notes == ()
    notes = (result.path / NOTES_FILE).read_text()
    assert str(session) in notes and str(transcript) in notes and "- none" in notes
    assert hidden_entries(root) == []  # built under a temporary name, nothing left over
    assert session.exists() and transcript.exists()  # originals are the caller's business


def test_symlinks_pointing_out_of_the_session_dir_are_not_followed(tmp_path, session):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "id_rsa").write_text("PRIVATE KEY", encoding="utf-8")
    (session / "key").symlink_to(outside / "id_rsa")
    (session / "escape").symlink_to(outside)
    (session / "logs" / "up").symlink_to("../..")
    os.mkfifo(session / "pipe")

    result = archive_session(
        tmp_path / "archive", 42, NOW, session_dir=session, transcript=None, report_html=None
    )

    copied = [path for path in result.path.rglob("*")]
    assert not any(path.is_symlink() for path in copied)
    assert not any(b"PRIVATE KEY" in path.read_bytes() for path in copied if path.is_file())
    assert {p.name for p in (result.path / "session").iterdir()} == {"logs", "output.md"}
    joined = "\n".join(result.notes)
    assert f"session/key is a symlink to {outside / 'id_rsa'}; not followed, skipped" in joined
    assert "session/escape is a symlink" in joined
    assert "session/logs/up is a symlink to ../..; not followed" in joined
    assert "session/pipe is a FIFO, socket or device; skipped" in joined
    assert "no transcript was given" in joined and "no report was given" in joined


def test_session_dir_that_is_itself_a_symlink_is_not_archived(tmp_path, session):
    link = tmp_path / "claude_session_43"
    link.symlink_to(session)
    result = archive_session(
        tmp_path / "archive", 43, NOW, session_dir=link, transcript=None, report_html="r"
    )
    assert not (result.path / "session").exists()
    assert f"session directory {link} is a symlink; not archived" in result.notes


def test_big_file_is_capped_to_its_head_and_noted(tmp_path, session, transcript):
    (session / "big.log").write_bytes(b"H" * 1000 + b"T" * 4000)
    result = archive_session(
        tmp_path / "archive",
        42,
        NOW,
        session_dir=session,
        transcript=transcript,
        report_html=None,
        max_file_bytes=1000,
    )
    assert (result.path / "session" / "big.log").read_bytes() == b"H" * 1000
    note = "session/big.log: 5000 bytes, capped to its first 1000 bytes"
    assert note in result.notes
    assert note in (result.path / NOTES_FILE).read_text()


def test_second_archive_in_the_same_second_gets_its_own_name(tmp_path, session):
    root = tmp_path / "archive"
    first = archive_session(root, 42, NOW, session_dir=session, transcript=None, report_html="1")
    second = archive_session(
        root, 42, NOW + 0.2, session_dir=session, transcript=None, report_html="2"
    )
    third = archive_session(root, 42, NOW, session_dir=session, transcript=None, report_html="3")
    assert first.path.name == "todo_42_1796000000"
    assert second.path.name == "todo_42_1796000000_1"
    assert third.path.name == "todo_42_1796000000_2"
    assert (first.path / "report.html").read_text() == "1"
    assert (second.path / "report.html").read_text() == "2"
    assert hidden_entries(root) == []


def test_name_taken_by_an_empty_directory_or_file_is_not_reused(tmp_path, session):
    root = tmp_path / "archive"
    root.mkdir()
    (root / "todo_42_1796000000").mkdir()
    (root / "todo_42_1796000000_1").write_text("someone else's", encoding="utf-8")
    result = archive_session(root, 42, NOW, session_dir=session, transcript=None, report_html="")
    assert result.path.name == "todo_42_1796000000_2"
    assert (root / "todo_42_1796000000_1").read_text() == "someone else's"


def test_missing_sources_are_notes_not_errors(tmp_path):
    result = archive_session(
        tmp_path / "archive",
        7,
        NOW,
        session_dir=tmp_path / "gone",
        transcript=tmp_path / "gone.jsonl",
        report_html="<p>report</p>",
    )
    assert result.files == 1
    assert result.notes == (
        f"session directory {tmp_path / 'gone'} not found",
        f"transcript {tmp_path / 'gone.jsonl'} not found",
    )
    assert (result.path / "report.html").exists()
    assert "not found" in (result.path / NOTES_FILE).read_text()


def test_orphan_is_archived_under_its_directory_name(tmp_path, session):
    root = tmp_path / "archive"
    result = archive_orphan(root, session, NOW)
    assert result.path == root / "orphaned_claude_session_42_1796000000"
    assert (result.path / "session" / "output.md").read_text() == "# Done\n"
    assert result.files == 3
    assert result.notes == ()
    assert hidden_entries(root) == []


def test_archive_that_cannot_be_written_leaves_no_temporary_directory(
    tmp_path, session, monkeypatch
):
    root = tmp_path / "archive"
    root.mkdir()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        archive_session(root, 42, NOW, session_dir=session, transcript=None, report_html="r")
    assert os.listdir(root) == []


def test_half_built_archives_left_by_a_killed_builder_are_removed_once_stale(tmp_path):
    root = tmp_path / "archive"
    root.mkdir()
    stale = [root / ".todo_7_1700000000.ab12cd.tmp", root / ".orphaned_s_1700000000.x.tmp"]
    fresh = root / ".todo_8_1700000000.ef34gh.tmp"
    kept = [root / "todo_7_1700000000", root / ".unrelated.tmp", fresh]
    for path in [*stale, *kept]:
        (path / "session").mkdir(parents=True)
    for path in stale:
        os.utime(path, (NOW - 7200, NOW - 7200))
    os.utime(root / ".unrelated.tmp", (NOW - 7200, NOW - 7200))  # not ours: left alone
    removed = remove_stale_staging(root, older_than=NOW - STAGING_MAX_AGE)
    assert sorted(removed) == sorted(p.name for p in stale)
    assert sorted(os.listdir(root)) == sorted(p.name for p in kept)
    assert remove_stale_staging(tmp_path / "missing", older_than=NOW) == []
