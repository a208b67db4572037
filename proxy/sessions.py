"""Live sessions, and the checks that end those that may no longer run.

A session lives as long as its client and upstream keep it open, often days (IMAP IDLE). So the
proxy checks it again on a schedule: its code every `code_interval` and within seconds of a
change by any process (revoked, disabled or expired ends it, whatever else is true of the code;
an SMTP session also ends when the code's sending policy changed), and its account (disabled,
locked, expired, removed from the legacy-sign-in group, no second factor while one is required,
gone from the directory, or its password changed since the code was made) every
`account_interval`, through the directory's cache. An ended session's client is dropped and the
end is audited with the reason.

The checks survive every error: a store or directory that fails is logged once when trouble
starts and once when it ends, and the next round tries again. Sessions are not ended because
the store or the directory cannot be asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer, task

from proxy.audit import Audit
from proxy.auth.decision import Grant
from proxy.auth.policy import account_refusal
from proxy.codes.store import CodeRecord, utcnow
from proxy.config import PolicySettings
from proxy.directory.account import Account

# How often the store's record of revoked, disabled and deleted codes (written by any process:
# the CLI, the portal, the API, another node) is read: 1 s, so that a revocation ends its live
# sessions within 2 s. One indexed read of a table that is usually empty past the last id.
CHANGE_CHECK_SECONDS = 1.0

# How often every live session's code is checked in full (expiry, and anything a missed change
# would hide): 15 s. bongo-project ends sessions "at their next command", Dovecot only at the
# next login; a bounded wait is what a revoked printer needs.
CODE_CHECK_SECONDS = 15.0

# How often live sessions' accounts are checked against the directory: 60 s, within the LDAP
# lookup cache's life, so a round costs the directory little.
ACCOUNT_CHECK_SECONDS = 60.0


class LiveSession(Protocol):
    """A logged-in (or logging-in) client connection, as proxy/frontend.py's Frontend is."""

    grant: Grant | None
    session_id: str

    def end(self, reason: str) -> None: ...

    def drain(self) -> None: ...


class SessionGuard:
    """The registry of live sessions and the checks that end those no longer allowed."""

    def __init__(
        self,
        *,
        codes: Callable[[list[int]], defer.Deferred[dict[int, CodeRecord]]],
        account: Callable[[str], defer.Deferred[Account | None]],
        changes: Callable[[int | None], defer.Deferred[tuple[int, list[int]]]],
        changed: Callable[[int], None] = lambda code_id: None,
        policy: PolicySettings,
        audit: Audit,
        reactor: Any,
        code_interval: float = CODE_CHECK_SECONDS,
        account_interval: float = ACCOUNT_CHECK_SECONDS,
        change_interval: float = CHANGE_CHECK_SECONDS,
    ) -> None:
        self._codes = codes  # the records of these code ids (missing: gone)
        self._account = account  # the account with this key, or None if it is gone
        self._changes = changes  # (newest change id, codes changed since the one given)
        self._changed = changed  # told of each changed code (the verified cache drops it)
        self._last_change: int | None = None
        self.policy = policy
        self.audit = audit
        self._reactor = reactor
        self._intervals = {
            "changes": change_interval,
            "codes": code_interval,
            "accounts": account_interval,
        }
        self.sessions: set[LiveSession] = set()
        self._loops: list[task.LoopingCall] = []
        self._trouble: dict[str, str | None] = dict.fromkeys(self._intervals)

    def add(self, session: LiveSession) -> None:
        self.sessions.add(session)

    def discard(self, session: LiveSession) -> None:
        self.sessions.discard(session)

    def start(self) -> None:
        checks = (
            ("changes", self.check_changes),
            ("codes", self.check_codes),
            ("accounts", self.check_accounts),
        )
        for name, check in checks:
            loop = task.LoopingCall(self._guarded, name, check)
            loop.clock = self._reactor
            # The change log is read at once: its position now is where following starts.
            loop.start(self._intervals[name], now=name == "changes")
            self._loops.append(loop)

    def stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()

    def end_all(self, reason: str) -> None:
        for session in list(self.sessions):
            session.end(reason)

    # -- the checks ------------------------------------------------------------------------------

    async def check_changes(self) -> None:
        """Follow the codes changed since the last look, and check the live sessions of those."""
        last, changed = await self._changes(self._last_change)
        self._last_change = last
        for code_id in changed:
            self._changed(code_id)
        if changed:
            await self.check_codes(set(changed))

    async def check_codes(self, only: set[int] | None = None) -> None:
        """End the sessions whose code is revoked, disabled or expired (or gone), and the SMTP
        sessions whose code's sending policy changed."""
        by_code = self._granted(lambda grant: grant.code_id)
        if only is not None:
            by_code = {code_id: s for code_id, s in by_code.items() if code_id in only}
        if not by_code:
            return
        records = await self._codes(list(by_code))
        now = utcnow()
        for code_id, sessions in by_code.items():
            record = records.get(code_id)
            reason = _code_reason(record, now)
            if reason is not None:
                self._end(sessions, f"app password {code_id} {reason}", code=code_id)
            elif record is not None and (changed := _policy_changed(sessions, record)):
                # Also forget it again: a login verified just before the change may have put
                # the old policy back into the verified cache after the change log dropped it.
                self._changed(code_id)
                reason = f"app password {code_id} sending policy changed"
                self._end(changed, reason, code=code_id)

    async def check_accounts(self) -> None:
        """End the sessions whose account may no longer sign in with an app password."""
        by_account = self._granted(lambda grant: grant.account.key)
        if not by_account:
            return
        accounts = {key: await self._account(key) for key in by_account}
        created = await self._codes(sorted({s.grant.code_id for s in _flat(by_account) if s.grant}))
        for key, sessions in by_account.items():
            account = accounts[key]
            for session in sessions:
                assert session.grant is not None
                reason = self._account_reason(account, created.get(session.grant.code_id))
                if reason is not None:
                    self._end([session], reason, account=key)

    def _account_reason(self, account: Account | None, record: CodeRecord | None) -> str | None:
        if account is None:
            return "account gone from the directory"
        refusal = account_refusal(account, self.policy)
        if refusal is not None:
            return refusal
        changed = account.password_changed_at
        if (
            self.policy.revoke_on_password_change
            and changed is not None
            and record is not None
            and record.created_at < changed
        ):
            return "account password changed after the app password was made"
        return None

    # -- helpers ---------------------------------------------------------------------------------

    def _granted(self, key: Callable[[Grant], Any]) -> dict[Any, list[LiveSession]]:
        groups: dict[Any, list[LiveSession]] = {}
        for session in list(self.sessions):
            if session.grant is not None:
                groups.setdefault(key(session.grant), []).append(session)
        return groups

    def _end(self, sessions: Iterable[LiveSession], reason: str, **fields: Any) -> None:
        for session in sessions:
            self.audit.event("session_ended", session=session.session_id, reason=reason, **fields)
            session.end(reason)

    @defer.inlineCallbacks
    def _guarded(self, name: str, check: Callable[[], Any]):
        """Run one round; never let an error stop the loop, and log trouble once per change."""
        try:
            yield defer.ensureDeferred(check())
        except Exception as exc:  # the store or directory failed: keep sessions, try again
            problem = f"{type(exc).__name__}: {exc}"
            if self._trouble[name] != problem:
                self._trouble[name] = problem
                self.audit.event("session_check", check=name, result="fail", reason=problem)
            return
        if self._trouble[name] is not None:
            self._trouble[name] = None
            self.audit.event("session_check", check=name, result="ok")


def _code_reason(record: CodeRecord | None, now: Any) -> str | None:
    """Why a code may no longer carry a session, or None. A code that is merely used up keeps
    the session that used it; revoked, disabled and expired end it whatever else is true."""
    if record is None:
        return "deleted"
    if record.revoked_at is not None:
        return "revoked"
    if record.disabled:
        return "disabled"
    if record.expires_at is not None and record.expires_at <= now:
        return "expired"
    return None


def _policy_changed(sessions: list[LiveSession], record: CodeRecord) -> list[LiveSession]:
    """The SMTP sessions that logged in under another sending policy than the code has now:
    they end, so that a tightened policy holds at once (the device logs in again)."""
    return [
        s
        for s in sessions
        if s.grant is not None
        and s.grant.sending_policy is not None
        and s.grant.sending_policy != record.sending
    ]


def _flat(groups: dict[Any, list[LiveSession]]) -> list[LiveSession]:
    return [session for sessions in groups.values() for session in sessions]
