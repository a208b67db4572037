"""What the portal and the admin API keep in the store: API tokens, portal sessions and TOTP
enrolments. Synchronous, on the same database as the codes (SQLite or PostgreSQL, migration 3;
the SQL is the portable subset both stores run), so several proxy nodes share them.

Secrets are kept only as SHA-256 digests (API tokens, session cookies, recovery codes: all of
high entropy, so a fast hash is enough); a TOTP secret must be kept as it is, to check codes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from proxy.codes.store import SqlCodeStore, utcnow

# API token: "apt_" + 8-character selector + "_" + 40-character secret (238 bits).
TOKEN_PREFIX = "apt_"
_TOKEN_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _ts(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def _dt(value: int | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class ApiToken:
    id: int
    label: str
    selector: str
    read_only: bool
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    last_used_ip: str | None
    revoked_at: datetime | None
    created_by: str

    def usable(self, now: datetime | None = None) -> bool:
        now = now or utcnow()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class WebSession:
    id: str  # the digest of the cookie value
    account_key: str
    login: str
    admin: bool
    created_at: datetime
    seen_at: datetime
    signed_in_at: datetime
    second_factor_at: datetime | None
    client_ip: str
    csrf: str

    def __repr__(self) -> str:
        return f"WebSession(login={self.login!r}, admin={self.admin})"


@dataclass(frozen=True)
class Totp:
    account_key: str
    secret: str
    enrolled_at: datetime | None
    last_step: int
    recovery: tuple[str, ...]  # digests of unused recovery codes

    def __repr__(self) -> str:
        return f"Totp(account={self.account_key!r}, enrolled={self.enrolled_at is not None})"


class WebRecords:
    def __init__(self, store: SqlCodeStore) -> None:
        self.store = store

    # -- API tokens ------------------------------------------------------------------------------

    def create_token(
        self, label: str, read_only: bool, expires_at: datetime | None, created_by: str
    ) -> tuple[ApiToken, str]:
        """A new token and its value, which is shown once and kept only as a digest."""
        selector = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(8))
        secret = "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(40))
        cur = self.store.run(
            "INSERT INTO api_tokens (label, selector, hash, read_only, created_at, expires_at,"
            " created_by) VALUES (?,?,?,?,?,?,?) RETURNING id",
            (
                label,
                selector,
                digest(secret),
                int(read_only),
                _ts(utcnow()),
                _ts(expires_at),
                created_by,
            ),
        )
        token = self.token(int(cur.fetchone()[0]))
        assert token is not None
        return token, f"{TOKEN_PREFIX}{selector}_{secret}"

    def token(self, token_id: int) -> ApiToken | None:
        row = self.store.run("SELECT * FROM api_tokens WHERE id = ?", (token_id,)).fetchone()
        return _token(row) if row else None

    def tokens(self) -> list[ApiToken]:
        return [_token(r) for r in self.store.run("SELECT * FROM api_tokens ORDER BY id")]

    def revoke_token(self, token_id: int) -> bool:
        cur = self.store.run(
            "UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (_ts(utcnow()), token_id),
        )
        return cur.rowcount == 1

    def authenticate_token(self, value: str, ip: str) -> ApiToken | None:
        """The usable token this bearer value is, its use recorded; None for anything else."""
        if not value.startswith(TOKEN_PREFIX):
            return None
        selector, _, secret = value[len(TOKEN_PREFIX) :].partition("_")
        row = self.store.run("SELECT * FROM api_tokens WHERE selector = ?", (selector,)).fetchone()
        if row is None or not hmac.compare_digest(row["hash"], digest(secret)):
            return None
        token = _token(row)
        if not token.usable():
            return None
        self.store.run(
            "UPDATE api_tokens SET last_used_at = ?, last_used_ip = ? WHERE id = ?",
            (_ts(utcnow()), ip, token.id),
        )
        return token

    # -- portal sessions -------------------------------------------------------------------------

    def open_session(
        self, account_key: str, login: str, admin: bool, client_ip: str, second_factor: bool
    ) -> tuple[WebSession, str]:
        """A new signed-in session and its cookie value (kept only as a digest)."""
        value = secrets.token_urlsafe(32)
        now = _ts(utcnow())
        self.store.run(
            "INSERT INTO web_sessions (id, account_key, login, admin, created_at, seen_at,"
            " signed_in_at, second_factor_at, client_ip, csrf) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                digest(value),
                account_key,
                login,
                int(admin),
                now,
                now,
                now,
                now if second_factor else None,
                client_ip,
                secrets.token_urlsafe(24),
            ),
        )
        session = self.session(value)
        assert session is not None
        return session, value

    def session(self, value: str) -> WebSession | None:
        row = self.store.run("SELECT * FROM web_sessions WHERE id = ?", (digest(value),)).fetchone()
        return _session(row) if row else None

    def touch_session(self, session: WebSession, **changes: datetime | str | None) -> None:
        """Record a request (seen_at), and what changed: signed_in_at, second_factor_at,
        client_ip."""
        fields: dict[str, int | str | None] = {"seen_at": _ts(utcnow())}
        for name, value in changes.items():
            fields[name] = _ts(value) if isinstance(value, datetime) else value
        assignments = ", ".join(f"{name} = :{name}" for name in fields)
        self.store.run(
            f"UPDATE web_sessions SET {assignments} WHERE id = :id", {**fields, "id": session.id}
        )

    def close_session(self, session: WebSession) -> None:
        self.store.run("DELETE FROM web_sessions WHERE id = ?", (session.id,))

    def close_sessions_before(self, moment: datetime) -> int:
        """Forget sessions last seen before `moment` (expired ones)."""
        return self.store.run("DELETE FROM web_sessions WHERE seen_at < ?", (_ts(moment),)).rowcount

    # -- TOTP --------------------------------------------------------------------------------

    def totp(self, account_key: str) -> Totp | None:
        row = self.store.run("SELECT * FROM totp WHERE account_key = ?", (account_key,)).fetchone()
        return _totp(row) if row else None

    def start_totp(self, account_key: str, secret: str) -> None:
        """A new secret awaiting its first code (replaces an unfinished enrolment)."""
        self.store.run(
            "INSERT INTO totp (account_key, secret) VALUES (?, ?) ON CONFLICT(account_key)"
            " DO UPDATE SET secret = excluded.secret WHERE totp.enrolled_at IS NULL",
            (account_key, secret),
        )

    def finish_totp(self, account_key: str, step: int, recovery_digests: list[str]) -> bool:
        cur = self.store.run(
            "UPDATE totp SET enrolled_at = ?, last_step = ?, recovery = ?"
            " WHERE account_key = ? AND enrolled_at IS NULL",
            (_ts(utcnow()), step, " ".join(recovery_digests), account_key),
        )
        return cur.rowcount == 1

    def use_step(self, account_key: str, step: int) -> bool:
        """Record a TOTP time step as used; False if it (or a later one) was used already."""
        cur = self.store.run(
            "UPDATE totp SET last_step = ? WHERE account_key = ? AND last_step < ?",
            (step, account_key, step),
        )
        return cur.rowcount == 1

    def use_recovery(self, account_key: str, code: str) -> bool:
        """Spend one recovery code; False if it is not an unused one."""
        totp = self.totp(account_key)
        wanted = digest(code)
        if totp is None or wanted not in totp.recovery:
            return False
        left = " ".join(d for d in totp.recovery if d != wanted)
        cur = self.store.run(
            "UPDATE totp SET recovery = ? WHERE account_key = ? AND recovery = ?",
            (left, account_key, " ".join(totp.recovery)),
        )
        return cur.rowcount == 1

    def reset_totp(self, account_key: str) -> None:
        self.store.run("DELETE FROM totp WHERE account_key = ?", (account_key,))


def _token(row) -> ApiToken:
    return ApiToken(
        id=row["id"],
        label=row["label"],
        selector=row["selector"],
        read_only=bool(row["read_only"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        expires_at=_dt(row["expires_at"]),
        last_used_at=_dt(row["last_used_at"]),
        last_used_ip=row["last_used_ip"],
        revoked_at=_dt(row["revoked_at"]),
        created_by=row["created_by"],
    )


def _session(row) -> WebSession:
    return WebSession(
        id=row["id"],
        account_key=row["account_key"],
        login=row["login"],
        admin=bool(row["admin"]),
        created_at=datetime.fromtimestamp(row["created_at"], UTC),
        seen_at=datetime.fromtimestamp(row["seen_at"], UTC),
        signed_in_at=datetime.fromtimestamp(row["signed_in_at"], UTC),
        second_factor_at=_dt(row["second_factor_at"]),
        client_ip=row["client_ip"],
        csrf=row["csrf"],
    )


def _totp(row) -> Totp:
    return Totp(
        account_key=row["account_key"],
        secret=row["secret"],
        enrolled_at=_dt(row["enrolled_at"]),
        last_step=row["last_step"],
        recovery=tuple(row["recovery"].split()),
    )
