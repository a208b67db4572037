"""The audit log: one JSON line per decision and per finished session. Never a secret."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any


class Audit:
    def __init__(self, stream: IO[str] | None = None, path: str | None = None) -> None:
        """Write to `path` (appending; "-" or None means `stream`, default stdout)."""
        self._stream: IO[str]
        if path and path != "-":
            self._stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (ours to close)
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
        self._stream.write(json.dumps(record, default=str, separators=(",", ":")) + "\n")
        self._stream.flush()
        for listener in self.listeners:
            listener(record)
        return record

    def close(self) -> None:
        if self._owned:
            self._stream.close()
