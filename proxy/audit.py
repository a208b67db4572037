"""The audit log: one JSON line per decision and per finished session. Never a secret.

To a file (appending; reopened on SIGHUP, so logrotate can move it), to standard output ("-"),
or to syslog ("syslog": facility mail, one message per event)."""

from __future__ import annotations

import json
import sys
import syslog
from datetime import UTC, datetime
from typing import IO, Any


class Audit:
    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        """Write to `path` (appending; "-" or None means `stream`, default stdout)."""
        self._stream: IO[str]
        self.path = path if path not in (None, "-", "syslog") else None
        self._syslog = path == "syslog"
        if self._syslog:
            syslog.openlog("apppass-audit", syslog.LOG_PID, syslog.LOG_MAIL)
        if self.path is not None:
            self._stream = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (ours to close)
            self._owned = True
        else:
            self._stream = stream or sys.stdout
            self._owned = False
        self.listeners: list = []  # callables that also receive each event (tests, metrics)

    def event(self, event: str, **fields: Any) -> dict:
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": event,
        }
        record.update((k, v) for k, v in fields.items() if v is not None)
        line = json.dumps(record, default=str, separators=(",", ":"))
        if self._syslog:
            syslog.syslog(syslog.LOG_INFO, line)
        else:
            self._stream.write(line + "\n")
            self._stream.flush()
        for listener in self.listeners:
            listener(record)
        return record

    def reopen(self) -> None:
        """SIGHUP: start a new file where the path points now (after logrotate moved it)."""
        if self.path is not None:
            old, self._stream = self._stream, open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
            old.close()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
