"""The static directory: accounts from a YAML file, the embedded default for small sites and the
demo. Re-read automatically when the file changes."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml

from proxy.configschema import ConfigError, Context, Invalid, Node, boolean, show, text, text_list
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.sasl import is_valid_login


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
        key = str(node.get("id", lambda n, k, v: text(n, k, str(v)), login))
        aliases = node.get("aliases", text_list, ())
        groups = node.get("groups", text_list, ())
        enabled = node.get("enabled", boolean, True)
        expires = node.get("expires", _moment, None)
        mfa = node.get("mfa", boolean, False)
        changed = node.get("password_changed", _moment, None)
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
            extra={"expires": expires} if expires else {},
        )
        node.finish()
        if key in keys:
            ctx.error(node.key_path("id"), f"must be unique ({show(key)} is used twice)")
        keys.add(key)
        for name in account.names:
            if name.lower() in names:
                ctx.error(path, f"login name {show(name)} belongs to two accounts")
            names[name.lower()] = account
    ctx.check()
    return names


def _with_expiry(account: Account | None) -> Account | None:
    """An account whose `expires` moment has passed is disabled from then on."""
    expires = account.extra.get("expires") if account else None
    if account and account.enabled and expires and expires <= datetime.now(UTC):
        return replace(account, enabled=False, disabled_reason="expired")
    return account


# How often a lookup checks the file for changes (one stat() call).
RECHECK_SECONDS = 1.0


class StaticDirectory:
    """Accounts from a YAML file. Login names are matched case-insensitively.

    Lookups are in-memory dictionary reads, so the proxy calls them on the reactor thread
    (`blocking = False`) instead of paying a thread-pool hop per login."""

    blocking = False

    def __init__(
        self, file: Path, legacy_group: str | None = None, mfa_group: str | None = None
    ) -> None:
        self.file = Path(file)
        self.legacy_group = legacy_group
        self.mfa_group = mfa_group
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._names: dict[str, Account] = {}
        self._load()

    def _load(self, force: bool = False) -> None:
        """(Re)read the file if it changed. A broken edit keeps serving the last good file."""
        now = time.monotonic()
        if not force and self._stamp is not None and now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            st = self.file.stat()
        except OSError as exc:
            if self._stamp is None:
                raise ConfigError([f"{self.file}: cannot read: {exc.strerror}"]) from None
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp and not force:
            return
        try:
            data = yaml.safe_load(self.file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            if self._stamp is None:
                raise ConfigError([f"{self.file.name}: not valid YAML: {exc}"]) from None
            return
        try:
            names = parse_accounts(data, self.file.name, self.legacy_group, self.mfa_group)
        except ConfigError:
            if self._stamp is None:
                raise
            return
        self._names, self._stamp = names, stamp

    def reload(self) -> None:
        """Re-read the file now (SIGHUP, tests), even if it looks unchanged."""
        with self._lock:
            self._load(force=True)

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

    def close(self) -> None:
        pass


__all__ = ["DirectoryUnavailable", "StaticDirectory", "parse_accounts"]
