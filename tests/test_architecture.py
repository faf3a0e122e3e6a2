"""Structure the code keeps: the journal's state machine lives in agent/journal.py alone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "ctl", "protocol")
JOURNAL = ROOT / "agent" / "journal.py"
# Every table the journal creates, read from its schema: a table added later is guarded too.
JOURNAL_TABLES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", JOURNAL.read_text()))

# A statement on a journal table: the table named after the keyword that introduces it.
JOURNAL_SQL = re.compile(
    r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?: IF (?:NOT )?EXISTS)?)\s+[\"`]?("
    + "|".join(JOURNAL_TABLES)
    + r")\b",
    re.IGNORECASE,
)
# Ways around the named transitions: raw statements on a journal connection, and the
# untyped setters kept for tests and manual repair.
BYPASSES = re.compile(
    r"\.(?:execute|executemany|executescript)\(|\.(?:add_entry|update_entry|_update)\("
)


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _uses_journal(text: str) -> bool:
    return bool(
        re.search(r"^from (?:\.|agent\.)journal import|^from \. import .*\bjournal\b", text, re.M)
    )


def test_the_guard_knows_the_journal_tables() -> None:
    assert {"requests", "entries", "todos", "sessions", "health", "counters"} <= set(JOURNAL_TABLES)


def test_the_pattern_finds_journal_sql() -> None:
    # The statements this test was written against, as they were once spelled elsewhere.
    for statement in (
        "UPDATE todos SET completion_fired = 1 WHERE todo_id = ?",
        "UPDATE entries SET state = 'collected', attempts = 0 WHERE state = 'dead'",
        "SELECT 1 FROM entries WHERE todo_id = ?",
        "INSERT INTO counters (name, value) VALUES (?, ?)",
        'select done from "todos"',
    ):
        assert JOURNAL_SQL.search(statement), statement
    for harmless in ("todos_with_status('in_progress')", "the todos from the database"):
        assert not JOURNAL_SQL.search(harmless), harmless


def test_no_sql_on_journal_tables_outside_the_journal() -> None:
    offenders = []
    for path in _sources():
        if path == JOURNAL:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if JOURNAL_SQL.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "SQL on journal tables belongs in agent/journal.py:\n" + "\n".join(
        offenders
    )


def test_modules_using_the_journal_change_it_only_through_its_methods() -> None:
    offenders = []
    for path in _sources():
        if path == JOURNAL:
            continue
        text = path.read_text()
        if not _uses_journal(text):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if BYPASSES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "use a named Journal transition instead:\n" + "\n".join(offenders)


def test_the_journal_guard_sees_the_modules_that_use_the_journal() -> None:
    users = {p.name for p in _sources() if p != JOURNAL and _uses_journal(p.read_text())}
    assert {"intake.py", "collector.py", "writer.py", "monitor.py", "health.py"} <= users


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/harness.py (or another helper module that is not a test_*)."""
    pattern = re.compile(r"^\s*(?:from|import)\s+tests\.(?:\w+\.)*test_\w+", re.M)
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if pattern.search(path.read_text())
    ]
    assert offenders == []


# Comparisons of an entry's state, kind or stage with a bare string: the enums say it once.
_WATCHED_ATTRS = {"state", "kind", "stage"}


def _state_literals(text: str) -> list[int]:
    """Line numbers where ``x.state``/``x.kind``/``x.stage`` is compared with a string literal
    (or a tuple of them) that is a journal State or Kind value."""
    import ast

    from agent.journal import Kind, State

    values = {str(v) for v in (*State, *Kind)}
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        watched = [s for s in sides if isinstance(s, ast.Attribute) and s.attr in _WATCHED_ATTRS]
        # An Ack's state is the protocol's word ("accepted", "queued"), not the journal's.
        if not watched or all(
            isinstance(s.value, ast.Name) and s.value.id == "ack" for s in watched
        ):
            continue
        for side in sides:
            items = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(i, ast.Constant) and i.value in values for i in items):
                found.append(node.lineno)
    return found


def test_the_literal_guard_finds_bare_states() -> None:
    assert _state_literals("ok = entry.state == 'dead'\nx = h.kind in ('normal', 'x')") == [1, 2]
    assert _state_literals("ok = entry.state == State.DEAD\nack.state == 'accepted'") == []


def test_states_and_kinds_are_compared_through_their_enums() -> None:
    # The agent's processes; not the store (the database's own vocabulary, store.base.KINDS,
    # below the journal) nor ctl and protocol (they read states off the wire).
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted((ROOT / "agent").glob("*.py"))
        if path != JOURNAL
        for line in _state_literals(path.read_text())
    ]
    assert offenders == [], f"compare with State/Kind (agent/journal.py), not strings: {offenders}"
