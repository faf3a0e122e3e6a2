"""The report as Markdown: what the todo plugin stores in `claude_html_output` and shows.

The plugin shows that column in three ways (its docs/MARKDOWN_OUTPUT_IMPLEMENTATION.md): as
escaped text in `<pre>` (`esc_html`), and through Parsedown, with its safe mode and without it.
Without safe mode Parsedown passes inline HTML and HTML blocks through and keeps any link
scheme, so the Markdown itself must carry nothing that becomes markup:

- text from outside (output, description, system status) goes into indented code blocks, each
  right after a heading and a blank line: every line starts with four spaces, so no line of it
  can open an HTML block, a fence, a list or a link definition, and code is always escaped;
- a value inside a line (title, source, working directory, problems, reason) is one line with
  `\\`, `[`, `]` and backticks backslash-escaped (no link, image or code span can form) and a
  zero-width space after every `<` (no tag, comment or autolink can form);
- the first line is plain text saying what was done, for the plugin's 100-character preview.

Everything here receives text already sanitized by `agent.report` (no controls, no escape
sequences, bidi controls made visible, capped).
"""

from __future__ import annotations

from agent.sources import cap_text

ZWSP = "\u200b"
_INLINE_ESCAPES = str.maketrans({"\\": "\\\\", "[": "\\[", "]": "\\]", "`": "\\`"})
INDENT = "    "


def md_inline(text: str) -> str:
    """`text` as inert Markdown inside a line: one line, no link, image, code span or tag."""
    line = " ".join(text.split())
    return line.translate(_INLINE_ESCAPES).replace("<", "<" + ZWSP)


def md_code_block(text: str) -> str:
    """`text` as an indented code block (the caller puts a heading and a blank line before)."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(INDENT + line if line.strip() else "" for line in lines)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _fitted_block(text: str, budget: int) -> str:
    """`md_code_block(text)` with `text` cut (head and tail kept, a note) to fit `budget`."""
    for _ in range(8):
        block = md_code_block(text)
        size = _utf8_len(block)
        if size <= budget:
            return block
        keep = int(_utf8_len(text) * budget / size * 0.9) - 200
        text = cap_text(text, max(0, keep))
    return ""


def report_markdown(
    *,
    todo_id: int,
    title: str,
    kind: str,
    facts: list[tuple[str, str]],
    summary: str,
    description: str,
    text: str,
    reason: str | None,
    system_status: str | None,
    problems: list[str],
    max_bytes: int,
    words: dict[str, str],
    session: list[tuple[str, list[str]]] = (),  # type: ignore[assignment]
    warning: str | None = None,
) -> str:
    """The whole report as Markdown of at most `max_bytes` UTF-8 bytes: what was done, the
    final answer, then the session's files, commands, errors and duration, then the rest."""
    forced = kind == "emergency"
    mark = "⚠️" if forced or warning else "✅"
    what = words["forced"] if forced else words["done"]
    budget = max_bytes // 16
    first = [f"{mark} {words['todo']} #{todo_id} {what}: {md_inline(title)}", ""]
    if warning:
        first += [f"⚠️ {md_inline(warning)}", ""]
    parts: list[str] = []
    for heading, items in session:
        parts += [f"## {md_inline(heading)}", ""]
        parts += [f"- {md_inline(item)}" for item in items]
        parts.append("")
    parts += [
        f"## {words['completion']}",
        "",
        *(f"- {name}: {md_inline(value)}" for name, value in facts),
        "",
    ]
    if forced:
        parts += [
            f"## {words['forced_title']}",
            "",
            f"{words['forced_text']} {md_inline(reason or words['no_reason'])}",
            "",
        ]
        if system_status and system_status.strip():
            parts += [f"### {words['system']}", "", _fitted_block(system_status, budget), ""]
    parts += [f"## {words['summary']}", "", md_inline(summary), ""]
    if description.strip():
        parts += [f"## {words['description']}", "", _fitted_block(description, budget), ""]
    tail = [f"## {words['problems']}", ""]
    if problems:
        used = 0
        for index, problem in enumerate(problems):
            item = f"- {md_inline(problem)}"
            if used + _utf8_len(item) > budget - 200:
                tail.append("- " + words["more_problems"].format(n=len(problems) - index))
                break
            tail.append(item)
            used += _utf8_len(item) + 1
    else:
        tail.append(words["no_problems"])
    tail.append("")
    head = "\n".join(first)
    rest = "\n".join(parts + tail)
    output_title = f"## {words['output']}\n\n"
    room = max_bytes - _utf8_len(head) - _utf8_len(rest) - _utf8_len(output_title) - 16
    if text.strip():
        block = _fitted_block(text, room) or INDENT + words["too_large"]
    else:
        block = words["no_output"]
    return f"{head}\n{output_title}{block}\n\n{rest}"
