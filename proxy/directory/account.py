"""The one Account type every directory returns, and the directory interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol


class DirectoryUnavailable(Exception):
    """The directory could not answer (down, slow, misconfigured): a temporary failure."""


@dataclass(frozen=True)
class Account:
    """An account as the proxy sees it, whatever the directory.

    `key` is the directory's stable id (entryUUID, objectGUID or the static id): codes belong to
    it, so a renamed login keeps its codes. Policy facts are evaluated by the directory, which
    knows how group membership and disabling work in its world; `auth.policy` turns them into a
    verdict.
    """

    key: str
    login: str  # the canonical login name (shown by the CLI and portal)
    upstream_identity: str  # who the proxy logs in as upstream (authzid / XCLIENT LOGIN)
    names: tuple[str, ...] = ()  # every name this account can log in with
    display_name: str = ""
    groups: tuple[str, ...] = ()
    enabled: bool = True
    disabled_reason: str = ""  # why not enabled: "disabled", "expired", "locked"…
    legacy_allowed: bool = True  # member of policy.legacy_group (or no group required)
    mfa: bool = False  # the account has a second factor on its primary sign-in
    password_changed_at: datetime | None = None  # primary password's last change (UTC)
    dn: str = ""  # where it came from (an LDAP DN, or the static file's entry)
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class Directory(Protocol):
    """Resolves login names. Synchronous: the proxy calls it from a thread pool, unless the
    directory says its lookups never block (`blocking = False`, the in-memory static file)."""

    blocking: bool

    def lookup(self, login: str) -> Account | None:
        """The account a login name belongs to, or None. Raises DirectoryUnavailable."""

    def by_key(self, key: str) -> Account | None:
        """The account with this stable id, or None. Raises DirectoryUnavailable."""

    def search(self, text: str, limit: int = 20) -> list[Account]:
        """Accounts whose names contain `text` (admins' search). Raises DirectoryUnavailable."""

    def verify_password(self, account: Account, password: str) -> bool:
        """Whether `password` is the account's own (the portal's sign-in): LDAP binds as the
        account, the static file checks its `password_hash`. False for a wrong or empty
        password; raises DirectoryUnavailable. Never logs the password."""

    def close(self) -> None:
        """Release connections."""
