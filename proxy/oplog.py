"""The operational log: what an operator reads in journald, separate from the audit log (which
records decisions). One line at start, on reload, when a dependency goes down or comes back,
on certificate reloads, and for every unexpected error; never a traceback for an expected
condition, never a secret.

Text by default, with syslog priority prefixes (`<3>`) and no timestamp of our own under
systemd (journald adds both), or with a timestamp elsewhere; or JSON lines (`log.format: json`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO

# Every module logs under "proxy.…"; the daemon's own lines under "apppass".
LOGGERS = ("apppass", "proxy")

log = logging.getLogger("apppass")

# syslog priorities (sd-daemon(3)) by logging level, for journald's SyslogLevelPrefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


@dataclass(frozen=True)
class LogSettings:
    """The `log` section of apppass.yaml."""

    format: str = "text"  # text | json
    level: str = "info"  # debug | info | warning | error


class _Formatter(logging.Formatter):
    """A worker process's lines carry its number (serve.workers, proxy/workers.py)."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def text(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if self.worker is None else f"worker {self.worker}: {message}"


class _Journald(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        return f"<{priority}>{self.text(record)}"


class _Plain(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"{moment} {record.levelname.lower()} {self.text(record)}"


class _Json(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "ts": moment,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            line["worker"] = self.worker
        return json.dumps(line, separators=(",", ":"))


def configure(
    settings: LogSettings, stream: IO[str] | None = None, worker: int | None = None
) -> logging.Handler:
    """Send the proxy's log lines to `stream` (standard error) in the configured format, each
    marked with the worker's number in a worker process; the handler is returned so that a
    test (or a reload) can remove it."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if settings.format == "json":
        handler.setFormatter(_Json(worker))
    elif os.environ.get("JOURNAL_STREAM"):  # our standard error is journald's
        handler.setFormatter(_Journald(worker))
    else:
        handler.setFormatter(_Plain(worker))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(settings.level.upper())
        logger.propagate = False
    return handler


def unconfigure(handler: logging.Handler) -> None:
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)


class Health:
    """Whether each dependency (the store, the directory, each upstream) last worked; a line
    when that changes, and only then: a store down for an hour is two lines, not thousands."""

    def __init__(self) -> None:
        self._down: dict[str, str] = {}

    def ok(self, component: str) -> None:
        if component in self._down:
            was = self._down.pop(component)
            log.warning("%s is back (it was down: %s)", component, was)

    def failed(self, component: str, reason: str) -> None:
        if component not in self._down:
            self._down[component] = reason
            log.error("%s is down: %s", component, reason)

    @property
    def down(self) -> dict[str, str]:
        return dict(self._down)
