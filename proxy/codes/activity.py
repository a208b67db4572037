"""What both stores do beyond the claim, written once in SQLite's SQL style (which the PostgreSQL
store runs too, proxy/codes/pgconn.py): devices still trying a code that stopped working,
messages sent per code per UTC day under a daily cap, the notices of `apppass notify`, and
codes disabled for not being used. A store class mixes `StoreActivity` in; the store contract
(tests/support/store_contract.py) runs it on both.

The daily cap is exact across sessions, processes and nodes without a lock of its own: taking a
place is one statement, an upsert whose update only happens while `sent + held < cap`; it takes
the (code, day) row's lock, so a racing one waits and then sees the count the first one left
(SQLite has one writer; PostgreSQL re-checks the condition on the row's newest version under
READ COMMITTED). A place held by a proxy that died is freed when the day ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from proxy.codes.sending import stored
from proxy.codes.store import CodeRecord, Rows, day_of, utcnow

# Codes looked at per query when reading many at once (SQLite's parameter limit is far above).
_BATCH = 500

# What a code that can still log in is (the claim re-checks the rest: scope, network, floor).
_LIVE = (
    "revoked_at IS NULL AND disabled = 0 AND (expires_at IS NULL OR expires_at > :now)"
    " AND (max_uses IS NULL OR use_count < max_uses)"
)
# Unused since :cut: not used (nor made, nor enabled again) after it.
_UNUSED = "coalesce(last_used_at, created_at) < :cut AND (enabled_at IS NULL OR enabled_at < :cut)"


def _ts(moment: datetime | None) -> int:
    return int((moment or utcnow()).timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def activity_fields(row: Any) -> dict[str, Any]:
    """A code's columns of schema step 6 as CodeRecord fields (both stores' rows)."""
    return {
        "stale_count": row["stale_count"],
        "stale_since": _dt(row["stale_since"]),
        "stale_last_at": _dt(row["stale_last_at"]),
        "stale_last_ip": row["stale_last_ip"],
        "sending": stored(row["mail_from"], row["rcpt_domains"], row["max_messages_per_day"]),
        "send_refused_count": row["send_refused_count"],
        "last_send_refused_at": _dt(row["last_send_refused_at"]),
        "custodian": row["custodian"],
        "idle_disabled_at": _dt(row["idle_disabled_at"]),
        "enabled_at": _dt(row["enabled_at"]),
    }


class StoreActivity:
    """Mixed into SqliteCodeStore and PostgresCodeStore, which give `run` and `get_many`."""

    def run(self, sql: str, params: Any = ()) -> Rows:
        raise NotImplementedError

    def get_many(self, code_ids: list[int]) -> dict[int, CodeRecord]:
        raise NotImplementedError

    # -- stale devices ---------------------------------------------------------------------------

    def record_stale(self, code_id: int, ip: str, now: datetime | None = None) -> None:
        """A try with this code, its secret right, after it stopped working."""
        t = _ts(now)
        self.run(
            "UPDATE codes SET stale_count = stale_count + 1,"
            " stale_since = coalesce(stale_since, ?), stale_last_at = ?, stale_last_ip = ?"
            " WHERE id = ?",
            (t, t, ip, code_id),
        )

    # -- messages under a daily cap --------------------------------------------------------------

    def hold_message(self, code_id: int, cap: int, now: datetime | None = None) -> int | None:
        """Hold a place for one message under the code's daily cap: the day held (for
        message_sent or release_message), or None when the day's places are taken."""
        day = day_of(now or utcnow())
        held = self.run(
            "INSERT INTO message_counts (code_id, day, sent, held) VALUES (?, ?, 0, 1)"
            " ON CONFLICT (code_id, day) DO UPDATE SET held = message_counts.held + 1"
            " WHERE message_counts.sent + message_counts.held < ?",
            (code_id, day, cap),
        )
        return day if held.rowcount == 1 else None

    def message_sent(self, code_id: int, day: int) -> None:
        """The upstream accepted the message its place was held for: count it (on that day)."""
        self.run(
            "INSERT INTO message_counts (code_id, day, sent, held) VALUES (?, ?, 1, 0)"
            " ON CONFLICT (code_id, day) DO UPDATE SET sent = message_counts.sent + 1,"
            " held = CASE WHEN message_counts.held > 0 THEN message_counts.held - 1 ELSE 0 END",
            (code_id, day),
        )

    def release_message(self, code_id: int, day: int) -> None:
        """The message was not sent (reset, refused, session ended): give its place back."""
        self.run(
            "UPDATE message_counts SET held = held - 1 WHERE code_id = ? AND day = ? AND held > 0",
            (code_id, day),
        )

    def sent_on(self, code_ids: list[int], day: int) -> dict[int, int]:
        """Messages each of these codes sent on `day` (codes that sent none are missing)."""
        found: dict[int, int] = {}
        for start in range(0, len(code_ids), _BATCH):
            chunk = code_ids[start : start + _BATCH]
            marks = ",".join("?" * len(chunk))
            for row in self.run(
                f"SELECT code_id, sent FROM message_counts WHERE day = ? AND sent > 0"
                f" AND code_id IN ({marks})",
                [day, *chunk],
            ):
                found[row["code_id"]] = row["sent"]
        return found

    def record_send_refusals(self, code_id: int, count: int, now: datetime | None = None) -> None:
        """Commands the code's sending policy refused (a session's, counted in batches)."""
        self.run(
            "UPDATE codes SET send_refused_count = send_refused_count + ?,"
            " last_send_refused_at = ? WHERE id = ?",
            (count, _ts(now), code_id),
        )

    # -- idle codes ------------------------------------------------------------------------------

    def idle(self, unused_since: datetime, now: datetime | None = None) -> list[CodeRecord]:
        """Codes that could log in but were not used (nor made or enabled) since then."""
        rows = self.run(
            f"SELECT id FROM codes WHERE {_LIVE} AND {_UNUSED} ORDER BY id",
            {"now": _ts(now), "cut": _ts(unused_since)},
        )
        ids = [row["id"] for row in rows]
        found = self.get_many(ids)
        return [found[i] for i in ids if i in found]

    def disable_idle(
        self, code_id: int, unused_since: datetime, now: datetime | None = None
    ) -> bool:
        """Disable the code if it is still unused since then (not if a login came in between)."""
        args = {"id": code_id, "now": _ts(now), "cut": _ts(unused_since)}
        done = self.run(
            f"UPDATE codes SET disabled = 1, idle_disabled_at = :now WHERE id = :id AND {_LIVE}"
            f" AND {_UNUSED}",
            args,
        )
        return done.rowcount == 1

    # -- notices ---------------------------------------------------------------------------------

    def claim_notice(self, code_id: int, kind: str, ref: int, now: datetime | None = None) -> bool:
        """Claim the notice of this kind for this occasion: True once, ever, whoever asks."""
        claimed = self.run(
            "INSERT INTO notices (code_id, kind, ref, claimed_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (code_id, kind, ref) DO NOTHING",
            (code_id, kind, ref, _ts(now)),
        )
        return claimed.rowcount == 1

    def notice_sent(self, code_id: int, kind: str, ref: int, now: datetime | None = None) -> None:
        self.run(
            "UPDATE notices SET sent_at = ? WHERE code_id = ? AND kind = ? AND ref = ?",
            (_ts(now), code_id, kind, ref),
        )

    def drop_notice(self, code_id: int, kind: str, ref: int) -> None:
        """Sending failed: let the next run try again."""
        self.run(
            "DELETE FROM notices WHERE code_id = ? AND kind = ? AND ref = ? AND sent_at IS NULL",
            (code_id, kind, ref),
        )

    def notices(self, code_id: int) -> list[tuple[str, int, datetime | None]]:
        """(kind, occasion, when sent) of the code's notices, oldest first."""
        rows = self.run(
            "SELECT kind, ref, sent_at FROM notices WHERE code_id = ? ORDER BY claimed_at, kind",
            (code_id,),
        )
        return [(r["kind"], r["ref"], _dt(r["sent_at"])) for r in rows]


# A purged code's tombstone stays while a device still tries it (else its tries would look like
# guesses again): deleted only once no try came for the purge's age.
KEEP_RETRIED = "(stale_last_at IS NULL OR stale_last_at < ?)"

# Set when a code is enabled (by a person): the idle clock and the stale count start again.
ENABLED = ", enabled_at = ?, idle_disabled_at = NULL, stale_count = 0, stale_since = NULL"


def purge_statements(today: int) -> Sequence[tuple[str, Any]]:
    """What purge also deletes: day counts before yesterday, notices of codes that are gone."""
    return [
        ("DELETE FROM message_counts WHERE day < ?", (today - 1,)),
        (
            "DELETE FROM notices WHERE NOT EXISTS"
            " (SELECT 1 FROM codes c WHERE c.id = notices.code_id)",
            (),
        ),
    ]
