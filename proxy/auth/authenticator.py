"""The Authenticator: turns an Attempt into a Decision (docs/architecture.md, step 3). Never
touches a socket; the directory, the store and argon2 run in bounded, fair queues
(proxy/fairqueue.py), and identical work in flight runs once.

Fails closed: directory, store or queue trouble is a temporary Denial, never a Grant. Only after
the code itself verified may a Denial say more than "bad credentials". A Grant holds a
Reservation: the frontend confirms it once the upstream login succeeded (the use is counted
then) or releases it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import defer

from proxy.audit import Audit
from proxy.auth.cache import VerifiedCache
from proxy.auth.decision import Attempt, Decision, Denial, Grant, Refusal, Sending
from proxy.auth.policy import account_refusal
from proxy.auth.ratelimit import FailureLimiter, Limiter, client_bucket
from proxy.codes.generate import split
from proxy.codes.sending import SendingPolicy, resolve
from proxy.codes.store import (
    INTERNAL,
    Claim,
    CodeMessages,
    CodeRecord,
    Reservation,
    StoreUnavailable,
)
from proxy.config import Settings
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.fairqueue import ClientShareFull, FairQueue, QueueFull, SingleFlight
from proxy.metrics import Metrics, Timer
from proxy.oplog import Health
from proxy.protocols import MailProtocol
from proxy.sasl import identity_problem, is_valid_login

# Threads for directory lookups (ldap3 is synchronous; each holds one pooled connection).
DIRECTORY_THREADS = 4

# Directory lookups that may wait for a thread: 256, a client at most an eighth of them. With
# LDAP answering in a few ms that is well under a second of backlog; a slow or hung LDAP server
# then refuses new logins at once (temporary) instead of queueing them past their clients.
DIRECTORY_QUEUE = 256

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

# Claims refused because the code stopped working, while its secret was right: a device still
# set up with it, retrying for months. Each is counted on the code (codes list --stale shows it)
# and never against the client's address: a printer network retrying old codes must not lock
# out its neighbours (README, "Stale devices"). A disabled code is one too: it may come back.
STALE = frozenset({Claim.REVOKED, Claim.EXPIRED, Claim.USED_UP, Claim.SUPERSEDED, Claim.DISABLED})


def counts_against_address(decision: Decision) -> bool:
    """Whether a decision is a failure the address's limiter counts: bad credentials only (an
    unknown login, a malformed code, an unknown selector, a wrong secret), never a stale code."""
    return (
        isinstance(decision, Denial)
        and decision.refusal is Refusal.CREDENTIALS
        and not decision.stale
    )


class Authenticator:
    def __init__(
        self,
        settings: Settings,
        directory: Any,
        store: Any,
        hasher: Any,
        audit: Audit,
        reactor: Any,
        clock=time.monotonic,
        metrics: Metrics | None = None,
        health: Health | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.store = store  # AsyncCodeStore
        self.hasher = hasher  # CodeHasher, started
        self.audit = audit
        self._reactor = reactor
        self._clock = clock
        self.metrics = metrics or Metrics()
        self.health = health or Health()
        # Per address, in memory; the Service shares it across nodes (proxy/auth/shared.py).
        self.limiter: Limiter = FailureLimiter(settings.auth.ip_failures_per_minute)
        self.cache = VerifiedCache(settings.auth.cache_ttl.total_seconds(), clock=clock)
        self.directory_queue = FairQueue("apppass-directory", DIRECTORY_THREADS, DIRECTORY_QUEUE)
        self.directory_queue.start(reactor)
        self._lookups: SingleFlight[str] = SingleFlight()  # by login
        self._key_lookups: SingleFlight[str] = SingleFlight()  # by account key
        self._verifications: SingleFlight[bytes] = SingleFlight()

    def stop(self) -> None:
        self.directory_queue.stop()

    # -- the decision ----------------------------------------------------------------------------

    def authenticate(self, attempt: Attempt) -> defer.Deferred[Decision]:
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

    def _record(self, decision: Decision, attempt: Attempt) -> Decision:
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
        if isinstance(decision, Grant):
            self.limiter.success(attempt.client_ip, decision.account.key)
            self.audit.event(
                "auth",
                result="grant",
                code=decision.code_id,
                label=decision.code_label,
                upstream_identity=decision.upstream_identity,
                **fields,
            )
        else:
            if counts_against_address(decision):
                target = account.key if account else f"login:{attempt.login.casefold()}"
                self.limiter.failure(attempt.client_ip, self._clock(), target)
            self.audit.event(
                "auth",
                result="deny",
                refusal=decision.refusal.value,
                reason=decision.reason,
                code=decision.code_id,
                stale=decision.stale or None,
                **fields,
            )
        return decision

    async def _decide(self, attempt: Attempt) -> Decision:
        if not is_valid_login(attempt.login):
            return Denial(Refusal.CREDENTIALS, "invalid login name (control characters)")
        if self.limiter.blocked(attempt.client_ip, self._clock()):
            return Denial(Refusal.LIMIT, "too many failed logins from this address")
        client = client_bucket(attempt.client_ip)
        parts = split(attempt.secret)
        try:
            with self._phase("directory"):
                account: Account | None = await self._lookup(attempt.login, client)
        except DirectoryUnavailable as exc:
            self.metrics.backend_errors.labels("directory").inc()
            self.health.failed("directory", str(exc))
            return Denial(Refusal.TEMPORARY, f"directory unavailable: {exc}")
        except ClientShareFull:
            return self._flooding(attempt.client_ip, None, "directory")
        except QueueFull:
            return Denial(Refusal.TEMPORARY, "directory queue full")
        self.health.ok("directory")
        if parts is None or account is None:
            reason = (
                "unknown login"
                if account is None
                else "not an app password (wrong length or characters)"
            )
            return await self._dummy(reason, account, client, attempt.client_ip)
        selector, code = parts

        cached = self.cache.get(account.key, code, self._clock())
        if cached is not None:
            code_id, label, policy = cached
        else:
            try:
                record, verified = await self._verify(account.key, selector, code, client)
            except StoreUnavailable as exc:
                self.metrics.backend_errors.labels("store").inc()
                self.health.failed("store", str(exc))
                return Denial(Refusal.TEMPORARY, f"store unavailable: {exc}", account)
            except ClientShareFull:
                return self._flooding(attempt.client_ip, account, "verification")
            except QueueFull:
                return Denial(Refusal.TEMPORARY, "verification queue full", account)
            if record is None:
                return Denial(Refusal.CREDENTIALS, "no app password with this selector", account)
            if not verified:
                try:
                    await self.store.record_failure(record.id, attempt.client_ip, client)
                except (StoreUnavailable, QueueFull):
                    pass
                return Denial(
                    Refusal.CREDENTIALS,
                    f"wrong secret for app password {record.id}",
                    account,
                    record.id,
                )
            code_id, label, policy = record.id, record.label, record.sending
            self.cache.put(account.key, code, code_id, label, self._clock(), policy)

        refusal = account_refusal(account, self.settings.policy) or identity_problem(
            account.upstream_identity
        )
        if refusal:
            return Denial(Refusal.FORBIDDEN, refusal, account, code_id)
        not_before = (
            account.password_changed_at if self.settings.policy.revoke_on_password_change else None
        )
        try:
            with self._phase("store"):
                claim = await self.store.claim(
                    code_id, attempt.protocol.value, attempt.client_ip, not_before, client
                )
        except StoreUnavailable as exc:
            self.metrics.backend_errors.labels("store").inc()
            self.health.failed("store", str(exc))
            return Denial(Refusal.TEMPORARY, f"store unavailable: {exc}", account, code_id)
        except QueueFull:
            return Denial(Refusal.TEMPORARY, "store queue full", account, code_id)
        self.health.ok("store")
        if isinstance(claim, Claim):
            if claim in (Claim.REVOKED, Claim.GONE, Claim.SUPERSEDED):
                self.cache.forget(account.key, code)
            reason = f"app password {code_id} {claim.value}"
            if claim == Claim.SCOPE:
                reason = f"app password {code_id} not valid for {attempt.protocol.value}"
            elif claim == Claim.NETWORK:
                reason = f"app password {code_id} not valid from {attempt.client_ip}"
            if claim in STALE:
                await self._stale(code_id, attempt.client_ip, client)
            return Denial(_CLAIM_REFUSALS[claim], reason, account, code_id, stale=claim in STALE)
        return Grant(
            account,
            code_id,
            label,
            account.upstream_identity,
            claim,
            self._sending(policy, account, code_id, client),
            policy if attempt.protocol is MailProtocol.SMTP else None,
        )

    async def _stale(self, code_id: int, client_ip: str, client: str) -> None:
        """Count a stale device's try on its code (best effort: the refusal stands anyway)."""
        try:
            await self.store.record_stale(code_id, client_ip, client)
        except (StoreUnavailable, QueueFull):
            pass

    def _sending(
        self, policy: SendingPolicy, account: Account, code_id: int, client: str
    ) -> Sending | None:
        """The code's sending policy for this login: `own` is the account's addresses now."""
        rules = resolve(policy, account.names, account.upstream_identity)
        if rules is None:
            return None
        return Sending(rules, CodeMessages(self.store, code_id, rules.max_per_day, client))

    # -- blocking work, bounded and coalesced ----------------------------------------------------

    def _lookup(self, login: str, client: str) -> defer.Deferred[Account | None]:
        """The account for a login; concurrent lookups of the same login query once."""
        if not getattr(self.directory, "blocking", True):
            return defer.maybeDeferred(self.directory.lookup, login)
        return self._lookups.run(
            login, lambda: self.directory_queue.submit(client, self.directory.lookup, login)
        )

    def account(self, key: str) -> defer.Deferred[Account | None]:
        """The account with this stable id now (the session checks ask), or None if it is gone."""
        if not getattr(self.directory, "blocking", True):
            return defer.maybeDeferred(self.directory.by_key, key)
        return self._key_lookups.run(
            key, lambda: self.directory_queue.submit(INTERNAL, self.directory.by_key, key)
        )

    def _verify(
        self, account_key: str, selector: str, code: str, client: str
    ) -> defer.Deferred[tuple[CodeRecord | None, bool]]:
        """(the code's record or None, whether the secret matches), at the cost of exactly one
        argon2id verification (against a dummy hash for an unknown selector); concurrent logins
        with the same code share it (20 devices behind one NAT after a restart verify once)."""

        async def work() -> tuple[CodeRecord | None, bool]:
            with self._phase("store"):
                record = await self.store.find(account_key, selector, client)
            with self._phase("argon2"):
                verified = await self.hasher.verify(record.hash if record else None, code, client)
            return record, bool(verified and record is not None)

        key = self.cache.digest(account_key, f"{selector}\x00{code}")
        return self._verifications.run(key, lambda: defer.ensureDeferred(work()))

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Time a phase of the login for apppass_login_phase_seconds (success or not)."""
        timer = Timer()
        try:
            yield
        finally:
            self.metrics.phase_seconds.labels(name).observe(timer.seconds)

    def _flooding(self, client_ip: str, account: Account | None, queue: str) -> Denial:
        """An address with its whole share of a queue waiting is flooding: count it as a
        failure, so the limiter stops it before the queue drains rather than after."""
        self.limiter.failure(client_ip, self._clock(), "flooding")
        return Denial(
            Refusal.LIMIT, f"this address has its whole share of the {queue} queue waiting", account
        )

    async def _dummy(
        self, reason: str, account: Account | None, client: str, client_ip: str
    ) -> Denial:
        """Spend one verification so that this failure takes as long as a wrong secret."""
        try:
            await self.hasher.verify(None, "0000000000000000", client)
        except ClientShareFull:
            return self._flooding(client_ip, account, "verification")
        except QueueFull:
            return Denial(Refusal.TEMPORARY, "verification queue full", account)
        return Denial(Refusal.CREDENTIALS, reason, account)

    # -- after the upstream login ----------------------------------------------------------------

    async def confirm(self, grant: Grant, attempt: Attempt) -> bool:
        """The upstream login succeeded: count the use. False if that cannot be done (the store
        is down, or the code was revoked or disabled meanwhile): the session must not start."""
        try:
            counted = await self.store.confirm(
                grant.reservation, attempt.protocol.value, attempt.client_ip
            )
        except (StoreUnavailable, QueueFull) as exc:
            self.audit.event(
                "auth",
                result="unconfirmed",
                code=grant.code_id,
                session=attempt.session,
                reason=f"store unavailable: {exc}",
            )
            return False
        if not counted:
            self.audit.event(
                "auth",
                result="unconfirmed",
                code=grant.code_id,
                session=attempt.session,
                reason=f"app password {grant.code_id} revoked or disabled during the login",
            )
        return bool(counted)

    def release(self, grant: Grant) -> None:
        """The login did not happen: give the code's use back (a hold also lapses by itself)."""
        reservation: Reservation = grant.reservation
        self.store.release(reservation).addErrback(lambda _failure: None)
