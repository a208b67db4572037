"""The statements on codes that both stores run as written, in SQLite's SQL style (which the
PostgreSQL store runs too, proxy/codes/pgconn.py): reading and listing codes, following the
change log, disabling, changing a sending policy or custodian, revoking, purging, counting a
failed secret, giving a held place back.

Each store keeps what differs between the databases: its schema and connections, creating a
code under the per-account cap, the claim and its confirm, reading many codes at once, how a
row becomes a CodeRecord (`row_record`) and how names sort (`list_order`: SQLite compares text
by its bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from proxy.codes.activity import ENABLED, KEEP_RETRIED, StoreActivity, purge_statements
from proxy.codes.sending import SendingPolicy, columns
from proxy.codes.store import CodeRecord, Reservation, Rows, day_of, utcnow

# Changes read at once by a proxy following code_changes (the rest come on the next read).
CHANGES_AT_ONCE = 10_000

# How long code_changes keeps a change: proxies read them within seconds; purge drops older ones.
CHANGES_KEPT = timedelta(days=1)


def _ts(moment: datetime | None) -> int:
    return int((moment or utcnow()).timestamp())


class CodeRecords(StoreActivity):
    """Mixed into SqliteCodeStore and PostgresCodeStore (over StoreActivity's `run`)."""

    list_order = " ORDER BY account_login, id"

    def row_record(self, row: Any) -> CodeRecord:
        raise NotImplementedError

    def transaction(self, statements: list[tuple[str, Any]]) -> Sequence[Rows]:
        raise NotImplementedError

    def get(self, code_id: int) -> CodeRecord | None:
        row = self.run("SELECT * FROM codes WHERE id = ?", (code_id,)).fetchone()
        return self.row_record(row) if row else None

    def changes_since(self, last: int | None) -> tuple[int, list[int]]:
        """(the newest change's id, the codes changed after `last`): revoked, disabled, enabled
        or deleted by any process on any node. With `last` None, only where the changes stand."""
        if last is None:
            return self.run("SELECT coalesce(max(id), 0) FROM code_changes").fetchone()[0], []
        rows = self.run(
            "SELECT id, code_id FROM code_changes WHERE id > ? ORDER BY id LIMIT ?",
            (last, CHANGES_AT_ONCE),
        ).fetchall()
        if not rows:
            return last, []
        return rows[-1]["id"], list(dict.fromkeys(r["code_id"] for r in rows))

    def find(self, account_key: str, selector: str) -> CodeRecord | None:
        row = self.run(
            "SELECT * FROM codes WHERE account_key = ? AND selector = ?", (account_key, selector)
        ).fetchone()
        return self.row_record(row) if row else None

    def selectors(self, account_key: str) -> set[str]:
        rows = self.run("SELECT selector FROM codes WHERE account_key = ?", (account_key,))
        return {r[0] for r in rows}

    def list(
        self,
        account_key: str | None = None,
        include_inactive: bool = False,
        now: datetime | None = None,
    ) -> list[CodeRecord]:
        sql = "SELECT * FROM codes WHERE 1=1"
        params: list[str | int | None] = []
        if account_key is not None:
            sql += " AND account_key = ?"
            params.append(account_key)
        if not include_inactive:
            sql += (
                " AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)"
                " AND (max_uses IS NULL OR use_count < max_uses)"
            )
            params.append(_ts(now))
        return [self.row_record(r) for r in self.run(sql + self.list_order, params)]

    def set_disabled(self, code_id: int, disabled: bool, now: datetime | None = None) -> bool:
        """Disable, or enable (which restarts the idle clock and the stale count)."""
        args: tuple[int | None, ...] = ()
        if disabled:
            sql = "UPDATE codes SET disabled = 1"
        else:
            sql, args = "UPDATE codes SET disabled = 0" + ENABLED, (_ts(now),)
        cur = self.run(sql + " WHERE id = ? AND revoked_at IS NULL", (*args, code_id))
        return cur.rowcount == 1

    def set_sending(self, code_id: int, sending: SendingPolicy) -> bool:
        """Replace the sending policy of a code not revoked; its live SMTP sessions end (the
        change log's trigger) and log in again under the new one."""
        cur = self.run(
            "UPDATE codes SET mail_from = ?, rcpt_domains = ?, max_messages_per_day = ?"
            " WHERE id = ? AND revoked_at IS NULL",
            (*columns(sending).values(), code_id),
        )
        return cur.rowcount == 1

    def set_custodian(self, code_id: int, custodian: str | None) -> bool:
        """Who else is mailed the notices of a code not revoked (None: the account only)."""
        cur = self.run(
            "UPDATE codes SET custodian = ? WHERE id = ? AND revoked_at IS NULL",
            (custodian, code_id),
        )
        return cur.rowcount == 1

    def revoke(self, code_id: int, now: datetime | None = None) -> bool:
        cur = self.run(
            "UPDATE codes SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (_ts(now), code_id),
        )
        return cur.rowcount == 1

    def revoke_all(self, account_key: str, now: datetime | None = None) -> int:
        cur = self.run(
            "UPDATE codes SET revoked_at = ? WHERE account_key = ? AND revoked_at IS NULL",
            (_ts(now), account_key),
        )
        return cur.rowcount

    def purge(self, older_than: datetime) -> int:
        """Delete codes revoked, expired or used up before `older_than` (their tombstones), holds
        that lapsed or belong to no code, and changes every proxy has long read."""
        t = _ts(older_than)
        cur, *_ = self.transaction(
            [
                (
                    "DELETE FROM codes WHERE ((revoked_at IS NOT NULL AND revoked_at < ?)"
                    " OR (expires_at IS NOT NULL AND expires_at < ?)"
                    " OR (max_uses IS NOT NULL AND use_count >= max_uses"
                    f" AND coalesce(last_used_at, created_at) < ?)) AND {KEEP_RETRIED}",
                    (t, t, t, t),
                ),
                (
                    "DELETE FROM reservations WHERE until < ?"
                    " OR NOT EXISTS (SELECT 1 FROM codes c WHERE c.id = reservations.code_id)",
                    (_ts(None),),
                ),
                ("DELETE FROM code_changes WHERE at < ?", (_ts(utcnow() - CHANGES_KEPT),)),
                # Portal sessions end after web.session_max (at most days): a day unseen is gone.
                ("DELETE FROM web_sessions WHERE seen_at < ?", (_ts(utcnow() - CHANGES_KEPT),)),
                *purge_statements(day_of(utcnow())),
            ]
        )
        return cur.rowcount

    def record_failure(self, code_id: int, ip: str, now: datetime | None = None) -> None:
        self.run(
            "UPDATE codes SET failed_count = failed_count + 1, last_failed_at = ?,"
            " last_failed_ip = ? WHERE id = ?",
            (_ts(now), ip, code_id),
        )

    def release(self, reservation: Reservation) -> None:
        """The login did not happen (upstream down or refusing): give the place back."""
        if reservation.token is not None:
            self.run("DELETE FROM reservations WHERE id = ?", (reservation.token,))
