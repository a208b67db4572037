"""Build the configured directory."""

from __future__ import annotations

from proxy.config import Settings


def open_directory(settings: Settings):
    d, p = settings.directory, settings.policy
    if d.kind == "ldap":
        from proxy.directory.ldap import LdapDirectory

        return LdapDirectory(d.ldap, legacy_group=p.legacy_group, legacy_filter=p.legacy_filter,
                             mfa_group=p.mfa_group, mfa_filter=p.mfa_filter)
    from proxy.directory.static import StaticDirectory

    return StaticDirectory(d.static_file, legacy_group=p.legacy_group, mfa_group=p.mfa_group)
