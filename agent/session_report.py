"""The session's facts as the report shows them: files, commands, errors, duration, the git
evidence, and the summary line in the todo plugin's pattern
(`✅ 3 Dateien erstellt, 2 geändert, 5 Befehle, 1 Fehler`).

Everything here is plain text (one line per item, sanitized by the caller's `clean`); the
Markdown and the page render it, each escaping in its own way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import tzinfo

from agent.session_facts import ChainFacts, SessionFacts

LAST_COMMANDS = 10
LAST_ERRORS = 10
MAX_FILES_SHOWN = 50

WORDS: dict[str, dict[str, str]] = {
    "de": {
        "files": "Dateien",
        "created": "Erstellt",
        "modified": "Geändert",
        "commands": "Befehle",
        "errors": "Fehler",
        "session": "Sitzung",
        "evidence": "Nachweis (git)",
        "none": "keine",
        "earlier": "… und {n} frühere",
        "more": "… und {n} weitere",
        "exit": "Exit-Code {code}",
        "no_result": "ohne Ergebnis",
        "duration": "Dauer: {d} ({start} bis {end})",
        "model": "Modell: {m}",
        "tokens": "Tokens: {i} ein, {o} aus",
        "side": "Subagenten: {c} erstellt, {m} geändert, {k} Befehle, {e} Fehler",
        "lacks": "Aus dieser Quelle ({source}) fehlen: Dateien, Befehle, Fehler, Dauer.",
        "warning": (
            "Achtung: Die Antwort meldet Erfolg, aber der letzte Testbefehl ist "
            "fehlgeschlagen: {cmd}"
        ),
        "git_claimed": "{tools} an {n} Dateien; git sieht {seen} geändert",
        "git_head": "Stand beim Start: {head}",
        "git_unchanged": "Gemeldet, aber für git unverändert: {path}",
        "git_unclaimed": "Von git gesehen, aber nicht gemeldet: {path}",
        "git_stat": "{line}",
        "git_missing": "Kein git-Nachweis: {why}",
        "git_base_unknown": "Stand beim Start unbekannt: verglichen mit dem aktuellen HEAD",
        "git_untracked": "{path} (neu, nicht versioniert)",
        "git_more_lines": "… {n} weitere Zeilen",
        "missing_no_workdir": "das Arbeitsverzeichnis der Sitzung ist unbekannt",
        "missing_git_timeout": "git hat nicht rechtzeitig geantwortet",
        "missing_not_a_repository": "das Arbeitsverzeichnis ist kein git-Repository",
        "missing_no_commit": "das Repository hat noch keinen Commit",
        "missing_diff_timeout": "git diff ist nicht rechtzeitig fertig geworden",
        "missing_diff_failed": "git diff ist fehlgeschlagen ({detail})",
    },
    "en": {
        "files": "Files",
        "created": "Created",
        "modified": "Modified",
        "commands": "Commands",
        "errors": "Errors",
        "session": "Session",
        "evidence": "Evidence (git)",
        "none": "none",
        "earlier": "… and {n} earlier",
        "more": "… and {n} more",
        "exit": "exit code {code}",
        "no_result": "no result",
        "duration": "Duration: {d} ({start} to {end})",
        "model": "Model: {m}",
        "tokens": "Tokens: {i} in, {o} out",
        "side": "Subagents: {c} created, {m} modified, {k} commands, {e} errors",
        "lacks": "This source ({source}) lacks: files, commands, errors, duration.",
        "warning": "Warning: the answer claims success, but the last test command failed: {cmd}",
        "git_claimed": "{tools} on {n} files; git sees {seen} changed",
        "git_head": "HEAD at start: {head}",
        "git_unchanged": "Claimed, but unchanged for git: {path}",
        "git_unclaimed": "Seen by git, not claimed: {path}",
        "git_stat": "{line}",
        "git_missing": "No git evidence: {why}",
        "git_base_unknown": "HEAD at start unknown: compared with the current HEAD",
        "git_untracked": "{path} (new, untracked)",
        "git_more_lines": "… {n} more lines",
        "missing_no_workdir": "the session's working directory is unknown",
        "missing_git_timeout": "git did not answer in time",
        "missing_not_a_repository": "the working directory is not a git repository",
        "missing_no_commit": "the repository has no commit yet",
        "missing_diff_timeout": "git diff did not finish in time",
        "missing_diff_failed": "git diff failed ({detail})",
    },
}

# The summary's counts, (one, many) per language: `✅ 3 Dateien erstellt, 2 geändert, ...`.
PLURALS: dict[str, dict[str, tuple[str, str]]] = {
    "de": {
        "created": ("{n} Datei erstellt", "{n} Dateien erstellt"),
        "modified": ("{n} geändert", "{n} geändert"),
        "commands": ("{n} Befehl", "{n} Befehle"),
        "errors": ("{n} Fehler", "{n} Fehler"),
    },
    "en": {
        "created": ("{n} file created", "{n} files created"),
        "modified": ("{n} modified", "{n} modified"),
        "commands": ("{n} command", "{n} commands"),
        "errors": ("{n} error", "{n} errors"),
    },
}

_TEST_COMMAND = re.compile(
    r"\b(pytest|py\.test|tox|nox|phpunit|jest|vitest|mocha|rspec|ctest|"
    r"(npm|pnpm|yarn|bun)\s+(run\s+)?test|go\s+test|cargo\s+test|make\s+(check|test)|"
    r"mvn\s+(\S+\s+)*test|gradle\w*\s+test|python\d?\s+-m\s+(pytest|unittest)|scripts/test)\b"
)
_SUCCESS = re.compile(
    r"(✅|\ball (the )?tests? (now )?pass|\btests? (are )?(now )?pass(ing|ed)?\b|\bsuccessful|"
    r"\bsucceed|\bcompleted\b|\bdone\b|\bfixed\b|\balle tests|\berfolgreich|\bbestanden|"
    r"\bfertig\b|\berledigt\b|\bbehoben\b|\bfunktioniert\b)",
    re.IGNORECASE,
)


@dataclass
class GitEvidence:
    """What git saw between the session's start and its completion (agent/git_evidence.py)."""

    head: str | None  # HEAD at start
    changed: list[str] = field(default_factory=list)  # paths, relative to the repository
    stat_lines: list[str] = field(default_factory=list)  # `git diff --stat` lines, bounded
    root: str = ""  # the repository's top level
    # why there is no evidence: a code ("not_a_repository", "git_timeout", ...; WORDS has
    # "missing_<code>"), with `missing_detail` for "diff_failed"
    missing: str | None = None
    missing_detail: str = ""
    untracked: list[str] = field(default_factory=list)  # new files, bounded
    stat_omitted: int = 0  # `git diff --stat` lines left out
    base_unknown: bool = False  # no HEAD recorded at start: compared with the current HEAD


@dataclass
class SessionView:
    sections: list[tuple[str, list[str]]]  # (title, items) in the report's order
    summary: str | None  # the counts line, None when there were no tool calls
    warning: str | None


def _plural(language: str, key: str, n: int) -> str:
    one, many = PLURALS.get(language, PLURALS["de"])[key]
    return (one if n == 1 else many).format(n=n)


def _duration(seconds: float) -> str:
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def claims_success(answer: str) -> bool:
    return bool(_SUCCESS.search(answer[:4000]))


def is_test_command(command: str) -> bool:
    return bool(_TEST_COMMAND.search(command))


def counts_line(main: ChainFacts, language: str) -> str:
    return ", ".join(
        [
            _plural(language, "created", len(main.created)),
            _plural(language, "modified", len(main.modified)),
            _plural(language, "commands", main.commands_total),
            _plural(language, "errors", len(main.errors)),
        ]
    )


def session_view(
    facts: SessionFacts | None,
    evidence: GitEvidence | None,
    *,
    answer: str,
    source: str,
    language: str,
    zone: tzinfo,
    clean: Callable[[str], str],
) -> SessionView:
    """The report's session sections and the summary's counts; `clean` makes one untrusted
    string a safe single line (the report's sanitizer)."""
    words = WORDS.get(language, WORDS["de"])
    sections: list[tuple[str, list[str]]] = []
    if facts is None:
        sections.append((words["session"], [words["lacks"].format(source=clean(source))]))
        if evidence is not None:
            sections.append((words["evidence"], _evidence_items(evidence, None, words, clean)))
        return SessionView(sections, None, None)
    main = facts.main
    files: list[str] = []
    for key, paths in (("created", main.created), ("modified", main.modified)):
        if paths:
            files.append(f"{words[key]} ({len(paths)}):")
            files += [f"  {clean(p)}" for p in paths[:MAX_FILES_SHOWN]]
            if len(paths) > MAX_FILES_SHOWN:
                files.append("  " + words["more"].format(n=len(paths) - MAX_FILES_SHOWN))
    n_files = len(main.created) + len(main.modified)
    sections.append((f"{words['files']} ({n_files})", files or [words["none"]]))
    shown = main.commands[-LAST_COMMANDS:]
    commands = []
    earlier = main.commands_total - len(shown)
    if earlier > 0:
        commands.append(words["earlier"].format(n=earlier))
    for c in shown:
        mark = "✅" if c.ok else ("❌" if c.ok is False else "…")
        detail = ""
        if c.exit_code is not None:
            detail = " (" + words["exit"].format(code=c.exit_code) + ")"
        elif c.ok is None:
            detail = f" ({words['no_result']})"
        commands.append(f"{mark} {clean(c.command)}{detail}")
    sections.append((f"{words['commands']} ({main.commands_total})", commands or [words["none"]]))
    errors = [clean(e) for e in main.errors[-LAST_ERRORS:]]
    if len(main.errors) > LAST_ERRORS:
        errors.insert(0, words["earlier"].format(n=len(main.errors) - LAST_ERRORS))
    sections.append((f"{words['errors']} ({len(main.errors)})", errors or [words["none"]]))
    session: list[str] = []
    if facts.duration_s is not None and facts.first_at and facts.last_at:
        start = facts.first_at.astimezone(zone).strftime("%H:%M:%S")
        end = facts.last_at.astimezone(zone).strftime("%H:%M:%S")
        session.append(
            words["duration"].format(d=_duration(facts.duration_s), start=start, end=end)
        )
    if facts.model:
        session.append(words["model"].format(m=clean(facts.model)))
    if facts.tokens_in or facts.tokens_out:
        session.append(words["tokens"].format(i=facts.tokens_in, o=facts.tokens_out))
    side = facts.side
    if side.tool_calls:
        session.append(
            words["side"].format(
                c=len(side.created),
                m=len(side.modified),
                k=side.commands_total,
                e=len(side.errors),
            )
        )
    sections.append((words["session"], session or [words["none"]]))
    if evidence is not None:
        sections.append((words["evidence"], _evidence_items(evidence, main, words, clean)))
    warning = None
    tests = [c for c in main.commands if is_test_command(c.command)]
    if tests and tests[-1].ok is False and claims_success(answer):
        warning = words["warning"].format(cmd=clean(tests[-1].command))
    summary = counts_line(main, language) if main.tool_calls else None
    return SessionView(sections, summary, warning)


def _evidence_items(
    evidence: GitEvidence,
    main: ChainFacts | None,
    words: dict[str, str],
    clean: Callable[[str], str],
) -> list[str]:
    if evidence.missing:
        why = words.get("missing_" + evidence.missing)
        why = why.format(detail=clean(evidence.missing_detail)) if why else clean(evidence.missing)
        return [words["git_missing"].format(why=why)]
    items = []
    if evidence.base_unknown:
        items.append(words["git_base_unknown"])
    if evidence.head:
        items.append(words["git_head"].format(head=evidence.head[:12]))
    seen = set(evidence.changed)
    if main is not None:
        claimed = _relative(main.created + main.modified, evidence.root)
        tools = "Write/Edit"
        items.append(words["git_claimed"].format(tools=tools, n=len(claimed), seen=len(seen)))
        for path in claimed:
            if path not in seen:
                items.append(words["git_unchanged"].format(path=clean(path)))
        for path in sorted(seen - set(claimed))[:MAX_FILES_SHOWN]:
            items.append(words["git_unclaimed"].format(path=clean(path)))
    items += [clean(line) for line in evidence.stat_lines]
    if evidence.stat_omitted:
        items.append(words["git_more_lines"].format(n=evidence.stat_omitted))
    items += [" " + words["git_untracked"].format(path=clean(p)) for p in evidence.untracked]
    return items


def _relative(paths: list[str], root: str) -> list[str]:
    out = []
    prefix = root.rstrip("/") + "/" if root else ""
    for p in paths:
        out.append(p[len(prefix) :] if prefix and p.startswith(prefix) else p)
    return out
