"""Notifications: the ``notify`` child delivers the journal's events to the ``[[notify]]`` targets.

Events are written by the change they report, in its transaction (journal triggers for entries;
the parent for agent events; this process for health changes it sees).  Here each event is fanned
out into one delivery per target that wants it, then sent on a thread of its own with a timeout,
retried with backoff until it is delivered: at least once, always under the same id.  Before a
send the delivery is claimed (state ``sending``, the message id it goes out under); a process
killed mid-send sends the same message, same id, after its restart.  Nothing here can delay a
write, a timer or a health round: they happen in other processes.

Targets: ``json://`` and ``jsons://`` are generic webhooks (HTTP and HTTPS POST of the event as
JSON), signed as Standard Webhooks specifies when the target has a ``secret``; every other URL is
handed to Apprise (ntfy, Slack, Discord, Telegram, Matrix, mail, ...).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import zmq
from loguru import logger

from protocol.config import Config, Notify, mask_secret_url

from .journal import EventRow, Journal
from .loop import ChildBase

BACKOFF_FIRST = 5.0
BACKOFF_MAX = 600.0
GIVE_UP_AFTER = 86400.0  # a delivery failing this long is dropped (and logged)
FAN_OUT_MAX_AGE = 86400.0  # events older than this when first seen are not sent any more
GRACE = 5.0  # a send thread gets its timeout plus this before it counts as failed


@dataclass(frozen=True)
class SendResult:
    ok: bool
    detail: str  # what came back: "HTTP 204", "HTTP 500: ...", "timed out", Apprise's words


# ---------------------------------------------------------------- messages

_TITLES = {
    "en": {
        "completed": "Todo {todo_id} completed",
        "forced": "Todo {todo_id}: completion forced (emergency)",
        "reset": "Todo {todo_id} reset to 'offen'",
        "failed": "Todo {todo_id}: completion failed",
        "dead": "Todo {todo_id}: completion dead after a permanent error",
        "health": "completiond health: {check} is {status}",
        "agent": "completiond: {what}",
        "test": "completiond: test notification",
        "batch": "completiond: {count} events",
    },
    "de": {
        "completed": "Todo {todo_id} abgeschlossen",
        "forced": "Todo {todo_id}: Abschluss erzwungen (Notfall)",
        "reset": "Todo {todo_id} auf 'offen' zurückgesetzt",
        "failed": "Todo {todo_id}: Abschluss fehlgeschlagen",
        "dead": "Todo {todo_id}: Abschluss nach dauerhaftem Fehler aufgegeben",
        "health": "completiond-Zustand: {check} ist {status}",
        "agent": "completiond: {what}",
        "test": "completiond: Testbenachrichtigung",
        "batch": "completiond: {count} Ereignisse",
    },
}
_WHAT_DE = {
    "started": "gestartet",
    "stopped": "beendet",
    "child restarted": "Kindprozess neu gestartet",
}


def event_data(event: EventRow) -> dict[str, object]:
    """The event as a webhook carries it (Standard Webhooks' ``data``)."""
    body = json.loads(event.body)
    data: dict[str, object] = {
        "event": event.event,
        "event_id": event.event_id,
        "todo_id": event.todo_id,
        "completion_id": event.completion_id,
        "at": _iso(event.at),
    }
    accepted = body.pop("accepted_at", None)
    if isinstance(accepted, int | float):
        data["accepted_at"] = _iso(accepted)
    data.update({k: v for k, v in body.items() if v is not None})
    return data


def title_of(data: dict[str, object], language: str) -> str:
    titles = _TITLES.get(language, _TITLES["en"])
    fields = {k: ("" if v is None else v) for k, v in data.items()}
    if language == "de" and isinstance(fields.get("what"), str):
        fields["what"] = _WHAT_DE.get(str(fields["what"]), fields["what"])
    template = titles.get(str(data.get("event")), "completiond: {event}")
    try:
        return template.format_map(_Blank(fields))
    except (ValueError, IndexError):
        return f"completiond: {data.get('event')}"


class _Blank(dict):
    def __missing__(self, key: str) -> str:
        return "?"


def text_of(data: dict[str, object], language: str) -> str:
    """A person's sentence for Apprise targets: the title and what matters beneath it."""
    lines = [title_of(data, language)]
    for key in ("summary", "message", "reason", "error", "child", "exit"):
        value = data.get(key)
        if value not in (None, ""):
            lines.append(f"{key}: {value}")
    if data.get("completion_id"):
        lines.append(f"completion: {data['completion_id']}")
    return "\n".join(lines)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ---------------------------------------------------------------- sending


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks: ``v1,`` + base64(HMAC-SHA256(key, "id.timestamp.body"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def webhook_url(url: str) -> str:
    """json://host/path -> http://host/path, jsons:// -> https://."""
    parts = urlsplit(url)
    scheme = "https" if parts.scheme.lower() == "jsons" else "http"
    return urlunsplit(parts._replace(scheme=scheme))


def scrub(text: str, target: Notify) -> str:
    """An error message without the target's URL or secret in it (requests names the URL)."""
    secrets = [target.url, webhook_url(target.url)]
    if target.secret:
        secrets.append(target.secret)
    try:
        parts = urlsplit(target.url)
        secrets += [parts.password or "", parts.username or "", parts.path, parts.query]
    except ValueError:
        pass
    for secret in sorted({s for s in secrets if s and len(s) > 1}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text[:500]


def send(target: Notify, msg_id: str, payload: dict[str, object], language: str) -> SendResult:
    """One message to one target, bounded by its timeout; never raises."""
    try:
        scheme = target.url.split("://", 1)[0].lower()
        if scheme in ("json", "jsons"):
            return _send_webhook(target, msg_id, payload)
        return _send_apprise(target, payload, language)
    except Exception as exc:  # a target's failure is a result, never a crash
        return SendResult(False, scrub(f"{type(exc).__name__}: {exc}", target))


def _send_webhook(target: Notify, msg_id: str, payload: dict[str, object]) -> SendResult:
    import requests

    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    timestamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "completiond",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
    }
    if target.secret:
        headers["webhook-signature"] = sign(target.secret, msg_id, timestamp, body)
    try:
        response = requests.post(
            webhook_url(target.url),
            data=body,
            headers=headers,
            timeout=(min(5.0, target.timeout), target.timeout),
            allow_redirects=False,
        )
    except requests.Timeout:
        return SendResult(False, f"no answer within {target.timeout:g} s")
    except requests.RequestException as exc:
        return SendResult(False, scrub(f"{type(exc).__name__}: {exc}", target))
    text = " ".join(response.text[:200].split())
    detail = f"HTTP {response.status_code}" + (f": {scrub(text, target)}" if text else "")
    return SendResult(200 <= response.status_code < 300, detail)


def _send_apprise(target: Notify, payload: dict[str, object], language: str) -> SendResult:
    import apprise

    data = payload.get("data")
    if not isinstance(data, dict):
        data = {}
    apobj = apprise.Apprise()
    if not apobj.add(target.url):
        return SendResult(False, "Apprise does not understand this URL")
    with apprise.LogCapture(level=apprise.logging.INFO) as captured:
        ok = apobj.notify(title=title_of(data, language), body=text_of(data, language))
    said = " ".join(captured.getvalue().split())
    return SendResult(bool(ok), scrub(said or ("sent" if ok else "failed"), target))


def payload_for(events: list[EventRow]) -> dict[str, object]:
    """Standard Webhooks' recommended envelope: type, timestamp, data."""
    if len(events) == 1:
        data = event_data(events[0])
        return {
            "type": f"completion.{events[0].event}",
            "timestamp": _iso(events[0].at),
            "data": data,
        }
    items = [event_data(e) for e in events]
    return {
        "type": "completion.batch",
        "timestamp": _iso(events[-1].at),
        "data": {"event": "batch", "count": len(items), "events": items},
    }


def test_message(target: Notify) -> SendResult:
    """``completionctl notify test``: one test message, synchronously."""
    now = time.time()
    data = {
        "event": "test",
        "event_id": "evt_test",
        "todo_id": None,
        "completion_id": None,
        "at": _iso(now),
        "message": "a test message from completionctl notify test",
    }
    payload: dict[str, object] = {
        "type": "completion.test",
        "timestamp": _iso(now),
        "data": data,
    }
    return send(target, "msg_test_" + os.urandom(8).hex(), payload, target.language)


# ---------------------------------------------------------------- the child


@dataclass
class _Flight:
    target: str
    msg_ids: list[str]
    sent_as: str
    deadline: float
    result: SendResult | None = None


class Notifier(ChildBase):
    name = "notify"

    def open(self) -> None:
        self.jn = cast(Journal, self.journal)  # opened by ChildBase.initialize before open()
        self.targets = {t.name: t for t in self.config.notify}
        self.flights: dict[str, _Flight] = {}
        self.last_sent: dict[str, float] = {}
        self.next_health = 0.0
        self.health_every = max(min(self.config.behavior.health_check_interval, 30.0), 1.0)
        self.wants_health = any("health" in t.events for t in self.targets.values())
        self._rng = random.Random()
        self._client: Any = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._wake_lock = threading.Lock()
        self._closed = False
        self.poller.register(self._wake_r, zmq.POLLIN)
        for target in self.targets.values():
            logger.info(
                "notify target {} ({}) for {}",
                target.name,
                mask_secret_url(target.url),
                ", ".join(target.events),
            )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        with self._wake_lock:  # a send finishing now must not write into a reused descriptor
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)

    def work(self, now: float) -> float:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        self._harvest(now)
        self._fan_out(now)
        if self.wants_health and now >= self.next_health:
            self._poll_health(now)
            self.next_health = now + self.health_every
        wake = now + min(self.sweep, 1.0)
        for name, target in self.targets.items():
            if name in self.flights:
                wake = min(wake, self.flights[name].deadline)
                continue
            ready_at = self._dispatch(target, now)
            if ready_at is not None:
                wake = min(wake, max(ready_at, now + 0.05))
        return wake

    # -- events -> deliveries

    def _fan_out(self, now: float) -> None:
        events = self.jn.events_to_fan_out()
        if not events:
            return
        plan: list[tuple[EventRow, list[str]]] = []
        for event in events:
            if now - event.at > FAN_OUT_MAX_AGE:
                plan.append((event, []))
                continue
            plan.append(
                (event, [name for name, t in self.targets.items() if event.event in t.events])
            )
        queued = self.jn.fan_out(plan, now)
        if queued:
            logger.debug("queued {} notification(s)", queued)

    def _poll_health(self, now: float) -> None:
        from ctl import Client

        if self._client is None:
            self._client = Client(config=self.config, timeout=1.0)
        try:
            report = self._client.health()
        except Exception as exc:  # AgentUnavailable, a refusal: the next round asks again
            logger.debug("health not read this round: {}", exc)
            return
        changes = self.jn.health_changes(
            ((c.name, c.status, c.message) for c in report.checks), now
        )
        for name, before, after, _ in changes:
            logger.info("health check {} went from {} to {}", name, before, after)

    # -- deliveries -> sends

    def _dispatch(self, target: Notify, now: float) -> float | None:
        """Start the next send for ``target`` if one is due; when it may go, if it must wait."""
        due = [d for d in self.jn.deliveries_due(now) if d.target == target.name]
        if not due:
            return None
        stale = [d for d in due if now - d.created_at > GIVE_UP_AFTER]
        if stale:
            self.jn.deliveries_drop([d.msg_id for d in stale])
            logger.error(
                "dropped {} notification(s) to {} after failing for {:.0f} h; last error: {}",
                len(stale),
                target.name,
                GIVE_UP_AFTER / 3600,
                stale[-1].last_error,
            )
            due = [d for d in due if d not in stale]
            if not due:
                return None
        claimed = [d for d in due if d.state == "sending" and d.sent_as]
        if claimed:
            # A send that was under way (or failed): the same message again, same id.
            sent_as = claimed[0].sent_as
            assert sent_as is not None
            group = [d for d in claimed if d.sent_as == sent_as]
            self.jn.claim_deliveries([d.msg_id for d in group], sent_as, now)  # one more attempt
        else:
            spacing = self.last_sent.get(target.name, 0.0) + target.min_interval
            if target.min_interval and now < spacing:
                return spacing  # coalesce: what arrives meanwhile goes out together
            group = due if target.min_interval else due[:1]
            sent_as = group[0].msg_id
            self.jn.claim_deliveries([d.msg_id for d in group], sent_as, now)
        events = self.jn.events_by_seq([d.event_seq for d in group])
        ordered = [events[d.event_seq] for d in group if d.event_seq in events]
        payload = payload_for(ordered)
        flight = _Flight(
            target=target.name,
            msg_ids=[d.msg_id for d in group],
            sent_as=sent_as,
            deadline=now + target.timeout + GRACE,
        )

        def run() -> None:
            flight.result = send(target, sent_as, payload, target.language)
            with self._wake_lock:
                if not self._closed:
                    os.write(self._wake_w, b"!")

        self.flights[target.name] = flight
        self.last_sent[target.name] = now
        threading.Thread(target=run, daemon=True, name=f"notify-{target.name}").start()
        return None

    def _harvest(self, now: float) -> None:
        for name, flight in list(self.flights.items()):
            result = flight.result
            if result is None and now < flight.deadline:
                continue
            del self.flights[name]
            target = self.targets[name]
            if result is None:
                result = SendResult(False, f"no answer within {target.timeout + GRACE:g} s")
            log = logger.bind(notify=name)
            if result.ok:
                self.jn.deliveries_done(flight.msg_ids, now)
                log.info(
                    "notification {} delivered to {} ({})", flight.sent_as, name, result.detail
                )
                continue
            attempts = self._attempts(flight.msg_ids)
            # Capped like the database writes' retries (behavior.retry_max_delay).
            cap = min(self.config.behavior.retry_max_delay, BACKOFF_MAX)
            delay = min(min(BACKOFF_FIRST, cap) * 2 ** max(attempts - 1, 0), cap)
            delay *= self._rng.uniform(0.8, 1.2)
            self.jn.deliveries_retry(flight.msg_ids, result.detail, now + delay)
            log.warning(
                "notification {} to {} ({}) failed: {}; trying again in {:.0f} s",
                flight.sent_as,
                name,
                mask_secret_url(target.url),
                result.detail,
                delay,
            )

    def _attempts(self, msg_ids: list[str]) -> int:
        wanted = set(msg_ids)
        rows = [d for d in self.jn.deliveries_due(float("inf")) if d.msg_id in wanted]
        return max((d.attempts for d in rows), default=1)


def targets_of(config: Config, name: str | None) -> list[Notify]:
    return [t for t in config.notify if name is None or t.name == name]
