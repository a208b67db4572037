"""A code's record as the world sees it: the admin API's AppPassword (proxy/web/openapi.py)
and, flattened for its table, `apppass codes show` / `--json` (proxy/cliformat.py). Never its
hash or selector."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from proxy.codes.store import CodeRecord


def _time(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def code_view(rec: CodeRecord) -> dict[str, Any]:
    """The code's fields by their public names, times in ISO 8601."""
    return {
        "id": rec.id,
        "login": rec.account_login,
        "account_key": rec.account_key,
        "label": rec.label,
        "scopes": list(rec.scopes),
        "networks": list(rec.networks),
        "created_at": _time(rec.created_at),
        "created_by": rec.created_by,
        "expires_at": _time(rec.expires_at),
        "max_uses": rec.max_uses,
        "use_count": rec.use_count,
        "last_used_at": _time(rec.last_used_at),
        "last_used_ip": rec.last_used_ip,
        "last_used_protocol": rec.last_used_protocol,
        "failed_count": rec.failed_count,
        "last_failed_at": _time(rec.last_failed_at),
        "disabled": rec.disabled,
        "revoked_at": _time(rec.revoked_at),
        "state": rec.state().value,
        "idle_disabled_at": _time(rec.idle_disabled_at),
        "custodian": rec.custodian,
        "mail_from": list(rec.sending.mail_from),
        "rcpt_domains": list(rec.sending.rcpt_domains),
        "max_messages_per_day": rec.sending.max_per_day,
        "sent_today": rec.sent_today,
        "send_refused_count": rec.send_refused_count,
        "last_send_refused_at": _time(rec.last_send_refused_at),
        "stale": {
            "count": rec.stale_count,
            "since": _time(rec.stale_since),
            "last_at": _time(rec.stale_last_at),
            "last_ip": rec.stale_last_ip,
            "still_retrying": rec.still_retrying(),
        },
    }
