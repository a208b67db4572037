"""How the CLI shows codes: times, a record as JSON, and the aligned table of `codes list`."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from proxy.codes.store import CodeRecord


def fmt_time(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment else "-"


def record_json(rec: CodeRecord) -> dict:
    return {
        "id": rec.id,
        "login": rec.account_login,
        "account_key": rec.account_key,
        "label": rec.label,
        "scopes": list(rec.scopes),
        "networks": list(rec.networks),
        "created_at": rec.created_at.isoformat() if rec.created_at else None,
        "expires_at": rec.expires_at.isoformat() if rec.expires_at else None,
        "max_uses": rec.max_uses,
        "use_count": rec.use_count,
        "last_used_at": rec.last_used_at.isoformat() if rec.last_used_at else None,
        "last_used_ip": rec.last_used_ip,
        "last_used_protocol": rec.last_used_protocol,
        "failed_count": rec.failed_count,
        "disabled": rec.disabled,
        "revoked_at": rec.revoked_at.isoformat() if rec.revoked_at else None,
        "created_by": rec.created_by,
        "state": rec.state().value,
        "idle_disabled_at": _iso(rec.idle_disabled_at),
        "custodian": rec.custodian,
        "mail_from": list(rec.sending.mail_from),
        "rcpt_domains": list(rec.sending.rcpt_domains),
        "max_messages_per_day": rec.sending.max_per_day,
        "sent_today": rec.sent_today,
        "send_refused_count": rec.send_refused_count,
        "last_send_refused_at": _iso(rec.last_send_refused_at),
        "stale_count": rec.stale_count,
        "stale_since": _iso(rec.stale_since),
        "stale_last_at": _iso(rec.stale_last_at),
        "stale_last_ip": rec.stale_last_ip,
        "still_retrying": rec.still_retrying(),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


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
