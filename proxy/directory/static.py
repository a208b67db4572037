"""The static directory: accounts from a YAML file, the embedded default for small sites and the
demo. Re-read automatically when the file changes; a broken edit is logged and the last good
version keeps being served."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from proxy.configschema import ConfigError, Context, Invalid, Node, boolean, show, text, text_list
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.directory.passwords import (
    PasswordHash,
    password_hash_problem,
    verify_password_hash,
)
from proxy.sasl import is_valid_login

log = logging.getLogger(__name__)

# Problems a log line about a broken users file quotes; the rest are counted. check-config
# lists them all.
LOGGED_PROBLEMS = 3


def _moment(node: Node, key: str, value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise Invalid("must be a date or time like 2026-06-30 or 2026-06-30T12:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _stable_id(node: Node, key: str, value: Any) -> str:
    """An account's id: codes belong to it, so it must never name anyone else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip() or not is_valid_login(value):
        raise Invalid("must be a non-empty string without control characters, e.g. a UUID")
    return value.strip()


def _password_hash(node: Node, key: str, value: Any) -> PasswordHash | None:
    """The portal password's hash. A mistake is reported without the value: it may be a
    password pasted in by mistake."""
    problem = password_hash_problem(value.strip()) if isinstance(value, str) else "must be text"
    if problem:
        node.ctx.error(node.key_path(key), problem)
        return None
    return PasswordHash(value.strip())


def _id_required(login: str) -> str:
    """The rule a missing id breaks, with a fresh UUID to paste and the way to keep old codes."""
    return (
        f"is required: a stable id that is never given to anyone else (app passwords belong to "
        f'it); add e.g. "id: {uuid.uuid4()}" (before ids were required the id was the login: '
        f'"id: {login}" keeps this account\'s codes, if it is still the same person)'
    )


def parse_accounts(
    data: Any, source: str, legacy_group: str | None, mfa_group: str | None
) -> dict[str, Account]:
    """Validate a users file; returns {lowercased login name or alias: Account}."""
    ctx = Context(source, Path("."))
    if not isinstance(data, dict):
        ctx.error("", f"must be a mapping with an 'accounts' key (got {show(data)})")
        ctx.check()
    root = Node(ctx, "", data)
    accounts = root.node("accounts", required=True)
    root.finish()
    if accounts is None:  # missing or not a mapping: the error is recorded
        ctx.check()
        return {}
    names: dict[str, Account] = {}
    keys: set[str] = set()
    for login, entry in accounts.data.items():
        accounts._used.add(login)
        path = accounts.key_path(str(login))
        if not isinstance(login, str) or not is_valid_login(login):
            ctx.error(path, "must be a login name without control characters")
            continue
        node = Node(ctx, path, entry or {}) if isinstance(entry, (dict, type(None))) else None
        if node is None:
            ctx.error(path, f"must be a mapping (got {show(entry)})")
            continue
        if node.data.get("id") is None:
            node._used.add("id")
            ctx.error(node.key_path("id"), _id_required(login))
            key = ""
        else:
            key = node.get("id", _stable_id, "")
        aliases = node.get("aliases", text_list, ())
        groups = node.get("groups", text_list, ())
        enabled = node.get("enabled", boolean, True)
        expires = node.get("expires", _moment, None)
        mfa = node.get("mfa", boolean, False)
        changed = node.get("password_changed", _moment, None)
        password = node.get("password_hash", _password_hash, None)
        account = Account(
            key=key,
            login=login,
            upstream_identity=node.get("upstream", text, login),
            names=(login, *aliases),
            display_name=node.get("name", text, ""),
            groups=tuple(groups),
            enabled=enabled,
            disabled_reason="" if enabled else "disabled",
            legacy_allowed=legacy_group is None
            or legacy_group.lower() in {g.lower() for g in groups},
            mfa=mfa or (mfa_group is not None and mfa_group.lower() in {g.lower() for g in groups}),
            password_changed_at=changed,
            dn=f"{source}:{login}",
            extra={
                **({"expires": expires} if expires else {}),
                **({"password_hash": password} if password else {}),
            },
        )
        node.finish()
        if key and key in keys:
            ctx.error(node.key_path("id"), f"must be unique ({show(key)} is used twice)")
        keys.add(key)
        for name in account.names:
            if name.lower() in names:
                ctx.error(path, f"login name {show(name)} belongs to two accounts")
            names[name.lower()] = account
    ctx.check()
    return names


def read_users(file: Path, legacy_group: str | None, mfa_group: str | None) -> dict[str, Account]:
    """Read and validate a users file; ConfigError lists every problem, each naming the file."""
    try:
        raw = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{file.name}: not UTF-8 text"]) from None
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).replace("\n", " ")
        raise ConfigError([f"{file.name}: not valid YAML{where}: {problem}"]) from None
    return parse_accounts(data, file.name, legacy_group, mfa_group)


def _with_expiry(account: Account | None) -> Account | None:
    """An account whose `expires` moment has passed is disabled from then on."""
    expires = account.extra.get("expires") if account else None
    if account and account.enabled and expires and expires <= datetime.now(UTC):
        return replace(account, enabled=False, disabled_reason="expired")
    return account


# What check-config and directory check add when the users file does not load.
STILL_SERVING = (
    "a running apppass keeps serving the last good version of this file (and logs these "
    "problems) until it is fixed"
)

# How often a lookup checks the file for changes (one stat() call).
RECHECK_SECONDS = 1.0


class StaticDirectory:
    """Accounts from a YAML file. Login names are matched case-insensitively.

    Lookups are in-memory dictionary reads, so the proxy calls them on the reactor thread
    (`blocking = False`) instead of paying a thread-pool hop per login.

    A file that cannot be read or parsed when first opened raises ConfigError. Later, a broken
    edit is logged (at once, and again at each re-check while it stays broken: at most once per
    RECHECK_SECONDS on lookups, and on every `reload()`), and the last good version keeps being
    served; `problems` says what is wrong until the file is fixed."""

    blocking = False

    def __init__(
        self,
        file: Path,
        legacy_group: str | None = None,
        mfa_group: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.file = Path(file)
        self.legacy_group = legacy_group
        self.mfa_group = mfa_group
        self.problems: tuple[str, ...] = ()  # why the file on disk is not the one served
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._names: dict[str, Account] = {}
        self._load()

    def _load(self, force: bool = False) -> None:
        """(Re)read the file if it changed since the last good read."""
        now = self._clock()
        if not force and self._stamp is not None and now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self.file.stat()
        except OSError as exc:
            self._broken([f"{self.file}: cannot read: {exc.strerror}"])
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp and not force:
            return
        try:
            names = read_users(self.file, self.legacy_group, self.mfa_group)
        except ConfigError as exc:
            self._broken(exc.problems)
            return
        if self.problems:
            log.warning("users file %s: fixed; now serving it (%d names)", self.file, len(names))
        self._names, self._stamp, self.problems = names, stamp, ()

    def _broken(self, problems: list[str]) -> None:
        if self._stamp is None:  # nothing good to keep serving
            raise ConfigError(problems)
        self.problems = tuple(problems)
        more = len(problems) - LOGGED_PROBLEMS
        log.error(
            "users file %s is broken, still serving its last good version: %s%s",
            self.file,
            "; ".join(problems[:LOGGED_PROBLEMS]),
            f" (and {more} more: apppass check-config lists them)" if more > 0 else "",
        )

    def reload(self) -> None:
        """Re-read the file now (SIGHUP, tests), even if it looks unchanged."""
        with self._lock:
            self._load(force=True)

    def search(self, text: str, limit: int = 20) -> list[Account]:
        """Accounts whose names or display name contain `text`, at most `limit`, by login."""
        needle = text.lower()
        with self._lock:
            self._load()
            accounts = {a.key: a for a in self._names.values()}.values()
        found = [
            a for a in accounts if any(needle in n.lower() for n in (*a.names, a.display_name))
        ]
        ordered = sorted(found, key=lambda a: a.login.lower())[:limit]
        return [account for a in ordered if (account := _with_expiry(a)) is not None]

    def lookup(self, login: str) -> Account | None:
        if not is_valid_login(login):
            return None
        with self._lock:
            self._load()
            account = self._names.get(login.lower())
        return _with_expiry(account)

    def by_key(self, key: str) -> Account | None:
        with self._lock:
            self._load()
            return _with_expiry(next((a for a in self._names.values() if a.key == key), None))

    def verify_password(self, account: Account, password: str) -> bool:
        """The account's portal password (its `password_hash`, as the file says now); an
        account without one cannot sign in. Slow on purpose: call it off the reactor."""
        current = self.by_key(account.key)
        stored = current.extra.get("password_hash") if current is not None else None
        return verify_password_hash(stored, password)

    def close(self) -> None:
        pass


__all__ = ["DirectoryUnavailable", "StaticDirectory", "parse_accounts", "read_users"]
