"""The operational log (proxy/oplog.py): a line when a dependency goes down or comes back, and
only then; journald, plain and JSON formats."""

from __future__ import annotations

import io
import json

from proxy.oplog import Health, LogSettings, configure, log, unconfigure


def captured(settings: LogSettings, monkeypatch, journald: bool = False):
    if journald:
        monkeypatch.setenv("JOURNAL_STREAM", "8:123")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    return out, configure(settings, out)


def test_a_dependency_down_for_long_is_two_lines(monkeypatch):
    out, handler = captured(LogSettings(), monkeypatch)
    try:
        health = Health()
        health.ok("store")  # fine from the start: nothing to say
        for _ in range(1000):
            health.failed("store", "database is locked")
        health.ok("store")
        health.ok("store")
    finally:
        unconfigure(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("error store is down: database is locked")
    assert lines[1].endswith("warning store is back (it was down: database is locked)")


def test_under_systemd_lines_carry_a_priority_and_no_timestamp(monkeypatch):
    out, handler = captured(LogSettings(), monkeypatch, journald=True)
    try:
        log.error("directory is down: timeout")
        log.info("apppass serving")
    finally:
        unconfigure(handler)
    assert out.getvalue().splitlines() == ["<3>directory is down: timeout", "<6>apppass serving"]


def test_json_lines_for_log_shippers(monkeypatch):
    out, handler = captured(LogSettings(format="json", level="warning"), monkeypatch)
    try:
        log.info("not shown below the level")
        log.warning("store is back")
    finally:
        unconfigure(handler)
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert (record["level"], record["logger"], record["message"]) == (
        "warning",
        "apppass",
        "store is back",
    )
