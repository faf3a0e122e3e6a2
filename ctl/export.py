"""``completionctl export``: everything known about one todo, in one .tar.gz.

The bundle holds, under ``todo_<id>/``:

- ``archive/<name>/...`` — every archive directory of the todo (``todo_<id>_<time>`` and the
  orphan sweep's ``orphaned_<session dir>_<time>``), as the agent kept them;
- ``report.html`` — the newest archived report; ``report.md`` and ``report.txt`` — the report as
  the database got it (from the journal), when the journal still has it;
- ``journal.json`` — the todo's journal history: entries, deadlines, scheduled completions;
- ``database_row.json`` — the todo's row as the database holds it now;
- ``metadata.json`` — what is in the bundle, and what could not be read and why.

It needs no running agent and works from the archive alone (a pruned journal, a database that
does not answer).  Secrets never go in: the configuration is not exported, columns named like a
secret are dropped from the row, and the database password and any token file's content are
replaced by ``***`` wherever they would appear.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import protocol as p
from protocol.config import Config, mask_url

SECRET_COLUMN = re.compile(r"pass(word|wd)?|secret|token|api_?key|credential", re.IGNORECASE)
REDACTED = b"***"


class ExportError(Exception):
    """Nothing to export, or the bundle cannot be written."""


def export_todo(
    config: Config, todo_id: int, path: str | None = None, *, metadata_only: bool = False
) -> dict[str, Any]:
    secrets = _secrets(config)
    archives = _archives(config, todo_id)
    journal, journal_problem = _journal_history(config, todo_id)
    row, row_problem = _database_row(config, todo_id)
    if not archives and not journal["entries"] and not journal["schedules"] and row is None:
        raise ExportError(
            f"nothing is known about todo {todo_id}: no archive in {config.archive_dir}, no "
            f"journal entry, no database row ({row_problem or 'not found'})"
        )
    report_html = next(
        (a / "report.html" for a in reversed(archives) if (a / "report.html").is_file()), None
    )
    latest = _latest_report(journal["entries"])
    bundle: dict[str, bytes | Path] = {}
    if report_html is not None:
        bundle["report.html"] = report_html
    if latest is not None:
        if latest.get("html"):
            bundle["report.md"] = latest["html"].encode()
        if latest.get("text"):
            bundle["report.txt"] = latest["text"].encode()
    bundle["journal.json"] = _json(journal)
    bundle["database_row.json"] = _json(
        {
            "todo_id": todo_id,
            "row": row,
            "problem": row_problem,
            "database": mask_url(config.database_url),
        }
    )
    metadata: dict[str, Any] = {
        "todo_id": todo_id,
        "exported_at": time.time(),
        "protocol": p.VERSION,
        "archives": [a.name for a in archives],
        "report": "report.html" if report_html is not None else None,
        "journal_entries": len(journal["entries"]),
        "journal_problem": journal_problem,
        "database_row": row is not None,
        "database_problem": row_problem,
        "files": sorted(bundle) + [f"archive/{a.name}/" for a in archives],
    }
    if metadata_only:
        return metadata
    target = Path(path) if path else Path.cwd() / f"todo_{todo_id}_export_{int(time.time())}.tar.gz"
    bundle["metadata.json"] = _json(metadata)
    _write_tar(target, f"todo_{todo_id}", bundle, archives, secrets)
    metadata["path"] = str(target)
    return metadata


def _secrets(config: Config) -> list[bytes]:
    found: list[bytes] = []
    with contextlib.suppress(ValueError):
        password = urlsplit(config.database_url).password
        if password:
            found += [password.encode(), unquote(password).encode()]
    state = config.state_path
    with contextlib.suppress(OSError):
        for entry in state.iterdir():
            if "token" in entry.name.lower() and entry.is_file():
                with contextlib.suppress(OSError):
                    token = entry.read_bytes().strip()
                    if len(token) >= 8:
                        found.append(token)
    return sorted({s for s in found if s}, key=len, reverse=True)


def _archives(config: Config, todo_id: int) -> list[Path]:
    """The todo's archive dirs, oldest first."""
    root = config.archive_dir
    session = Path(config.session_dir_for(todo_id)).name
    own = re.compile(rf"todo_{todo_id}_(\d+)(?:_\d+)?")
    orphan = re.compile(rf"orphaned_{re.escape(session)}_(\d+)(?:_\d+)?")
    found: list[tuple[int, str, Path]] = []
    with contextlib.suppress(OSError):
        for entry in root.iterdir():
            match = own.fullmatch(entry.name) or orphan.fullmatch(entry.name)
            if match and entry.is_dir() and not entry.is_symlink():
                found.append((int(match.group(1)), entry.name, entry))
    return [path for _, _, path in sorted(found)]


def _journal_history(config: Config, todo_id: int) -> tuple[dict[str, Any], str | None]:
    history: dict[str, Any] = {"todo_id": todo_id, "entries": [], "timers": [], "schedules": []}
    if not config.journal_path.is_file():
        return history, f"no journal at {config.journal_path}"
    from agent.journal import Journal

    try:
        journal = Journal(config.journal_path)
    except Exception as exc:  # sqlite3.Error, or a journal from another version
        return history, f"journal unreadable: {exc}"
    try:
        history["entries"] = [
            {name: getattr(e, name) for name in e.__slots__ if name != "request"}
            for e in journal.entries_for_todo(todo_id)
        ]
        history["timers"] = [
            {name: getattr(t, name) for name in t.__slots__} for t in journal.timers(todo_id)
        ]
        history["schedules"] = [
            {name: getattr(s, name) for name in s.__slots__ if name != "request"}
            for s in journal.schedules_for_todo(todo_id)
        ]
    except Exception as exc:
        return history, f"journal unreadable: {exc}"
    finally:
        journal.close()
    return history, None if history["entries"] else "no journal entry (never seen, or pruned)"


def _database_row(config: Config, todo_id: int) -> tuple[dict[str, Any] | None, str | None]:
    from agent.dbroute import DbRoute
    from agent.store import StoreError

    route = None
    try:
        # The same way to the database as the agent's (direct, TLS, or its own ssh tunnel).
        route = DbRoute(config, f"export-{os.getpid()}")
        store = route.open(timeout=min(config.behavior.database_timeout, 10.0))
        try:
            row = store.row(todo_id)
        finally:
            store.close()
    except (StoreError, ValueError, OSError) as exc:
        return None, f"database unavailable: {exc}"
    finally:
        if route is not None:
            route.close()
    if row is None:
        return None, f"no row with id {todo_id} in {config.database.table}"
    return {k: _plain(v) for k, v in row.items() if not SECRET_COLUMN.search(k)}, None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _latest_report(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    reports = [e for e in entries if e.get("html") or e.get("text")]
    return reports[-1] if reports else None


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).encode()


def _redact(data: bytes, secrets: list[bytes]) -> bytes:
    for secret in secrets:
        data = data.replace(secret, REDACTED)
    return data


def _write_tar(
    target: Path,
    top: str,
    bundle: dict[str, bytes | Path],
    archives: list[Path],
    secrets: list[bytes],
) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for name, content in sorted(bundle.items()):
                    data = content.read_bytes() if isinstance(content, Path) else content
                    _add(tar, f"{top}/{name}", _redact(data, secrets))
                for archive in archives:
                    _add_archive(tar, top, archive, secrets)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _add_archive(tar: tarfile.TarFile, top: str, archive: Path, secrets: list[bytes]) -> None:
    for directory, dirs, files in os.walk(archive):
        dirs.sort()
        for name in sorted(files):
            source = Path(directory) / name
            if source.is_symlink() or not source.is_file():
                continue  # an archive holds no links; never follow one out of it
            relative = source.relative_to(archive.parent)
            _add(tar, f"{top}/archive/{relative}", _redact(source.read_bytes(), secrets))


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
