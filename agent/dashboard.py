"""The dashboard (``web.listen``): server-rendered pages over the journal and the parent's live
state, served by the ``web`` child with Starlette on Uvicorn and Jinja2 templates (autoescaped).

Every page and action needs a login: a session cookie (HttpOnly, SameSite=Strict) set by a
one-time token from ``completionctl dashboard``, or the bearer token from
``completionctl dashboard --token``.  Actions are POSTs through the parent's socket (the same
requests as the CLI), with a CSRF token for cookie sessions.  Every response carries a strict
CSP (scripts and styles from this origin only, nothing inline), ``frame-ancestors 'none'``,
``nosniff`` and ``no-referrer``; a report is shown only in a sandboxed frame (no scripts, an
opaque origin) with its own CSP.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

from protocol.config import Config

from .dashboard_assets import CSS, JS, TEMPLATES, TEXT
from .journal import COMPLETION_KINDS, Journal, Kind, State
from .webauth import bearer_ok, take_login_token

COOKIE = "completiond_session"
SESSION_TTL = 12 * 3600.0
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
# A report: no script at all, its own opaque origin, shown only inside our own pages.
REPORT_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; sandbox; "
    "frame-ancestors 'self'; form-action 'none'; base-uri 'none'"
)
SHOWN_KINDS = COMPLETION_KINDS  # normal, emergency, revision


class BadForm(ValueError):
    """An action's form lacks what the action needs (400)."""


class Sessions:
    """Logged-in browsers: session id -> (CSRF token, expiry); in memory, so a restart of the
    web process logs everyone out (they take a new URL from ``completionctl dashboard``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, tuple[str, float]] = {}

    def new(self) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._sessions = {k: v for k, v in self._sessions.items() if v[1] > now}
            self._sessions[sid] = (secrets.token_urlsafe(32), now + SESSION_TTL)
        return sid

    def csrf(self, sid: str | None) -> str | None:
        if not sid:
            return None
        with self._lock:
            found = self._sessions.get(sid)
        if found is None or found[1] < time.time():
            return None
        return found[0]


def _when(ts: float | None) -> str:
    if not ts:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _secs(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _timings(timed: dict[str, float]) -> str:
    order = ("intake", "collect", "write", "verify", "clean", "end_to_end")
    return ", ".join(f"{name} {_secs(timed[name])}" for name in order if name in timed)


def chart_svg(hours: list[Any]) -> str:
    """Completions per hour as an inline SVG made here (numbers only, escaped anyway)."""
    width, height, bar = 24 * 22 + 40, 140, 18
    peak = max([h.completions for h in hours] + [1])
    parts = [
        f'<svg class="chart" id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img">'
    ]
    for index, hour in enumerate(hours[-24:]):
        x = 30 + index * 22
        total = round(hour.completions / peak * 100)
        failed = round((hour.failed + hour.dead) / peak * 100)
        label = datetime.fromtimestamp(hour.start, UTC).strftime("%H")
        parts.append(
            f'<rect class="bar" x="{x}" y="{110 - total}" width="{bar}" height="{total}">'
            f"<title>{xml_escape(label)}:00 — {int(hour.completions)}</title></rect>"
        )
        if failed:
            parts.append(
                f'<rect class="failed" x="{x}" y="{110 - failed}" width="{bar}" '
                f'height="{failed}"></rect>'
            )
        if index % 3 == 0:
            parts.append(f'<text x="{x}" y="125">{xml_escape(label)}</text>')
    parts.append(f'<text x="0" y="12">{peak}</text><text x="0" y="110">0</text></svg>')
    return "".join(parts)


def dashboard_app(config: Config, journal: Journal, live: Any):
    from jinja2 import DictLoader, Environment, select_autoescape
    from markupsafe import Markup
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.requests import Request
    from starlette.responses import (
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        RedirectResponse,
        Response,
    )
    from starlette.routing import Route

    from .metrics import report as metrics_report
    from .metrics import timings_by_completion

    env = Environment(
        loader=DictLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    lang = config.web.language
    t = TEXT[lang]
    state_dir = Path(config.state_dir)
    sessions = Sessions()
    secure = bool(config.web.tls_cert and config.web.tls_key)
    lock = threading.Lock()  # one thread at a time on the read-only journal connection
    nav = [
        ("/", t["overview"]),
        ("/inflight", t["inflight"]),
        ("/completions", t["completions"]),
        ("/problems", t["problems"]),
    ]

    class Headers(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next):  # type: ignore[override]
            response = await call_next(request)
            if "content-security-policy" not in response.headers:
                response.headers["Content-Security-Policy"] = CSP
                response.headers["X-Frame-Options"] = "DENY"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["Cache-Control"] = "no-store"
            response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
            response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
            return response

    def who(request: Request) -> tuple[str, str | None] | None:
        """("bearer", None) or ("session", csrf), or None: not logged in."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and bearer_ok(state_dir, auth[7:].strip()):
            return ("bearer", None)
        csrf = sessions.csrf(request.cookies.get(COOKIE))
        return ("session", csrf) if csrf else None

    def refused_401() -> Response:
        page = env.get_template("login.html").render(lang=lang, t=t)
        return HTMLResponse(page, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    def live_state() -> tuple[Any, Any]:
        try:
            return live.status(), live.health()
        except Exception:
            return None, None

    def render(name: str, here: str, title: str, csrf: str | None, **data: Any) -> str:
        _status, health = data.pop("_live", (None, None))
        if health is None:
            _, health = live_state()
        with lock:
            version = _journal_mark(journal)
        return env.get_template(name).render(
            lang=lang,
            t=t,
            nav=nav,
            here=here,
            title=title,
            csrf=csrf or "",
            version=version,
            health_status=health.status if health is not None else "UNKNOWN",
            **data,
        )

    def overview_data() -> dict[str, Any]:
        status, health = live_state()
        now = time.time()
        with lock:
            metrics = metrics_report(journal, now, 86400.0)
        processes = []
        if status is not None and status.agent is not None:
            agent = status.agent
            processes.append(
                {
                    "name": "agent",
                    "pid": agent.pid,
                    "uptime": _when(agent.started_at),
                    "restarts": 0,
                }
            )
            for name, pid in agent.children.items():
                processes.append(
                    {
                        "name": name,
                        "pid": pid,
                        "uptime": _when(_started(pid)),
                        "restarts": agent.restarts.get(name, 0),
                    }
                )
        checks = health.checks if health is not None else []
        database = next((c.status for c in checks if c.name == "database"), "UNKNOWN")
        e2e = metrics.stages.get("end_to_end")
        return {
            "_live": (status, health),
            "backlog": metrics.backlog,
            "dead": metrics.dead_now,
            "p50": _secs(e2e.p50 if e2e else None),
            "p95": _secs(e2e.p95 if e2e else None),
            "database": database,
            "processes": processes,
            "checks": checks,
            "chart": Markup(chart_svg(metrics.hourly)),
        }

    def inflight_data() -> dict[str, Any]:
        now = time.time()
        predicted: set[int] = set()
        with lock:
            timers = [t_ for t_ in journal.timers() if not t_.done]
            scheduled = journal.pending_schedules()
            for name, state, _message, ids, _at in journal.checks():
                if name == "predicted_hangs" and state != "OK":
                    predicted.update(ids)
        rows = []
        for timer in sorted(timers, key=lambda x: x.todo_id):
            completion_due = (
                timer.completion_due
                if timer.completion_due and not timer.completion_fired
                else None
            )
            emergency_due = (
                timer.emergency_due if timer.emergency_due and not timer.emergency_fired else None
            )
            rows.append(
                {
                    "todo_id": timer.todo_id,
                    "session": timer.session_id,
                    "completion_due": completion_due,
                    "completion_left": f"{completion_due - now:.0f} s" if completion_due else "",
                    "emergency_due": emergency_due,
                    "emergency_left": f"{emergency_due - now:.0f} s" if emergency_due else "",
                    "last_heard": _when(timer.last_heard_at),
                    "waiting": timer.waiting,
                    "predicted": "⚠" if timer.todo_id in predicted else "",
                }
            )
        schedules = [
            {
                "todo_id": item.todo_id,
                "due_at": item.due_at,
                "left": f"{item.due_at - now:.0f} s",
                "when": _when(item.due_at),
            }
            for item in scheduled
        ]
        return {"rows": rows, "schedules": schedules}

    def completions_data() -> dict[str, Any]:
        now = time.time()
        with lock:
            heads = [
                h for h in journal.entry_heads_since(now - 7 * 86400) if h.kind in SHOWN_KINDS
            ][-200:]
            heads.reverse()
            timings = timings_by_completion(journal, [h.completion_id for h in heads])
            summaries = journal.summaries([h.completion_id for h in heads])
        revisions: dict[int, int] = {}
        for head in heads:
            if head.kind == Kind.REVISION:
                revisions[head.todo_id] = revisions.get(head.todo_id, 0) + 1
        rows = [
            {
                "completion_id": h.completion_id,
                "todo_id": h.todo_id,
                "kind": h.kind,
                "state": h.state,
                "outcome": h.outcome,
                "source": h.source,
                "revisions": revisions.get(h.todo_id, 0),
                "timings": _timings(timings.get(h.completion_id, {})),
                "summary": (summaries.get(h.completion_id) or "")[:300],
            }
            for h in heads
        ]
        return {"rows": rows}

    def todo_data(todo_id: int) -> dict[str, Any] | None:
        with lock:
            entries = journal.entries_for_todo(todo_id)
            timings = timings_by_completion(journal, [e.completion_id for e in entries])
        if not entries:
            return None
        report = None
        for entry in entries:
            if entry.html and entry.kind in SHOWN_KINDS:
                report = entry.completion_id
        return {
            "todo_id": todo_id,
            "report": report,
            "entries": [
                {
                    "completion_id": e.completion_id,
                    "kind": e.kind,
                    "state": e.state,
                    "outcome": e.outcome,
                    "source": e.source,
                    "attempts": e.attempts,
                    "last_error": e.last_error,
                    "timings": _timings(timings.get(e.completion_id, {})),
                    "when": _when(e.created_at),
                }
                for e in entries
            ],
        }

    def problems_data() -> dict[str, Any]:
        now = time.time()
        with lock:
            dead = journal.entries_in((State.DEAD,), limit=200)
            refusals = journal.refusals(limit=50)
            acked_at = journal.acknowledged_at("refused")
            resets = [
                h for h in journal.entry_heads_since(now - 7 * 86400) if h.kind == Kind.RESET
            ][-50:]
            reasons = journal.reasons([h.completion_id for h in resets])
        refused = [
            {
                "todo_id": todo_id,
                "reason": reason,
                "when": _when(at),
                "acknowledged": acked_at is not None and at <= acked_at,
            }
            for todo_id, reason, at in refusals
        ]
        return {
            "dead": dead,
            "refused": refused,
            "unacknowledged": sum(not r["acknowledged"] for r in refused),
            "acknowledged_at": _when(acked_at) if acked_at else None,
            "resets": [
                {
                    "todo_id": h.todo_id,
                    "completion_id": h.completion_id,
                    "state": h.state,
                    "reason": reasons.get(h.completion_id),
                    "when": _when(h.created_at),
                }
                for h in reversed(resets)
            ],
            "emergency_log": _tail(config.logs_dir / "emergency.log"),
        }

    async def page(request: Request, name: str, here: str, title: str, data_fn, *args) -> Response:
        user = who(request)
        if user is None:
            return refused_401()
        data = await run_in_threadpool(data_fn, *args)
        if data is None:
            return PlainTextResponse("not found", status_code=404)
        html = await run_in_threadpool(render, name, here, title, user[1], **data)
        return HTMLResponse(html)

    async def overview(request: Request) -> Response:
        return await page(request, "overview.html", "/", t["overview"], overview_data)

    async def inflight(request: Request) -> Response:
        return await page(request, "inflight.html", "/inflight", t["inflight"], inflight_data)

    async def completions(request: Request) -> Response:
        return await page(
            request, "completions.html", "/completions", t["completions"], completions_data
        )

    async def problems(request: Request) -> Response:
        return await page(request, "problems.html", "/problems", t["problems"], problems_data)

    async def todo(request: Request) -> Response:
        todo_id = _int(request.path_params["todo_id"])
        if todo_id is None:
            return PlainTextResponse("not found", status_code=404)
        return await page(request, "todo.html", "", f"{t['todo']} {todo_id}", todo_data, todo_id)

    async def report(request: Request) -> Response:
        if who(request) is None:
            return refused_401()
        todo_id = _int(request.path_params["todo_id"])
        cid = str(request.path_params["completion_id"])

        def load() -> str | None:
            with lock:
                entry = journal.entry(cid)
            if entry is None or entry.todo_id != todo_id or not entry.html:
                return None
            from .report import page_of_stored

            return page_of_stored(entry.html, entry.todo_id, config.report.language)

        html = await run_in_threadpool(load)
        if html is None:
            return PlainTextResponse("not found", status_code=404)
        return HTMLResponse(
            html,
            headers={"Content-Security-Policy": REPORT_CSP, "X-Frame-Options": "SAMEORIGIN"},
        )

    async def login(request: Request) -> Response:
        token = request.query_params.get("token", "")
        if not take_login_token(state_dir, token):
            return refused_401()
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.new(),
            max_age=int(SESSION_TTL),
            httponly=True,
            samesite="strict",
            secure=secure,
            path="/",
        )
        return response

    async def version(request: Request) -> Response:
        if who(request) is None:
            return JSONResponse({"error": "login needed"}, status_code=401)

        def mark() -> int:
            with lock:
                return _journal_mark(journal)

        return JSONResponse({"version": await run_in_threadpool(mark)})

    # Actions: each takes the posted form, asks the parent (a ctl.Client request, as the CLI's
    # command does) and names the page to go back to; BadForm is the caller's mistake (400).
    def retry_dead(form: Any) -> str:
        if form.get("all"):
            live.retry(all_dead=True)
        else:
            live.retry(str(form.get("completion_id") or ""))
        return "/problems"

    def force_emergency(form: Any) -> str:
        todo_id = _int(str(form.get("todo_id") or ""))
        if todo_id is None:
            raise BadForm("todo_id missing")
        live.emergency(todo_id, reason="forced from the dashboard")
        return "/inflight"

    def acknowledge(form: Any) -> str:
        check = str(form.get("check") or "")
        if not check:
            raise BadForm("check missing")
        live.acknowledge(check)
        return "/problems"

    actions = {"retry": retry_dead, "emergency": force_emergency, "ack": acknowledge}

    async def action(request: Request) -> Response:
        user = who(request)
        if user is None:
            return refused_401()
        form = await request.form()
        if user[0] == "session":
            presented = str(form.get("csrf") or request.headers.get("x-csrf-token") or "")
            if not hmac.compare_digest(presented.encode(), str(user[1]).encode()):
                return PlainTextResponse("CSRF token missing or wrong", status_code=403)
        act = actions.get(request.path_params["what"])
        if act is None:
            return PlainTextResponse("no such action", status_code=404)
        try:
            where = await run_in_threadpool(act, form)
        except BadForm as exc:
            return PlainTextResponse(str(exc), status_code=400)
        except Exception as exc:  # a refusal or the agent away: say so
            return PlainTextResponse(f"not done: {exc}", status_code=409)
        return RedirectResponse(where, status_code=303)

    async def css(request: Request) -> Response:
        return Response(CSS, media_type="text/css")

    async def js(request: Request) -> Response:
        return Response(JS, media_type="text/javascript")

    routes = [
        Route("/", overview),
        Route("/inflight", inflight),
        Route("/completions", completions),
        Route("/problems", problems),
        Route("/todo/{todo_id}", todo),
        Route("/todo/{todo_id}/report/{completion_id}", report),
        Route("/login", login),
        Route("/api/version", version),
        Route("/action/{what}", action, methods=["POST"]),
        Route("/static/dash.css", css),
        Route("/static/live.js", js),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Headers)])


def _journal_mark(journal: Journal) -> int:
    """Changes whenever the journal does: its newest stage row (every state change adds one)."""
    return journal.latest_stage_rowid()


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() and 0 < int(text) < 2**63 else None


def _started(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None


def _tail(path: Path, lines: int = 40, limit: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(size - limit, 0))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
