"""LDAP search filters: escaping, building and checking them, and the login name forms a typed
login is searched by (LoginQuery, parse_login, LoginRefused).

Every value a user typed reaches a filter only through `escape_value`; a login with control
characters or filter metacharacters is refused before any query.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_bytes, escape_filter_chars

from proxy.configschema import show
from proxy.sasl import is_valid_login

# Characters refused in a login name before any query (besides NUL and other controls, which
# proxy.sasl.is_valid_login refuses). They are LDAP filter metacharacters (RFC 4515 §3) and
# appear in no real login: Dovecot's default auth_username_chars is only letters, digits and
# ".-_@". The backslash is allowed once, as the separator of DOMAIN\user.
FILTER_METACHARACTERS = frozenset("()*")

# Active Directory constant (MS-ADTS): LDAP_MATCHING_RULE_IN_CHAIN, an extensible match that
# follows nested groups.
LDAP_MATCHING_RULE_IN_CHAIN = "1.2.840.113556.1.4.1941"


# --- checking --------------------------------------------------------------------------------


def filter_problem(text: object) -> str | None:
    """None if text is an LDAP filter ldap3 can send, else the rule it breaks (for an error)."""
    if not isinstance(text, str) or not text.strip().startswith("("):
        return "must be an LDAP filter in parentheses, like (objectClass=person)"
    try:
        parse_filter(
            text, None, auto_escape=False, auto_encode=False, validator=None, check_names=False
        )
    except (LDAPException, ValueError, IndexError) as exc:
        return f"must be an LDAP filter ({exc})"
    return None


def check_filter(name: str, text: str) -> None:
    """Raise ValueError (starting with name) unless text is an LDAP filter ldap3 can send."""
    problem = filter_problem(text)
    if problem:
        raise ValueError(f"{name}: {problem} (got {show(text)})")


# --- building --------------------------------------------------------------------------------


def escape_value(value: str) -> str:
    """An assertion value for a filter: RFC 4515 escaping of * ( ) \\ NUL, plus whitespace as
    hex, since ldap3 strips whitespace around assertion values when it parses a filter. What
    the server receives is exactly value's UTF-8 bytes."""
    escaped = escape_filter_chars(value)
    return "".join(
        "".join(f"\\{b:02x}" for b in c.encode("utf-8")) if c.isspace() else c for c in escaped
    )


def equality(attribute: str, value: str) -> str:
    return f"({attribute}={escape_value(value)})"


def contains(attributes: Sequence[str], text: str) -> str:
    """Entries where any of `attributes` contains `text` (an admin's search), escaped."""
    terms = "".join(f"({a}=*{escape_value(text)}*)" for a in attributes)
    return terms if len(attributes) == 1 else f"(|{terms})"


def any_of(terms: Iterable[tuple[str, str]]) -> str:
    """(|(a=v)…) over (attribute, value) terms, values escaped."""
    return "(|" + "".join(equality(a, v) for a, v in terms) + ")"


def both(first: str, second: str) -> str:
    return f"(&{first}{second})"


def member_filter(template: str, dn: str, name: str) -> str:
    """The group_member_filter for one account: {dn} and {name}, escaped, substituted."""
    return template.replace("{dn}", escape_value(dn)).replace("{name}", escape_value(name))


def in_chain_filter(group_dn: str, attribute: str = "memberOf") -> str:
    """AD: true when an entry is a member of group_dn directly or through other groups."""
    return f"({attribute}:{LDAP_MATCHING_RULE_IN_CHAIN}:={escape_value(group_dn)})"


def guid_filter(attribute: str, key: str) -> str | None:
    """A filter for a binary GUID attribute from its string form; None if key is no UUID."""
    try:
        raw = uuid.UUID(key).bytes_le
    except ValueError:
        return None
    return f"({attribute}={escape_bytes(raw)})"


# --- login names -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoginQuery:
    """What a typed login name is looked up as.

    `explicit` terms are the name as typed (uid=…, mail=…, userPrincipalName=…, or the user
    part of DOMAIN\\user); `implicit` ones are AD's fallback of user@dnsdomain to the short
    name. An explicit match wins over an implicit one; two of a kind are ambiguous.
    """

    login: str
    explicit: tuple[tuple[str, str], ...]
    implicit: tuple[tuple[str, str], ...] = ()
    form: str = "name"  # "name", "user@domain", "DOMAIN\\user"

    @property
    def terms(self) -> tuple[tuple[str, str], ...]:
        return self.explicit + self.implicit

    @property
    def cache_key(self) -> str:
        # Login attributes match case-insensitively (caseIgnoreMatch and friends in OpenLDAP
        # and AD), so names differing only in case are the same lookup.
        return self.login.lower()

    def filter(self, user_filter: str) -> str:
        return both(user_filter, any_of(self.terms))


@dataclass(frozen=True)
class LoginRefused:
    """A login name refused before any query, and why (for the log and `directory check`)."""

    login: str
    reason: str
    invalid: bool = True  # malformed or hostile, as opposed to an unknown domain


def parse_login(
    login: str,
    login_attributes: Sequence[str],
    short_name_attribute: str | None = None,
    netbios_domains: Iterable[str] = (),
    dns_domains: Iterable[str] = (),
) -> LoginQuery | LoginRefused:
    """Map a typed login name to the terms it is searched by, as Active Directory does:
    `DOMAIN\\user` is the short name (sAMAccountName) in that NetBIOS domain; `user@domain`
    is any login attribute (userPrincipalName, mail…) and, when domain is one of dns_domains,
    also the short name user; a plain name is any login attribute."""
    if not is_valid_login(login) or not _utf8(login):
        return LoginRefused(login, "invalid login name (control characters or too long)")
    if any(c in FILTER_METACHARACTERS for c in login):
        return LoginRefused(login, "invalid login name (LDAP filter metacharacters)")
    if "\\" in login:
        domain, _, user = login.partition("\\")
        if not domain or not user or "\\" in user or "@" in user:
            return LoginRefused(login, "invalid login name (malformed DOMAIN\\user)")
        known = {d.lower() for d in netbios_domains}
        if not short_name_attribute or not known:
            return LoginRefused(
                login, "DOMAIN\\user names are not enabled (no NetBIOS domain known)", invalid=False
            )
        if domain.lower() not in known:
            return LoginRefused(login, f"unknown domain {domain!r} in DOMAIN\\user", invalid=False)
        return LoginQuery(login, ((short_name_attribute, user),), (), "DOMAIN\\user")
    explicit = tuple((attr, login) for attr in login_attributes)
    if "@" in login:
        user, _, domain = login.rpartition("@")
        if not user or not domain:
            return LoginRefused(login, "invalid login name (malformed user@domain)")
        implicit: tuple[tuple[str, str], ...] = ()
        if short_name_attribute and domain.lower() in {d.lower() for d in dns_domains}:
            implicit = ((short_name_attribute, user),)
        return LoginQuery(login, explicit, implicit, "user@domain")
    return LoginQuery(login, explicit, (), "name")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
