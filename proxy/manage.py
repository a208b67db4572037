"""One service layer for managing app passwords and reading accounts: the CLI, the portal and
the admin API call it and only present its answers, so a rule lives here once (who may act on
which account, what a new code may be, what each refusal is called).

Synchronous (the directory and the store block): the web side runs it in a thread. Every change
is audited with who made it (`Actor`), never with a code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from proxy.audit import Audit
from proxy.auth.policy import account_problems
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import MAX_LABEL, Issued, Refused, issue_code
from proxy.codes.sending import (
    MAX_DOMAINS,
    MAX_MESSAGES_PER_DAY,
    MAX_SENDERS,
    SendingPolicy,
    address_problem,
    domain_problem,
    policy,
    sender_problem,
)
from proxy.codes.store import (
    CapReached,
    CodeRecord,
    CodeStore,
    StoreUnavailable,
    day_of,
    utcnow,
)
from proxy.config import SCOPES, Settings
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.sasl import identity_problem

# Client networks one code may be limited to.
MAX_NETWORKS = 16

# Uses a code may be limited to (a printer scanning daily for thirty years stays below it).
MAX_USES = 100_000

ErrorCode = Literal["invalid", "not_found", "forbidden", "cap_reached", "conflict", "unavailable"]


class ManageError(Exception):
    """A request refused: a stable `code` (the API's `error`, the CLI's exit status), a message
    for a person, and the input `field` at fault where there is one."""

    def __init__(self, code: ErrorCode, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Actor:
    """Who asks. A portal user acts on their own account only; an admin (portal), the CLI and
    an API token on any; a read-only token changes nothing."""

    kind: Literal["cli", "portal", "admin", "api"]
    name: str  # the OS user, the signed-in login or the token's label: audit and created_by
    account_key: str | None = None  # portal: the signed-in account
    read_only: bool = False

    def may_manage(self, account_key: str) -> bool:
        return self.kind != "portal" or account_key == self.account_key

    @property
    def created_by(self) -> str:
        """What a code records as its maker: "cli:root", "portal:alice", "admin:bob",
        "api:offboarding script"."""
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True)
class Verdict:
    """One prerequisite of app passwords, as `directory check`, the portal and the API show it."""

    check: str  # enabled | legacy | mfa | identity
    ok: bool
    detail: str  # what is so
    advice: str = ""  # what to do about it, when not ok


@dataclass(frozen=True)
class AccountCheck:
    account: Account
    verdicts: tuple[Verdict, ...]

    @property
    def allowed(self) -> bool:
        return all(v.ok for v in self.verdicts)

    @property
    def refusal(self) -> str | None:
        return next((v.detail for v in self.verdicts if not v.ok), None)


@dataclass(frozen=True)
class CodeRequest:
    """What a new code may be asked to be; checked by Manager.create."""

    label: str
    scopes: tuple[str, ...] | None = None  # None: codes.default_scopes
    expires_at: datetime | None = None  # None: codes.default_expires, unless never_expires
    max_uses: int | None = None
    networks: tuple[str, ...] = ()
    never_expires: bool = False  # asked for no expiry (the CLI's `--expires never`)
    # The sending policy (SMTP; proxy/codes/sending.py): any of the three makes one.
    mail_from: tuple[str, ...] = ()  # addresses, *@domain, own or *; default own
    rcpt_domains: tuple[str, ...] = ()
    max_messages_per_day: int | None = None
    custodian: str | None = None  # also told of the code's expiry (apppass notify)


@dataclass(frozen=True)
class SendingChange:
    """A code's new sending policy, replacing the old one whole; all three empty lifts it."""

    mail_from: tuple[str, ...] = ()
    rcpt_domains: tuple[str, ...] = ()
    max_messages_per_day: int | None = None


class Manager:
    def __init__(
        self,
        settings: Settings,
        directory: Any,
        store: CodeStore,
        hasher: CodeHasher,
        audit: Audit | None = None,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self.store = store
        self.hasher = hasher
        self.audit = audit

    # -- accounts --------------------------------------------------------------------------------

    def account(self, login: str) -> Account:
        account = self._directory(lambda: self.directory.lookup(login))
        if account is None:
            raise ManageError("not_found", f"unknown login {login!r}", "login")
        return account

    def account_by_key(self, key: str) -> Account | None:
        return self._directory(lambda: self.directory.by_key(key))

    def search(self, text: str, limit: int = 20) -> list[Account]:
        """Accounts whose names contain `text` (admins' search)."""
        text = text.strip()
        if not text or len(text) > 100:
            raise ManageError("invalid", "search for 1 to 100 characters", "q")
        return self._directory(lambda: list(self.directory.search(text, limit)))

    def check(self, account: Account) -> AccountCheck:
        """The prerequisites of app passwords, each with what to do when it fails: the same
        verdicts the Authenticator applies (proxy/auth/policy.py), worded for a person."""
        policy = self.settings.policy
        problems = dict(account_problems(account, policy))
        identity = identity_problem(account.upstream_identity)
        group = policy.legacy_group or "the legacy sign-in group"
        mfa_where = f"(the {policy.mfa_group} group)" if policy.mfa_group else "with the helpdesk"
        verdicts = (
            Verdict(
                "enabled",
                "enabled" not in problems,
                problems.get("enabled", "account enabled"),
                "ask the IT helpdesk to enable the account",
            ),
            Verdict(
                "legacy",
                "legacy" not in problems,
                problems.get("legacy", "allowed to use legacy mail sign-in"),
                f"ask the IT helpdesk to add you to {group}",
            ),
            Verdict(
                "mfa",
                "mfa" not in problems,
                problems.get("mfa", "has a second factor" if account.mfa else "no second factor"),
                f"enrol a second factor for your account {mfa_where}",
            ),
            Verdict(
                "identity",
                identity is None,
                identity or "mailbox identity usable",
                "ask the IT helpdesk to fix the account's mail identity",
            ),
        )
        return AccountCheck(account, tuple(_without_advice_when_ok(v) for v in verdicts))

    # -- codes -----------------------------------------------------------------------------------

    def codes(
        self, actor: Actor, account_key: str, include_inactive: bool = False
    ) -> list[CodeRecord]:
        self._may(actor, account_key)
        return self._counted(
            self._store(lambda: self.store.list(account_key, include_inactive=include_inactive))
        )

    def all_codes(
        self,
        actor: Actor,
        account_key: str | None = None,
        include_inactive: bool = False,
        stale: bool = False,
    ) -> list[CodeRecord]:
        """Every account's codes (or one account's), for the CLI and admins; `stale`: only
        those that stopped working while a device still tries them (codes list --stale)."""
        if actor.kind == "portal":
            raise ManageError("forbidden", "you may manage only your own app passwords")
        records = self._store(
            lambda: self.store.list(account_key, include_inactive=include_inactive or stale)
        )
        if stale:
            now = utcnow()
            records = [r for r in records if r.still_retrying(now)]
        return self._counted(records)

    def code(self, actor: Actor, code_id: int) -> CodeRecord:
        record = self._store(lambda: self.store.get(code_id))
        if record is None or not actor.may_manage(record.account_key):
            # Someone else's code is "not found", so that ids tell nothing.
            raise ManageError("not_found", f"no app password with id {code_id}", "id")
        return self._counted([record])[0]

    def _counted(self, records: list[CodeRecord]) -> list[CodeRecord]:
        """The records with the messages each sent today, for codes with a daily cap."""
        capped = [r.id for r in records if r.sending.max_per_day]
        if not capped:
            return records
        sent = self._store(lambda: self.store.sent_on(capped, day_of(utcnow())))
        return [
            replace(r, sent_today=sent.get(r.id, 0)) if r.sending.max_per_day else r
            for r in records
        ]

    def create(self, actor: Actor, account: Account, request: CodeRequest) -> Issued:
        """A new code, shown once by the caller. Refused with the CLI's reasons."""
        self._writes(actor)
        self._may(actor, account.key)
        scopes, networks = _valid(request)
        sending = _sending(request, scopes or self.settings.codes.default_scopes)
        custodian = _custodian(request.custodian)
        expires = request.expires_at
        default = self.settings.codes.default_expires
        if expires is None and not request.never_expires and default is not None:
            expires = datetime.now(UTC).replace(microsecond=0) + default
        try:
            issued = issue_code(
                self.settings,
                _Resolved(account),
                self.store,
                self.hasher,
                login=account.login,
                label=request.label,
                scopes=scopes,
                expires_at=expires,
                max_uses=request.max_uses,
                networks=networks,
                created_by=actor.created_by,
                sending=sending,
                custodian=custodian,
            )
        except CapReached as exc:
            raise ManageError("cap_reached", str(exc)) from None
        except Refused as exc:
            raise ManageError("forbidden", str(exc)) from None
        except StoreUnavailable as exc:
            raise ManageError("unavailable", f"the code store is unavailable: {exc}") from None
        rec = issued.record
        self._audit(
            actor,
            "create",
            rec,
            scopes=list(rec.scopes),
            max_uses=rec.max_uses,
            sending=sending.describe() if sending.active else None,
            custodian=custodian,
        )
        return issued

    def set_disabled(self, actor: Actor, code_id: int, disabled: bool) -> CodeRecord:
        self._writes(actor)
        record = self.code(actor, code_id)
        if record.revoked_at is not None:
            word = "disabled" if disabled else "enabled"
            raise ManageError("conflict", f"app password {code_id} is revoked; it cannot be {word}")
        self._store(lambda: self.store.set_disabled(code_id, disabled))
        self._audit(actor, "disable" if disabled else "enable", record)
        return self.code(actor, code_id)

    def set_sending(self, actor: Actor, code_id: int, change: SendingChange) -> CodeRecord:
        """Replace a code's sending policy. Its live SMTP sessions end within seconds and log in
        again under the new one (proxy/sessions.py)."""
        self._writes(actor)
        record = self.code(actor, code_id)
        if record.revoked_at is not None:
            raise ManageError("conflict", f"app password {code_id} is revoked")
        sending = _sending(change, record.scopes)
        if not self._store(lambda: self.store.set_sending(code_id, sending)):
            raise ManageError("conflict", f"app password {code_id} is revoked")
        self._audit(actor, "sending", record, sending=sending.describe())
        return self.code(actor, code_id)

    def set_custodian(self, actor: Actor, code_id: int, custodian: str | None) -> CodeRecord:
        """Who else is mailed the code's expiry and idle notices (None: the account only)."""
        self._writes(actor)
        record = self.code(actor, code_id)
        address = _custodian(custodian)
        if record.revoked_at is not None or not self._store(
            lambda: self.store.set_custodian(code_id, address)
        ):
            raise ManageError("conflict", f"app password {code_id} is revoked")
        self._audit(actor, "custodian", record, custodian=address)
        return self.code(actor, code_id)

    def idle_codes(self, after: timedelta, now: datetime | None = None) -> list[CodeRecord]:
        """Codes that could log in but were not used (nor made or enabled) for `after`."""
        now = now or utcnow()
        return self._store(lambda: self.store.idle(now - after, now))

    def disable_idle(
        self, actor: Actor, record: CodeRecord, after: timedelta, now: datetime | None = None
    ) -> CodeRecord | None:
        """Disable an idle code (codes.disable_after_unused; not revoked: it can be enabled
        again), unless a login came meanwhile; audited. The code as it is now, or None."""
        self._writes(actor)
        now = now or utcnow()
        if not self._store(lambda: self.store.disable_idle(record.id, now - after, now)):
            return None
        days = int(after.total_seconds() // 86400)
        self._audit(actor, "disable", record, reason=f"unused for {days} days")
        return self._store(lambda: self.store.get(record.id))

    def revoke(self, actor: Actor, code_id: int) -> CodeRecord:
        self._writes(actor)
        record = self.code(actor, code_id)
        if not self._store(lambda: self.store.revoke(code_id)):
            raise ManageError("conflict", f"app password {code_id} was already revoked")
        self._audit(actor, "revoke", record)
        return self.code(actor, code_id)

    def revoke_all(self, actor: Actor, account_key: str) -> int:
        self._writes(actor)
        self._may(actor, account_key)
        count = self._store(lambda: self.store.revoke_all(account_key))
        if self.audit is not None:
            self.audit.event(
                "manage",
                action="revoke_all",
                actor=actor.kind,
                by=actor.name,
                account=account_key,
                count=count,
            )
        return count

    # -- helpers ---------------------------------------------------------------------------------

    def _may(self, actor: Actor, account_key: str) -> None:
        if not actor.may_manage(account_key):
            raise ManageError("forbidden", "you may manage only your own app passwords")

    @staticmethod
    def _writes(actor: Actor) -> None:
        if actor.read_only:
            raise ManageError("forbidden", "this API token is read-only")

    def _audit(self, actor: Actor, action: str, record: CodeRecord, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.event(
                "manage",
                action=action,
                actor=actor.kind,
                by=actor.name,
                account=record.account_key,
                login=record.account_login,
                code=record.id,
                label=record.label,
                **fields,
            )

    @staticmethod
    def _directory(call: Any) -> Any:
        try:
            return call()
        except DirectoryUnavailable as exc:
            raise ManageError("unavailable", f"the directory is unavailable: {exc}") from None

    @staticmethod
    def _store(call: Any) -> Any:
        try:
            return call()
        except StoreUnavailable as exc:
            raise ManageError("unavailable", f"the code store is unavailable: {exc}") from None


def _without_advice_when_ok(verdict: Verdict) -> Verdict:
    return verdict if not verdict.ok else Verdict(verdict.check, True, verdict.detail)


class _Resolved:
    """The one account already resolved, as issue_code's directory (no second lookup)."""

    def __init__(self, account: Account) -> None:
        self.account = account

    def lookup(self, login: str) -> Account | None:
        return self.account


def _valid(request: CodeRequest) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """Check a request's fields, naming the one at fault."""
    label = request.label.strip()
    if not label or len(label) > MAX_LABEL or any(ord(c) < 0x20 or ord(c) == 0x7F for c in label):
        raise ManageError("invalid", f"a label is 1 to {MAX_LABEL} printable characters", "label")
    scopes = request.scopes
    if scopes is not None:
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown or not scopes:
            raise ManageError("invalid", f"scopes are one or more of {', '.join(SCOPES)}", "scopes")
        scopes = tuple(dict.fromkeys(scopes))
    if request.max_uses is not None and not 1 <= request.max_uses <= MAX_USES:
        raise ManageError("invalid", f"max uses is a whole number from 1 to {MAX_USES}", "max_uses")
    if request.expires_at is not None and request.never_expires:
        raise ManageError("invalid", "give an expiry or never, not both", "expires_at")
    if request.expires_at is not None and request.expires_at <= datetime.now(UTC):
        raise ManageError("invalid", "the expiry must be in the future", "expires_at")
    return scopes, _networks(request.networks)


def _sending(request: CodeRequest | SendingChange, scopes: Iterable[str]) -> SendingPolicy:
    """The request's sending policy, each value checked (naming its field)."""
    for field, values, problem, most in (
        ("mail_from", request.mail_from, sender_problem, MAX_SENDERS),
        ("rcpt_domains", request.rcpt_domains, domain_problem, MAX_DOMAINS),
    ):
        for value in values:
            if (why := problem(value.strip().lower())) is not None:
                raise ManageError("invalid", f"{value[:100]!r} {why}", field)
        if len(values) > most:
            raise ManageError("invalid", f"at most {most} of them", field)
    cap = request.max_messages_per_day
    if cap is not None and not 1 <= cap <= MAX_MESSAGES_PER_DAY:
        raise ManageError(
            "invalid",
            f"messages per day is a whole number from 1 to {MAX_MESSAGES_PER_DAY}",
            "max_messages_per_day",
        )
    sending = policy(request.mail_from, request.rcpt_domains, cap)
    if sending.active and "smtp" not in scopes:
        raise ManageError(
            "invalid", "a sending policy is for sending mail: include smtp in the scopes", "scopes"
        )
    return sending


def _custodian(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if address_problem(value) is not None:
        raise ManageError(
            "invalid", f"{value[:100]!r} is not a mail address like team@example.org", "custodian"
        )
    return value.lower()


def _networks(values: Iterable[str]) -> tuple[str, ...]:
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise ManageError(
                "invalid", f"{value!r} is not a network like 10.0.4.0/24", "networks"
            ) from None
    if len(out) > MAX_NETWORKS:
        raise ManageError("invalid", f"at most {MAX_NETWORKS} networks", "networks")
    return tuple(dict.fromkeys(out))
