"""The recent audit events of one account, for admins: read back from the end of the audit file
(audit.file). Blocking (file reads): the portal runs it off the reactor."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from proxy.directory.account import Account

# Read at most this much from the end of the file: a few thousand recent lines, in a few ms.
TAIL_BYTES = 4 * 1024 * 1024
# Events shown per account, newest first.
MAX_EVENTS = 50

# The fields worth a column, in order; the rest is left out (they are in the file).
FIELDS = ("event", "action", "result", "protocol", "client", "by", "code", "label", "reason")


@dataclass(frozen=True)
class RecentEvents:
    available: bool  # False: audit.file is "-" (stdout) or cannot be read
    why: str  # when not available, what to tell the admin
    events: tuple[dict, ...]


def audit_path(file: str) -> Path | None:
    """audit.file as a path (the config already made it absolute), None for standard output."""
    return None if file == "-" else Path(file)


def recent_events(path: Path | None, account: Account, limit: int = MAX_EVENTS) -> RecentEvents:
    """The last `limit` events about `account` (by its key, or a login name of it)."""
    if path is None:
        why = (
            "The audit log goes to standard output (audit.file is \u201c-\u201d): read it where"
            " the service's output is kept (e.g. journalctl)."
        )
        return RecentEvents(False, why, ())
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - TAIL_BYTES))
            data = fh.read()
    except OSError as exc:
        return RecentEvents(False, f"The audit log {path} cannot be read: {exc.strerror}.", ())
    if len(data) >= TAIL_BYTES:  # the first line is probably cut
        data = data.partition(b"\n")[2]
    names = {n.lower() for n in account.names} | {account.login.lower()}
    found: list[dict] = []
    for line in reversed(data.splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        login = str(event.get("login") or "").lower()
        if event.get("account") == account.key or (login and login in names):
            found.append(event)
            if len(found) >= limit:
                break
    return RecentEvents(True, "", tuple(found))
