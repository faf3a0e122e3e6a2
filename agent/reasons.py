"""The agent's own reasons for a forced completion or a reset, in every report language.

The journal, the logs and `completionctl status` keep a reason in English (the form
`english()` makes); the report and the summary show it in `report.language` through
`localize()`, which recognizes the reasons made here by their English template. A reason a
person gave (`completionctl emergency --reason ...`) matches none and is shown as given.
"""

from __future__ import annotations

import re

TEMPLATES: dict[str, dict[str, str]] = {
    "deadline": {
        "en": "no completion and no heartbeat for {timeout} s (completion deadline passed)",
        "de": "kein Abschluss und kein Lebenszeichen seit {timeout} s (Abschlussfrist abgelaufen)",
    },
    "predicted_hang": {
        "en": (
            "predicted hang: no heartbeat for {silent} s, past what this project's history "
            "allows (predict.act = shorten; the configured timeout is {timeout} s)"
        ),
        "de": (
            "vorhergesagter Hänger: seit {silent} s kein Lebenszeichen, länger als die "
            "Vorgeschichte dieses Projekts erlaubt (predict.act = shorten; eingestellte Frist "
            "{timeout} s)"
        ),
    },
    "hanging": {
        "en": (
            "auto-recovery: the todo was hanging (in_progress with nothing heard for {silent} s, "
            "over hanging_after {limit} s)"
        ),
        "de": (
            "automatische Wiederherstellung: das Todo hing (in_progress, seit {silent} s nichts "
            "gehört, über hanging_after {limit} s)"
        ),
    },
    "no_session": {
        "en": "auto-recovery: in_progress with no live session",
        "de": "automatische Wiederherstellung: in_progress ohne laufende Sitzung",
    },
}

_FIELD = re.compile(r"\{(\w+)\}")


def english(key: str, **params: object) -> str:
    """The reason `key` in English, as the journal and the logs keep it."""
    return TEMPLATES[key]["en"].format(**params)


def _pattern(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # literal, name, literal, name, ..., literal
    regex = "".join(
        re.escape(part) if i % 2 == 0 else rf"(?P<{part}>[^\s()]+?)" for i, part in enumerate(parts)
    )
    return re.compile(regex)


_PATTERNS = [(key, _pattern(words["en"])) for key, words in TEMPLATES.items()]


def localize(reason: str, language: str) -> str:
    """An agent-made reason in `language` (German for any language not known); any other
    reason unchanged."""
    if language == "en":
        return reason
    for key, pattern in _PATTERNS:
        match = pattern.fullmatch(reason)
        if match:
            words = TEMPLATES[key]
            return words.get(language, words["de"]).format(**match.groupdict())
    return reason
