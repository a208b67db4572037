"""How the CLI shows codes: times, a record as JSON, and the aligned table of `codes list`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from proxy.codes.store import CodeRecord
from proxy.codes.view import code_view


def fmt_time(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment else "-"


def record_json(rec: CodeRecord) -> dict:
    """The API's view of a code (proxy/codes/view.py) with its `stale` object spelled out as
    top-level keys, so that `codes show` prints one line each."""
    view = code_view(rec)
    stale = view.pop("stale")
    view.update(
        stale_count=stale["count"],
        stale_since=stale["since"],
        stale_last_at=stale["last_at"],
        stale_last_ip=stale["last_ip"],
        still_retrying=stale["still_retrying"],
    )
    return view


def sending(rec: CodeRecord) -> str | None:
    """ "sends as …; to …; 10 messages a day (3 sent today)" for a code with a policy."""
    if not rec.sending.active:
        return None
    today = f" ({rec.sent_today} sent today)" if rec.sent_today is not None else ""
    return f"sends {rec.sending.describe()}{today}"


def notes(records: Iterable[CodeRecord]) -> list[str]:
    """What `codes list` says under its table: each code's sending policy, each stale device."""
    out = []
    for r in records:
        for note in (sending(r), r.still_retrying()):
            if note:
                out.append(f"code {r.id} ({r.account_login}, {r.label}): {note}")
    return out


def table(records: Iterable[CodeRecord], orphaned: set[str] | frozenset[str] = frozenset()) -> str:
    head = (
        "ID",
        "LOGIN",
        "LABEL",
        "SCOPES",
        "CREATED",
        "EXPIRES",
        "USES",
        "LAST USED",
        "FAILED",
        "STATE",
    )
    rows = [head]
    for r in records:
        last = "-"
        if r.last_used_at:
            last = (
                f"{fmt_time(r.last_used_at)} {r.last_used_ip or ''} {r.last_used_protocol or ''}"
            ).strip()
        rows.append(
            (
                str(r.id),
                r.account_login,
                r.label,
                ",".join(r.scopes),
                fmt_time(r.created_at),
                fmt_time(r.expires_at) if r.expires_at else "never",
                f"{r.use_count}/{r.max_uses if r.max_uses is not None else '-'}",
                last,
                str(r.failed_count),
                r.state().value + (", orphaned: account gone" if r.account_key in orphaned else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
