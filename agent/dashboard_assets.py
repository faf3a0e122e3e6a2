# ruff: noqa: E501  (HTML templates: a table row reads best on one line)
"""The dashboard's templates (Jinja2, autoescaped), its stylesheet and its one script.

They are served from the web process's own origin: the CSP allows scripts and styles from
``'self'`` only, never inline, so nothing a todo's title or output holds can run even if it
reached a page unescaped.
"""

from __future__ import annotations

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1f24; background: #f6f7f9; }
header { background: #24292f; color: #fff; padding: 8px 16px; display: flex; gap: 16px; }
header a { color: #fff; text-decoration: none; }
header a.here { text-decoration: underline; }
header .status-OK { color: #7ee787; } header .status-WARNING { color: #f2cc60; }
header .status-CRITICAL { color: #ff7b72; } header .status-UNKNOWN { color: #c9d1d9; }
main { padding: 16px; max-width: 1200px; }
table { border-collapse: collapse; background: #fff; margin-bottom: 16px; width: 100%; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.OK { color: #1a7f37; } .WARNING { color: #9a6700; } .CRITICAL { color: #cf222e; }
.UNKNOWN { color: #57606a; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid #d0d7de; padding: 8px 12px; min-width: 140px; }
.card b { display: block; font-size: 20px; }
iframe.report { width: 100%; height: 600px; border: 1px solid #d0d7de; background: #fff; }
form.inline { display: inline; }
.summary { max-width: 480px; overflow-wrap: anywhere; white-space: pre-wrap; }
pre.log { background: #fff; border: 1px solid #d0d7de; padding: 8px; overflow-x: auto; }
svg.chart rect.bar { fill: #0969da; } svg.chart rect.failed { fill: #cf222e; }
svg.chart text { font-size: 10px; fill: #57606a; }
"""

# Live updates without inline script: poll /api/version; when the journal changed, fetch this
# page again and swap its <main> (rendered and escaped on the server).  Countdowns tick locally.
JS = """
(function () {
  "use strict";
  var main = document.querySelector("main");
  if (!main) { return; }
  var version = main.getAttribute("data-version");
  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-due]").forEach(function (el) {
      var left = Math.round(parseFloat(el.getAttribute("data-due")) - now);
      el.textContent = left >= 0 ? left + " s" : "-" + (-left) + " s";
    });
  }
  function refresh() {
    fetch("/api/version", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data || String(data.version) === version) { return; }
        return fetch(location.href, { credentials: "same-origin", headers: { "X-Partial": "1" } })
          .then(function (r) { return r.ok ? r.text() : null; })
          .then(function (html) {
            if (html === null) { return; }
            var doc = new DOMParser().parseFromString(html, "text/html");
            var fresh = doc.querySelector("main");
            if (!fresh) { return; }
            main.replaceChildren.apply(main, Array.from(fresh.childNodes));
            version = fresh.getAttribute("data-version");
            main.setAttribute("data-version", version);
            tick();
          });
      })
      .catch(function () {});
  }
  tick();
  setInterval(tick, 1000);
  setInterval(refresh, 2000);
})();
"""

TEMPLATES = {
    "base.html": """<!DOCTYPE html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>completiond — {{ title }}</title>
<link rel="stylesheet" href="/static/dash.css">
<script src="/static/live.js" defer></script>
</head>
<body>
<header>
<strong>completiond</strong>
{% for path, label in nav %}<a href="{{ path }}"{% if path == here %} class="here"{% endif %}>{{ label }}</a>
{% endfor %}
<span class="status-{{ health_status }}">{{ t.health }}: {{ health_status }}</span>
</header>
<main data-version="{{ version }}">
<h1>{{ title }}</h1>
{% block main %}{% endblock %}
</main>
</body>
</html>
""",
    "overview.html": """{% extends "base.html" %}{% block main %}
<div class="cards">
<div class="card">{{ t.backlog }}<b id="backlog">{{ backlog }}</b></div>
<div class="card">{{ t.dead }}<b id="dead">{{ dead }}</b></div>
<div class="card">{{ t.p50 }}<b id="p50">{{ p50 }}</b></div>
<div class="card">{{ t.p95 }}<b id="p95">{{ p95 }}</b></div>
<div class="card">{{ t.database }}<b id="database" class="{{ database }}">{{ database }}</b></div>
</div>
<h2>{{ t.processes }}</h2>
<table id="processes"><tr><th>{{ t.process }}</th><th>pid</th><th>{{ t.uptime }}</th><th>{{ t.restarts }}</th></tr>
{% for p in processes %}<tr><td>{{ p.name }}</td><td class="num">{{ p.pid or "—" }}</td><td>{{ p.uptime }}</td><td class="num">{{ p.restarts }}</td></tr>
{% endfor %}</table>
<h2>{{ t.checks }}</h2>
<table id="checks"><tr><th>{{ t.check }}</th><th>{{ t.state }}</th><th>{{ t.message }}</th></tr>
{% for c in checks %}<tr><td>{{ c.name }}</td><td class="{{ c.status }}">{{ c.status }}</td><td>{{ c.message }}</td></tr>
{% endfor %}</table>
<h2>{{ t.per_hour }}</h2>
{{ chart }}
{% endblock %}""",
    "inflight.html": """{% extends "base.html" %}{% block main %}
<table id="inflight"><tr><th>Todo</th><th>{{ t.session }}</th><th>{{ t.completion_deadline }}</th><th>{{ t.emergency_deadline }}</th><th>{{ t.last_heard }}</th><th>{{ t.waiting }}</th><th>{{ t.predicted }}</th><th></th></tr>
{% for r in rows %}<tr data-todo="{{ r.todo_id }}"><td><a href="/todo/{{ r.todo_id }}">{{ r.todo_id }}</a></td><td>{{ r.session or "—" }}</td>
<td>{% if r.completion_due %}<span data-due="{{ r.completion_due }}">{{ r.completion_left }}</span>{% else %}—{% endif %}</td>
<td>{% if r.emergency_due %}<span data-due="{{ r.emergency_due }}">{{ r.emergency_left }}</span>{% else %}—{% endif %}</td>
<td>{{ r.last_heard }}</td><td>{{ r.waiting or "" }}</td><td>{{ r.predicted or "" }}</td>
<td><form class="inline" method="post" action="/action/emergency"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="todo_id" value="{{ r.todo_id }}"><button type="submit" id="force-{{ r.todo_id }}">{{ t.force }}</button></form></td></tr>
{% else %}<tr><td colspan="8">{{ t.none }}</td></tr>{% endfor %}</table>
<h2>{{ t.scheduled }}</h2>
<table id="scheduled"><tr><th>Todo</th><th>{{ t.due }}</th><th>{{ t.due_in }}</th></tr>
{% for r in schedules %}<tr data-todo="{{ r.todo_id }}"><td><a href="/todo/{{ r.todo_id }}">{{ r.todo_id }}</a></td><td>{{ r.when }}</td><td><span data-due="{{ r.due_at }}">{{ r.left }}</span></td></tr>
{% else %}<tr><td colspan="3">{{ t.none }}</td></tr>{% endfor %}</table>
{% endblock %}""",
    "completions.html": """{% extends "base.html" %}{% block main %}
<table id="completions"><tr><th>Todo</th><th>{{ t.kind }}</th><th>{{ t.state }}</th><th>{{ t.source }}</th><th>{{ t.revisions }}</th><th>{{ t.timings }}</th><th>{{ t.summary }}</th></tr>
{% for r in rows %}<tr data-completion="{{ r.completion_id }}"><td><a href="/todo/{{ r.todo_id }}">{{ r.todo_id }}</a></td><td>{{ r.kind }}</td><td>{{ r.state }}{% if r.outcome %} ({{ r.outcome }}){% endif %}</td><td>{{ r.source or "—" }}</td><td class="num">{{ r.revisions }}</td><td>{{ r.timings }}</td><td class="summary">{{ r.summary or "" }}</td></tr>
{% else %}<tr><td colspan="7">{{ t.none }}</td></tr>{% endfor %}</table>
{% endblock %}""",
    "todo.html": """{% extends "base.html" %}{% block main %}
<table id="history"><tr><th>{{ t.completion }}</th><th>{{ t.kind }}</th><th>{{ t.state }}</th><th>{{ t.source }}</th><th>{{ t.attempts }}</th><th>{{ t.error }}</th><th>{{ t.timings }}</th><th>{{ t.when }}</th></tr>
{% for e in entries %}<tr><td>{{ e.completion_id }}</td><td>{{ e.kind }}</td><td>{{ e.state }}{% if e.outcome %} ({{ e.outcome }}){% endif %}</td><td>{{ e.source or "—" }}</td><td class="num">{{ e.attempts }}</td><td>{{ e.last_error or "" }}</td><td>{{ e.timings }}</td><td>{{ e.when }}</td></tr>
{% endfor %}</table>
{% if report %}<h2>{{ t.report }}</h2>
<iframe class="report" id="report" sandbox="" referrerpolicy="no-referrer" src="/todo/{{ todo_id }}/report/{{ report }}" title="{{ t.report }}"></iframe>
{% endif %}
{% endblock %}""",
    "problems.html": """{% extends "base.html" %}{% block main %}
<h2>{{ t.dead_entries }}</h2>
{% if dead %}<form method="post" action="/action/retry"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="all" value="1"><button type="submit" id="retry-all">{{ t.retry_all }}</button></form>{% endif %}
<table id="dead"><tr><th>Todo</th><th>{{ t.completion }}</th><th>{{ t.kind }}</th><th>{{ t.error }}</th><th></th></tr>
{% for e in dead %}<tr><td><a href="/todo/{{ e.todo_id }}">{{ e.todo_id }}</a></td><td>{{ e.completion_id }}</td><td>{{ e.kind }}</td><td>{{ e.last_error or "" }}</td>
<td><form class="inline" method="post" action="/action/retry"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="completion_id" value="{{ e.completion_id }}"><button type="submit">{{ t.retry }}</button></form></td></tr>
{% else %}<tr><td colspan="5">{{ t.none }}</td></tr>{% endfor %}</table>
<h2>{{ t.refusals }}</h2>
{% if unacknowledged %}<form method="post" action="/action/ack"><input type="hidden" name="csrf" value="{{ csrf }}"><input type="hidden" name="check" value="refused"><button type="submit" id="ack-refused">{{ t.ack_refused }}</button></form>{% endif %}
{% if acknowledged_at %}<p id="refused-acknowledged">{{ t.acknowledged_at }} {{ acknowledged_at }}</p>{% endif %}
<table id="refused"><tr><th>Todo</th><th>{{ t.reason }}</th><th>{{ t.when }}</th><th>{{ t.ack_column }}</th></tr>
{% for r in refused %}<tr data-todo="{{ r.todo_id }}"><td><a href="/todo/{{ r.todo_id }}">{{ r.todo_id }}</a></td><td>{{ r.reason or "" }}</td><td>{{ r.when }}</td><td>{% if r.acknowledged %}{{ t.acknowledged }}{% endif %}</td></tr>
{% else %}<tr><td colspan="4">{{ t.none }}</td></tr>{% endfor %}</table>
<h2>{{ t.resets }}</h2>
<table id="resets"><tr><th>Todo</th><th>{{ t.completion }}</th><th>{{ t.state }}</th><th>{{ t.reason }}</th><th>{{ t.when }}</th></tr>
{% for e in resets %}<tr><td><a href="/todo/{{ e.todo_id }}">{{ e.todo_id }}</a></td><td>{{ e.completion_id }}</td><td>{{ e.state }}</td><td>{{ e.reason or "" }}</td><td>{{ e.when }}</td></tr>
{% else %}<tr><td colspan="5">{{ t.none }}</td></tr>{% endfor %}</table>
<h2>{{ t.emergency_log }}</h2>
<pre class="log" id="emergency-log">{{ emergency_log }}</pre>
{% endblock %}""",
    "login.html": """<!DOCTYPE html>
<html lang="{{ lang }}"><head><meta charset="utf-8"><title>completiond</title>
<link rel="stylesheet" href="/static/dash.css"></head>
<body><main><h1>{{ t.login_needed }}</h1><p>{{ t.login_how }}</p></main></body></html>
""",
}

TEXT = {
    "en": {
        "overview": "Overview",
        "inflight": "In flight",
        "completions": "Completions",
        "problems": "Problems",
        "health": "Health",
        "backlog": "Backlog",
        "dead": "Dead",
        "p50": "End to end p50 (24 h)",
        "p95": "End to end p95 (24 h)",
        "database": "Database",
        "processes": "Processes",
        "process": "Process",
        "uptime": "Up since",
        "restarts": "Restarts",
        "checks": "Health checks",
        "check": "Check",
        "state": "State",
        "message": "Message",
        "per_hour": "Completions per hour (24 h)",
        "session": "Session",
        "completion_deadline": "Completion deadline in",
        "emergency_deadline": "Emergency deadline in",
        "last_heard": "Last heard",
        "waiting": "Waiting for a person",
        "predicted": "Predicted hang",
        "force": "Force emergency completion",
        "none": "Nothing here.",
        "kind": "Kind",
        "source": "Source",
        "revisions": "Revisions",
        "timings": "Stage timings",
        "summary": "Summary",
        "completion": "Completion",
        "attempts": "Attempts",
        "error": "Last error",
        "when": "When",
        "report": "Report",
        "dead_entries": "Dead entries",
        "retry": "Retry",
        "retry_all": "Retry all dead entries",
        "refusals": "Refused by the database",
        "ack_refused": "Acknowledge refusals",
        "acknowledged": "acknowledged",
        "ack_column": "Acknowledged",
        "acknowledged_at": "Refusals acknowledged at",
        "reason": "Reason",
        "resets": "Resets",
        "emergency_log": "Emergency log (latest lines)",
        "todo": "Todo",
        "login_needed": "Login needed",
        "login_how": "Run `completionctl dashboard` on the agent's host and open the URL it prints "
        "(it holds a one-time login token).",
        "done": "Done",
        "scheduled": "Scheduled completions",
        "due": "Due",
        "due_in": "Due in",
    },
    "de": {
        "overview": "Übersicht",
        "inflight": "In Arbeit",
        "completions": "Abschlüsse",
        "problems": "Probleme",
        "health": "Zustand",
        "backlog": "Rückstau",
        "dead": "Aufgegeben",
        "p50": "Gesamtdauer p50 (24 h)",
        "p95": "Gesamtdauer p95 (24 h)",
        "database": "Datenbank",
        "processes": "Prozesse",
        "process": "Prozess",
        "uptime": "Läuft seit",
        "restarts": "Neustarts",
        "checks": "Zustandsprüfungen",
        "check": "Prüfung",
        "state": "Zustand",
        "message": "Meldung",
        "per_hour": "Abschlüsse pro Stunde (24 h)",
        "session": "Sitzung",
        "completion_deadline": "Abschlussfrist in",
        "emergency_deadline": "Notfallfrist in",
        "last_heard": "Zuletzt gehört",
        "waiting": "Wartet auf eine Person",
        "predicted": "Vermutlich hängend",
        "force": "Notfall-Abschluss erzwingen",
        "none": "Nichts vorhanden.",
        "kind": "Art",
        "source": "Quelle",
        "revisions": "Revisionen",
        "timings": "Dauer je Stufe",
        "summary": "Zusammenfassung",
        "completion": "Abschluss",
        "attempts": "Versuche",
        "error": "Letzter Fehler",
        "when": "Wann",
        "report": "Bericht",
        "dead_entries": "Aufgegebene Einträge",
        "retry": "Erneut versuchen",
        "retry_all": "Alle aufgegebenen erneut versuchen",
        "refusals": "Von der Datenbank abgelehnt",
        "ack_refused": "Ablehnungen bestätigen",
        "acknowledged": "bestätigt",
        "ack_column": "Bestätigt",
        "acknowledged_at": "Ablehnungen bestätigt am",
        "reason": "Grund",
        "resets": "Zurückgesetzt",
        "emergency_log": "Notfallprotokoll (letzte Zeilen)",
        "todo": "Todo",
        "login_needed": "Anmeldung nötig",
        "login_how": "Auf dem Rechner des Agenten `completionctl dashboard` ausführen und die "
        "ausgegebene Adresse öffnen (sie enthält ein Einmal-Anmeldetoken).",
        "done": "Erledigt",
        "scheduled": "Geplante Abschlüsse",
        "due": "Fällig",
        "due_in": "Fällig in",
    },
}
