"""Open the configured directory (the static YAML file or LDAP) from its settings values."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.directory.account import Directory
    from proxy.directory.ldap.settings import LdapSettings


class DirectoryChoice(Protocol):
    """Which directory, and its settings (the config's `directory` section)."""

    @property
    def kind(self) -> str: ...  # "static" or "ldap"

    @property
    def static_file(self) -> Path | None: ...

    @property
    def ldap(self) -> LdapSettings | None: ...


class PolicyGroups(Protocol):
    """Who may use app passwords and who has a second factor (the config's `policy` section)."""

    @property
    def legacy_group(self) -> str | None: ...

    @property
    def legacy_filter(self) -> str | None: ...  # LDAP only

    @property
    def mfa_group(self) -> str | None: ...

    @property
    def mfa_filter(self) -> str | None: ...  # LDAP only


def open_directory(directory: DirectoryChoice, policy: PolicyGroups) -> Directory:
    """The directory `directory` names, judging accounts by `policy`'s groups and filters."""
    if directory.kind == "ldap":
        from proxy.directory.ldap.directory import LdapDirectory

        if directory.ldap is None:
            raise ValueError("directory: an ldap directory needs its ldap settings")
        return LdapDirectory(
            directory.ldap,
            legacy_group=policy.legacy_group,
            legacy_filter=policy.legacy_filter,
            mfa_group=policy.mfa_group,
            mfa_filter=policy.mfa_filter,
        )
    from proxy.directory.static import StaticDirectory

    if directory.static_file is None:
        raise ValueError("directory: a static directory needs its file")
    return StaticDirectory(
        directory.static_file, legacy_group=policy.legacy_group, mfa_group=policy.mfa_group
    )
