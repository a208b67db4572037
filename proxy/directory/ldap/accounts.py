"""How an LDAP entry reads as an Account: its stable id, names, groups, state (disabled,
expired, locked…: proxy/directory/ldap/state.py) and the policy verdicts (legacy sign-in, MFA),
each with its reason."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import ldap3

from proxy.directory.account import Account
from proxy.directory.ldap.cache import TtlCache
from proxy.directory.ldap.filters import both, equality, in_chain_filter, member_filter
from proxy.directory.ldap.search import Entry, matches, search
from proxy.directory.ldap.settings import LdapSettings
from proxy.directory.ldap.state import StateReader
from proxy.directory.ldap.values import guid_to_str, looks_like_dn, normalize_dn, rdn_value

log = logging.getLogger(__name__)

Domains = tuple[tuple[str, ...], tuple[str, ...]]  # (NetBIOS names, DNS names)


@dataclass(frozen=True)
class PolicyRules:
    """Who may sign in with app passwords (legacy_*: no group and no filter, everyone) and who
    has a second factor (mfa_*). A group is a name or a DN; when both a group and a filter are
    given, both must hold."""

    legacy_group: str | None = None
    legacy_filter: str | None = None
    mfa_group: str | None = None
    mfa_filter: str | None = None


class AccountReader:
    """Reads Accounts from entries the directory found, on the connection it found them on.
    Thread-safe; policy groups' DNs and lockout durations are cached."""

    def __init__(
        self, settings: LdapSettings, clock: Callable[[], float], utcnow: Callable[[], datetime]
    ) -> None:
        self.settings = settings
        self._utcnow = utcnow
        self._group_dns: TtlCache[str | None] = TtlCache(clock)  # policy groups' DNs by name
        self._states = StateReader(settings, clock)
        self.attributes = self._account_attributes()  # what a search for accounts asks for

    def read(
        self,
        conn: ldap3.Connection,
        entry: Entry,
        canonical: str,
        *,
        server: str,
        policy: PolicyRules,
        domains: Callable[[ldap3.Connection], Domains],
    ) -> Account | None:
        """The account of entry, known as canonical, found on server; None if the entry has no
        stable id. domains gives the discovered AD domains (for DOMAIN\\user names)."""
        s = self.settings
        key = self._key(entry)
        if not key:
            log.error(
                "LDAP entry %s has no %s: it cannot own app passwords", entry.dn, s.id_attribute
            )
            return None
        now = self._utcnow()
        short_name = entry.text(s.short_name_attribute) if s.short_name_attribute else ""
        group_dns, group_names = self._groups(conn, entry, short_name)

        state = self._states.read(conn, entry, now)
        enabled, disabled_reason = state.enabled, state.disabled_reason
        reasons = {"enabled": state.why, "password": state.password_why}
        legacy_ok, reasons["legacy"] = self._policy(
            conn,
            entry,
            group_dns,
            policy.legacy_group,
            policy.legacy_filter,
            default=True,
            what="legacy sign-in",
        )
        mfa_ok, reasons["mfa"] = self._policy(
            conn, entry, group_dns, policy.mfa_group, policy.mfa_filter, default=False, what="MFA"
        )
        upstream = entry.text(s.upstream_identity_attribute)
        if not upstream and enabled:
            enabled, disabled_reason = False, "no upstream identity"
            reasons["enabled"] = f"the entry has no {s.upstream_identity_attribute}"
        names = self._names(conn, entry, short_name, domains)
        return Account(
            key=key,
            login=canonical,
            upstream_identity=upstream,
            names=names,
            display_name=entry.text(s.display_name_attribute) if s.display_name_attribute else "",
            groups=group_names,
            enabled=enabled,
            disabled_reason=disabled_reason,
            legacy_allowed=legacy_ok,
            mfa=mfa_ok,
            password_changed_at=state.password_changed_at,
            dn=entry.dn,
            extra={
                "server": server,
                "group_dns": group_dns,
                "reasons": reasons,
                "password_must_change": state.password_must_change,
            },
        )

    def login_attribute_of(self, entry: Entry) -> str:
        """The first login attribute entry has: its value is the canonical login name."""
        for attr in self.settings.login_attributes:
            if entry.text(attr):
                return attr
        return self.settings.short_name_attribute or self.settings.login_attributes[0]

    def _account_attributes(self) -> list[str]:
        s = self.settings
        names = [
            *s.login_attributes,
            s.short_name_attribute,
            s.id_attribute,
            s.upstream_identity_attribute,
            s.display_name_attribute,
            s.account_control_attribute,
            s.computed_account_control_attribute,
            s.locked_time_attribute,
            *s.valid_from_attributes,
            *s.expiry_attributes,
            s.password_changed_attribute,
        ]
        if s.group_membership == "memberof":
            names.append(s.member_of_attribute)
        if s.locked_time_attribute:
            names.append("pwdPolicySubentry")
        seen: dict[str, str] = {}
        for name in names:
            if name and name.lower() not in seen:
                seen[name.lower()] = name
        return list(seen.values())

    def _key(self, entry: Entry) -> str:
        raw = entry.raw(self.settings.id_attribute)
        if not raw:
            return ""
        value = raw[0]
        if self.settings.id_format == "guid":
            return guid_to_str(value) if len(value) == 16 else ""
        text = value.decode("utf-8", "replace").strip()
        try:
            return str(uuid.UUID(text))
        except ValueError:
            return text

    def _names(
        self,
        conn: ldap3.Connection,
        entry: Entry,
        short_name: str,
        domains: Callable[[ldap3.Connection], Domains],
    ) -> tuple[str, ...]:
        s = self.settings
        names: list[str] = []
        for attr in (*s.login_attributes, s.short_name_attribute):
            if attr:
                names.extend(entry.texts(attr))
        if short_name:
            netbios, dns = s.netbios_domains, s.dns_domains
            if s.discover_domains:
                found_netbios, found_dns = domains(conn)
                netbios, dns = netbios + found_netbios, dns + found_dns
            names.extend(f"{d}\\{short_name}" for d in netbios)
            names.extend(f"{short_name}@{d}" for d in dns)
        seen: dict[str, str] = {}
        for name in names:
            seen.setdefault(name.lower(), name)
        return tuple(seen.values())

    def _groups(
        self, conn: ldap3.Connection, entry: Entry, short_name: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        s = self.settings
        if s.group_membership == "memberof":
            dns = entry.texts(s.member_of_attribute)
            return dns, tuple(rdn_value(dn) for dn in dns)
        filt = both(
            s.group_object_filter, member_filter(s.group_member_filter, entry.dn, short_name)
        )
        groups = search(
            conn,
            s,
            s.group_base_dn or s.base_dn,
            ldap3.SUBTREE,
            filt,
            [s.group_name_attribute],
            paged=True,
        )
        return (
            tuple(g.dn for g in groups),
            tuple(g.text(s.group_name_attribute) or rdn_value(g.dn) for g in groups),
        )

    def _policy(
        self,
        conn: ldap3.Connection,
        entry: Entry,
        group_dns: Sequence[str],
        group: str | None,
        filt: str | None,
        *,
        default: bool,
        what: str,
    ) -> tuple[bool, str]:
        if not group and not filt:
            return default, f"no {what} group or filter configured"
        reasons = []
        ok = True
        if group:
            member, why = self._member(conn, entry, group_dns, group)
            ok = ok and member
            reasons.append(why)
        if filt:
            matched = matches(conn, self.settings, entry.dn, filt)
            ok = ok and matched
            reasons.append(f"{'matches' if matched else 'does not match'} {filt}")
        return ok, "; ".join(reasons)

    def _member(
        self, conn: ldap3.Connection, entry: Entry, group_dns: Sequence[str], group: str
    ) -> tuple[bool, str]:
        group_dn = self._group_dn(conn, group)
        if group_dn is None:
            return False, f"group {group!r} not found in the directory"
        if normalize_dn(group_dn) in {normalize_dn(dn) for dn in group_dns}:
            return True, f"member of {group_dn}"
        s = self.settings
        if s.nested_groups and matches(
            conn, s, entry.dn, in_chain_filter(group_dn, s.member_of_attribute)
        ):
            return True, f"member of {group_dn} (through nested groups)"
        return False, f"not a member of {group_dn}"

    def _group_dn(self, conn: ldap3.Connection, group: str) -> str | None:
        if looks_like_dn(group):
            return group
        key = group.lower()
        hit, cached = self._group_dns.get(key)
        if hit:
            return cached
        s = self.settings
        filt = both(s.group_object_filter, equality(s.group_name_attribute, group))
        found = search(
            conn,
            s,
            s.group_base_dn or s.base_dn,
            ldap3.SUBTREE,
            filt,
            [ldap3.NO_ATTRIBUTES],
            size_limit=2,
        )
        if len(found) != 1:
            log.warning(
                "policy group %r: %s",
                group,
                "not found" if not found else "several groups have this name; give a DN",
            )
            dn = None
        else:
            dn = found[0].dn
        self._group_dns.put(key, dn, s.cache_ttl if dn else s.negative_cache_ttl)
        return dn
