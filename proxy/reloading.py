"""What a reload (SIGHUP) may change in a running process, and what only a restart can.

Both a single `apppass serve` (service.py) and the supervisor of its workers (workers.py) read
the config again on SIGHUP. The supervisor speaks for all its workers: it says once which
changes need a restart or that the file has errors, where each worker would repeat it.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from proxy.config import ConfigError, Settings, load
from proxy.oplog import LOGGERS
from proxy.oplog import log as oplog

# Applied at once by every process: who may log in, the connection caps, how much is logged.
LIVE = ("policy", "limits", "log")

# Sections read once at start: a change is reported and waits for a restart.
AT_START = (
    "listeners",
    "upstreams",
    "store",
    "directory",
    "codes",
    "auth",
    "web",
    "serve",
    "audit",
    "hostname",
)


def read_again(current: Settings, *, report: bool = True) -> Settings | None:
    """The config file as it is now; None when it has errors, so that none of it is applied
    (and an error line, unless `report` is False: a worker's supervisor has said it)."""
    try:
        return load(current.source)
    except ConfigError as exc:
        if report:
            oplog.error(
                "reload: the config has errors, none of it applied: %s",
                "; ".join(exc.problems[:3]),
            )
        return None


def needs_restart(old: Settings, new: Settings) -> list[str]:
    """The changed sections (and settings) that only a restart applies."""
    changed = [name for name in AT_START if getattr(new, name) != getattr(old, name)]
    if new.log.format != old.log.format:
        changed.append("log.format")
    return changed


def report_restart(changed: list[str]) -> None:
    if changed:
        oplog.warning("reload: %s changed; that needs a restart", ", ".join(changed))


def set_log_level(level: str) -> None:
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level.upper())


def applied_live(old: Settings, new: Settings) -> Settings:
    """The running settings once the live sections of `new` are applied."""
    return replace(old, **{name: getattr(new, name) for name in LIVE})
