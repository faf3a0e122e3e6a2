"""Log sinks: one loguru setup per process, files in state_dir/logs, stderr for supervisord.

Each line carries the process, and the todo and completion ids where there is one (``logger.bind``).
Records bound with ``emergency=True`` also go to emergency.log.  ``reopen()`` closes and reopens
the files after logrotate moved them (SIGHUP).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from loguru import logger

FILES_BY_PROCESS = {
    "agent": "agent.log",
    "collector": "completion.log",
    "writer": "completion.log",
    "monitor": "monitor.log",
    "web": "agent.log",
    "notify": "agent.log",
}
EMERGENCY_FILE = "emergency.log"
LOG_FILES = ("agent.log", "completion.log", "monitor.log", "emergency.log")

_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS!UTC}Z | {level: <7} | {extra[process]: <9} | "
    "todo={extra[todo_id]} completion={extra[completion_id]} | {message}"
)


# C0 and C1 controls but the tab: a newline or an escape sequence in a session id, a reason or a
# path would otherwise forge a line, or rewrite the terminal of whoever reads the log.
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with every control character shown as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


def _escape_record(record) -> None:
    """One record, one line: control characters in the message (which holds every
    interpolated field) are escaped; a traceback is the exception's, printed after it."""
    message = record["message"]
    if _CONTROLS.search(message):
        record["message"] = escape_controls(message)


class LogSinks:
    def __init__(self, process: str, logs_dir: Path, *, stderr: bool = True) -> None:
        self.process = process
        self.logs_dir = logs_dir
        self.stderr = stderr
        self._ids: list[int] = []

    def open(self) -> None:
        # loguru's default handler shows local variables in tracebacks (diagnose=True), and a
        # local may be the config with the database password: it goes first, before anything
        # here can fail and be logged.
        logger.remove()
        logger.configure(
            extra={"process": self.process, "todo_id": "-", "completion_id": "-"},
            patcher=_escape_record,
        )
        if self.stderr:
            self._ids.append(logger.add(sys.stderr, format=_FORMAT, level="INFO", diagnose=False))
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        main = self.logs_dir / FILES_BY_PROCESS[self.process]
        self._ids.append(logger.add(main, format=_FORMAT, level="DEBUG", mode="a", diagnose=False))
        self._ids.append(
            logger.add(
                self.logs_dir / EMERGENCY_FILE,
                format=_FORMAT,
                level="INFO",
                mode="a",
                diagnose=False,
                filter=lambda record: bool(record["extra"].get("emergency")),
            )
        )
        for name in LOG_FILES:
            path = self.logs_dir / name
            if path.exists():
                path.chmod(0o600)

    def reopen(self) -> None:
        for sink_id in self._ids:
            logger.remove(sink_id)
        self._ids.clear()
        self.open()
        logger.info("log files reopened")

    def close(self) -> None:
        for sink_id in self._ids:
            logger.remove(sink_id)
        self._ids.clear()
