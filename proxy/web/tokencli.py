"""`apppass tokens create|list|revoke`: the admin API's bearer tokens, from the shell of the
proxy host (proxy/cli.py wires them in; the records are proxy/web/records.py's).

A token's value is printed once, at creation, and kept only as a digest. Creating and revoking
a token is audited (`token`), never with the value. Refusals are ManageErrors, which the CLI
turns into its exit codes.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import Any

from proxy.codes.issue import MAX_LABEL
from proxy.manage import ManageError
from proxy.web.records import ApiToken, WebRecords


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _time(moment: datetime | None, none: str = "-") -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment else none


def state(token: ApiToken) -> str:
    if token.revoked_at is not None:
        return "revoked"
    return "active" if token.usable() else "expired"


def token_json(token: ApiToken) -> dict[str, Any]:
    """What `tokens list --json` shows of a token: never its digest."""
    return {
        "id": token.id,
        "label": token.label,
        "read_only": token.read_only,
        "created_at": token.created_at.isoformat(),
        "created_by": token.created_by,
        "expires_at": token.expires_at.isoformat() if token.expires_at else None,
        "last_used_at": token.last_used_at.isoformat() if token.last_used_at else None,
        "last_used_ip": token.last_used_ip,
        "revoked_at": token.revoked_at.isoformat() if token.revoked_at else None,
        "state": state(token),
    }


def _audit(ctx: Any, action: str, token: ApiToken) -> None:
    audit = ctx.manager().audit  # the CLI's audit (audit.file), None when that is stdout
    if audit is not None:
        audit.event(
            "token",
            action=action,
            id=token.id,
            label=token.label,
            read_only=token.read_only,
            actor="cli",
        )


def cmd_tokens_create(ctx: Any) -> int:
    a = ctx.args
    label = a.label.strip()
    # The label names the caller in the audit log and in created_by ("api:LABEL").
    if not label or len(label) > MAX_LABEL or not label.isprintable():
        raise ManageError(
            "invalid", f"a token's label is 1 to {MAX_LABEL} printable characters", "label"
        )
    token, value = WebRecords(ctx.store).create_token(label, a.read_only, a.expires, "cli")
    _audit(ctx, "create", token)
    access = "read-only" if token.read_only else "read and write"
    _print(f"API token {token.id} ({token.label}, {access}; expires {_time(token.expires_at)}):")
    _print()
    _print(f"    {value}")
    _print()
    _print('Send it as "Authorization: Bearer <token>" to /api/v1. It will not be shown again.')
    return 0


def cmd_tokens_list(ctx: Any) -> int:
    tokens = WebRecords(ctx.store).tokens()
    if ctx.args.json:
        _print(json.dumps([token_json(t) for t in tokens], indent=2))
        return 0
    if not tokens:
        _print("no API tokens (apppass tokens create --label TEXT makes one)")
        return 0
    rows = [("ID", "LABEL", "ACCESS", "CREATED", "EXPIRES", "LAST USED", "STATE")]
    for t in tokens:
        last = f"{_time(t.last_used_at)} {t.last_used_ip or ''}".strip()
        rows.append(
            (
                str(t.id),
                t.label,
                "read-only" if t.read_only else "read-write",
                _time(t.created_at),
                _time(t.expires_at, "never"),
                last,
                state(t),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_tokens_revoke(ctx: Any) -> int:
    records = WebRecords(ctx.store)
    token = records.token(ctx.args.id)
    if token is None:
        raise ManageError("not_found", f"no API token with id {ctx.args.id}", "id")
    if not records.revoke_token(token.id):
        raise ManageError("conflict", f"API token {token.id} was already revoked")
    _audit(ctx, "revoke", token)
    _print(f"API token {token.id} ({token.label}) revoked")
    return 0
