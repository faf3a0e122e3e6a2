"""How the todo plugin shows `claude_html_output`, for tests: the real Parsedown (Debian's
php-parsedown, run by php-cli) with its safe mode on and off, and `htmlspecialchars` in `<pre>`
(what `esc_html` does), each wrapped in an admin-like page without any Content-Security-Policy;
and a headless Chromium that opens many such pages at once and reports any script that ran or
anything that was loaded.

The plugin's docs/MARKDOWN_OUTPUT_IMPLEMENTATION.md shows both paths: `echo '<pre>' .
esc_html($todo->claude_html_output) . '</pre>';` and `$parser = new Parsedown(); echo
$parser->text($todo->claude_html_output);` (no safe mode).
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PHP = shutil.which("php") or "/usr/bin/php"
# Debian's php-parsedown; scripts/test installs it.
PARSEDOWN = Path("/usr/share/php/Parsedown/Parsedown.php")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
VIEWS = ("parsedown", "parsedown-safe", "pre")

_PHP_RENDER = r"""
require %(parsedown)s;
$docs = json_decode(stream_get_contents(STDIN), true);
$out = [];
foreach ($docs as $doc) {
    $plain = new Parsedown();
    $safe = new Parsedown();
    $safe->setSafeMode(true);
    $out[] = [
        'parsedown' => $plain->text($doc),
        'parsedown-safe' => $safe->text($doc),
        'pre' => '<pre>' . htmlspecialchars($doc, ENT_QUOTES, 'UTF-8') . '</pre>',
    ];
}
echo json_encode($out, JSON_INVALID_UTF8_SUBSTITUTE);
"""


def render_views(documents: list[str]) -> list[dict[str, str]]:
    """Each Markdown document as the plugin shows it: {"parsedown", "parsedown-safe", "pre"}."""
    code = _PHP_RENDER % {"parsedown": json.dumps(str(PARSEDOWN))}
    result = subprocess.run(
        [PHP, "-r", code],
        input=json.dumps(documents).encode(),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    views = json.loads(result.stdout)
    assert len(views) == len(documents)
    return views


# What Parsedown may emit for the report; every attribute but a safe href is a problem.
VIEW_TAGS = {
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "pre", "code", "em", "strong",
    "blockquote", "hr", "br", "table", "thead", "tbody", "tr", "th", "td", "del", "a",
}  # fmt: skip
_TAG = re.compile(r"<\s*([A-Za-z][A-Za-z0-9-]*)([^>]*)>")
_ATTR = re.compile(r"([A-Za-z-]+)\s*=\s*\"([^\"]*)\"")
_SAFE_HREF = re.compile(r"(https?:|mailto:|#)", re.IGNORECASE)


def view_problems(rendered: str) -> list[str]:
    """Elements and attributes in a rendered view that could run or load something."""
    problems = []
    for tag, attrs in _TAG.findall(rendered):
        if tag.lower() not in VIEW_TAGS:
            problems.append(f"<{tag}>")
        for name, value in _ATTR.findall(attrs):
            if name.lower() != "href" or not _SAFE_HREF.match(value):
                problems.append(f"{name}={value[:40]!r} on <{tag}>")
    return problems


DETECTOR = (
    "<script>(function(){{var n={name!r};function hit(w){{try{{parent.document.body"
    ".setAttribute('data-xss-'+n,w)}}catch(e){{}};(new Image()).src='/hit/'+n+'/'+w}}"
    "window.alert=function(){{hit('alert')}};window.confirm=window.prompt=window.print="
    "window.alert}})()</script>"
)


def admin_page(name: str, body: str) -> str:
    """`body` inside an admin-like page with no CSP, and a detector of alert/confirm/prompt."""
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        + DETECTOR.format(name=name)
        + "<title>admin</title></head><body><div class='wsj-output'>"
        + body
        + "</div></body></html>"
    )


class Browser:
    """A local HTTP server: /r/NAME serves a page; any other request is a hit (something a
    page tried to load), as is a detector call (/hit/NAME/...). `open_all` loads every page in
    iframes of one index, in one headless Chromium run."""

    CHROMIUM_FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--dump-dom",
        "--virtual-time-budget=2000",
    )

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        self.hits: list[str] = []
        pages, hits = self.pages, self.hits

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/r/") and self.path[3:] in pages:
                    body = pages[self.path[3:]].encode("utf-8", "surrogatepass")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != "/favicon.ico":
                    hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def beacon(self, name: str) -> str:
        return f"{self.base}/beacon/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, name: str, page: str) -> None:
        self.pages[name] = page

    def verdict(self, names: list[str], *, per_run: int = 60) -> None:
        """Open every page (plus a control page whose script must run), `per_run` pages to a
        Chromium run so that a loaded machine finishes each; assert that no other page ran a
        script or loaded anything."""
        for start in range(0, len(names), per_run):
            self._verdict(names[start : start + per_run], start // per_run)

    def _verdict(self, names: list[str], run: int) -> None:
        control = f"control{run}"
        self.hits[:] = [h for h in self.hits if not h.startswith("/hit/control")]
        self.add(
            control,
            admin_page(control, f"<img src=/hit/{control}/img onerror=alert(1)>"),
        )
        frames = "".join(
            f'<iframe src="/r/{html.escape(n)}" width="900" height="300"></iframe>'
            for n in [*names, control]
        )
        self.pages["index"] = (
            "<!DOCTYPE html><html><head><title>index-untouched</title></head>"
            f"<body>{frames}</body></html>"
        )
        profile = tempfile.mkdtemp(prefix="chromium-")
        try:
            result = subprocess.run(
                [
                    CHROMIUM,
                    *self.CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"{self.base}/r/index",
                ],
                capture_output=True,
                timeout=300,
            )
        finally:
            shutil.rmtree(profile, ignore_errors=True)
        dom = result.stdout.decode(errors="replace")
        fired = set(re.findall(r'data-xss-([^=\s]+)="', dom))
        assert "index-untouched" in dom, dom[:500]
        assert control in fired or any(h.startswith(f"/hit/{control}") for h in self.hits), (
            f"the detector did not see the control page's script; hits {self.hits}"
        )
        ran = sorted(fired - {control})
        loaded = [h for h in self.hits if not h.startswith(f"/hit/{control}")]
        assert not ran, f"scripts ran in {ran}"
        assert not loaded, f"pages loaded {loaded[:10]}"
