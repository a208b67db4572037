"""The Authenticator: turns an Attempt into a Decision (docs/architecture.md, step 3). Never
touches a socket; the directory, the store and argon2 run in their thread pools.

Fails closed: directory, store or hash-pool trouble is a temporary Denial, never a Grant. Only
after the code itself verified may a Denial say more than "bad credentials".
"""

from __future__ import annotations

import time

from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from proxy.audit import Audit
from proxy.auth.cache import VerifiedCache
from proxy.auth.decision import Attempt, Denial, Grant, Refusal
from proxy.auth.policy import account_refusal
from proxy.auth.ratelimit import FailureLimiter, client_bucket
from proxy.codes.generate import split
from proxy.codes.hashing import ClientShareFull, PoolFull
from proxy.codes.store import Claim, StoreUnavailable
from proxy.config import Settings
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.sasl import is_valid_login

# Threads for directory lookups (ldap3 is synchronous; each holds one pooled connection).
DIRECTORY_THREADS = 4

_CLAIM_REFUSALS = {
    Claim.REVOKED: Refusal.EXPIRED,  # RFC 5530 EXPIRED: "get a new passphrase"
    Claim.EXPIRED: Refusal.EXPIRED,
    Claim.USED_UP: Refusal.EXPIRED,
    Claim.SUPERSEDED: Refusal.EXPIRED,
    Claim.DISABLED: Refusal.FORBIDDEN,
    Claim.SCOPE: Refusal.FORBIDDEN,
    Claim.NETWORK: Refusal.FORBIDDEN,
    Claim.GONE: Refusal.CREDENTIALS,
}


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        directory,
        store,
        hasher,
        audit: Audit,
        reactor,
        clock=time.monotonic,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.store = store  # AsyncCodeStore
        self.hasher = hasher  # CodeHasher, started
        self.audit = audit
        self._reactor = reactor
        self._clock = clock
        self.limiter = FailureLimiter(settings.auth.ip_failures_per_minute)
        self.cache = VerifiedCache(settings.auth.cache_ttl.total_seconds())
        self._dir_pool = ThreadPool(
            minthreads=1, maxthreads=DIRECTORY_THREADS, name="apppass-directory"
        )
        self._dir_pool.start()

    def stop(self) -> None:
        self._dir_pool.stop()

    def _lookup(self, login: str):
        if not getattr(self.directory, "blocking", True):
            return defer.maybeDeferred(self.directory.lookup, login)
        return threads.deferToThreadPool(
            self._reactor, self._dir_pool, self.directory.lookup, login
        )

    def authenticate(self, attempt: Attempt) -> defer.Deferred:
        """A Deferred that always fires with a Grant or a Denial (never errbacks)."""
        d = defer.ensureDeferred(self._decide(attempt))

        def unexpected(failure):
            self.audit.event(
                "error",
                where="authenticate",
                error=failure.getErrorMessage(),
                type=failure.type.__name__,
                session=attempt.session,
            )
            return Denial(Refusal.TEMPORARY, "internal error")

        d.addErrback(unexpected)
        d.addCallback(self._record, attempt)
        return d

    def _record(self, decision, attempt: Attempt):
        account = decision.account
        fields = {
            "protocol": attempt.protocol.value,
            "login": attempt.login,
            "client": attempt.client_ip,
            "port": attempt.client_port or None,
            "tls": attempt.tls,
            "listener": attempt.listener or None,
            "session": attempt.session or None,
            "mechanism": attempt.mechanism or None,
            "account": account.key if account else None,
        }
        if decision.ok:
            self.limiter.success(attempt.client_ip)
            self.audit.event(
                "auth",
                result="grant",
                code=decision.code_id,
                label=decision.code_label,
                upstream_identity=decision.upstream_identity,
                **fields,
            )
        else:
            if decision.refusal == Refusal.CREDENTIALS:
                self.limiter.failure(attempt.client_ip, self._clock())
            self.audit.event(
                "auth",
                result="deny",
                refusal=decision.refusal.value,
                reason=decision.reason,
                code=decision.code_id,
                **fields,
            )
        return decision

    async def _decide(self, attempt: Attempt):
        if not is_valid_login(attempt.login):
            return Denial(Refusal.CREDENTIALS, "invalid login name (control characters)")
        if self.limiter.blocked(attempt.client_ip, self._clock()):
            return Denial(Refusal.LIMIT, "too many failed logins from this address")
        parts = split(attempt.secret)
        try:
            account: Account | None = await self._lookup(attempt.login)
        except DirectoryUnavailable as exc:
            return Denial(Refusal.TEMPORARY, f"directory unavailable: {exc}")
        if parts is None or account is None:
            reason = (
                "unknown login"
                if account is None
                else "not an app password (wrong length or characters)"
            )
            return await self._dummy(reason, account, attempt.client_ip)
        selector, code = parts

        cached = self.cache.get(account.key, code, self._clock())
        if cached is not None:
            code_id, label = cached
        else:
            try:
                record = await self.store.find(account.key, selector)
            except StoreUnavailable as exc:
                return Denial(Refusal.TEMPORARY, f"store unavailable: {exc}", account)
            if record is None:
                return await self._dummy(
                    "no app password with this selector", account, attempt.client_ip
                )
            try:
                verified = await self.hasher.verify(
                    record.hash, code, client_bucket(attempt.client_ip)
                )
            except ClientShareFull:
                return self._flooding(attempt.client_ip, account)
            except PoolFull:
                return Denial(Refusal.TEMPORARY, "verification pool full", account, record.id)
            if not verified:
                try:
                    await self.store.record_failure(record.id, attempt.client_ip)
                except StoreUnavailable:
                    pass
                return Denial(
                    Refusal.CREDENTIALS,
                    f"wrong secret for app password {record.id}",
                    account,
                    record.id,
                )
            code_id, label = record.id, record.label
            self.cache.put(account.key, code, code_id, label, self._clock())

        refusal = account_refusal(account, self.settings.policy)
        if refusal:
            return Denial(Refusal.FORBIDDEN, refusal, account, code_id)
        not_before = (
            account.password_changed_at if self.settings.policy.revoke_on_password_change else None
        )
        try:
            claim = await self.store.claim(
                code_id, attempt.protocol.value, attempt.client_ip, not_before
            )
        except StoreUnavailable as exc:
            return Denial(Refusal.TEMPORARY, f"store unavailable: {exc}", account, code_id)
        if claim != Claim.OK:
            if claim in (Claim.REVOKED, Claim.GONE, Claim.SUPERSEDED):
                self.cache.forget(account.key, code)
            reason = f"app password {code_id} {claim.value}"
            if claim == Claim.SCOPE:
                reason = f"app password {code_id} not valid for {attempt.protocol.value}"
            elif claim == Claim.NETWORK:
                reason = f"app password {code_id} not valid from {attempt.client_ip}"
            return Denial(_CLAIM_REFUSALS[claim], reason, account, code_id)
        return Grant(account, code_id, label, account.upstream_identity)

    def _flooding(self, client_ip: str, account: Account | None) -> Denial:
        """An address with its whole share of the queue waiting is flooding: count it as a
        failure, so the limiter stops it before the queue drains rather than after."""
        self.limiter.failure(client_ip, self._clock())
        return Denial(
            Refusal.LIMIT,
            "this address has its whole share of the verification queue waiting",
            account,
        )

    async def _dummy(self, reason: str, account: Account | None, client_ip: str):
        """Spend one verification so that this failure takes as long as a wrong secret."""
        try:
            await self.hasher.verify(None, "0000000000000000", client_bucket(client_ip))
        except ClientShareFull:
            return self._flooding(client_ip, account)
        except PoolFull:
            return Denial(Refusal.TEMPORARY, "verification pool full", account)
        return Denial(Refusal.CREDENTIALS, reason, account)
