"""LDAP directory: login names resolve to accounts and their policy facts in OpenLDAP or Active
Directory, through ldap3.

ldap3 is synchronous. `LdapDirectory` is therefore synchronous too and thread-safe: the proxy
calls it from a thread pool (never on the reactor thread), the CLI calls it directly. Bound
connections are pooled and re-used; the servers are tried in order, a server that failed is
skipped for `retry_after` seconds; any trouble (down, slow, refused service bind, an unexpected
result code) raises DirectoryUnavailable, a temporary failure, and never yields an account.

Every value a user typed reaches a filter only through `escape_value`; a login with control
characters or filter metacharacters is refused before any query.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import re
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit

import ldap3
from ldap3.core.exceptions import LDAPException
from ldap3.operation.search import parse_filter
from ldap3.utils.conv import escape_bytes, escape_filter_chars
from ldap3.utils.dn import parse_dn

from proxy.directory.account import Account, DirectoryUnavailable
from proxy.sasl import is_valid_login

log = logging.getLogger(__name__)

# --- limits and defaults, with their precedents ----------------------------------------------

# Connect timeout per server: a dead server is skipped after this. sssd's ldap_network_timeout
# is 6 s, nss-pam-ldapd's bind_timelimit 10 s; a login waiting on a dead server should fail
# over well inside a mail client's own timeout (Thunderbird: 100 s, Outlook: 30-60 s).
DEFAULT_CONNECT_TIMEOUT = 3.0

# Per-operation timeout (socket receive timeout, and the server-side time limit of a search).
# sssd's ldap_search_timeout is 6 s, ldap_opt_timeout 8 s.
DEFAULT_TIMEOUT = 5.0

# A server that failed is not tried again for this long (unless every other server fails too).
# sssd retries an offline backend after 60 s (offline_timeout); a proxy wants its preferred
# server back sooner.
DEFAULT_RETRY_AFTER = 30.0

# Bound connections kept per directory. Twisted's reactor thread pool has at most 10 threads.
DEFAULT_POOL_SIZE = 8

# A pooled connection idle this long is closed rather than re-used: AD drops idle LDAP
# connections after MaxConnIdleTime (900 s), OpenLDAP after `idletimeout` (off by default).
DEFAULT_IDLE_TIMEOUT = 300.0

# Page size of group searches: AD's MaxPageSize is 1000; OpenLDAP's default sizelimit is 500.
DEFAULT_PAGE_SIZE = 500

# Cache lifetimes (positive and negative). nscd keeps users 600 s / 20 s and sssd 5400 s; the
# proxy decides access, so disabling someone in the directory must bite within seconds.
DEFAULT_CACHE_TTL = 30.0
DEFAULT_NEGATIVE_CACHE_TTL = 5.0

# Cached lookups kept at most (oldest dropped first); a flood of unknown names cannot grow the
# cache without bound.
CACHE_MAX_ENTRIES = 10_000

# A login search that returns more entries than this is ambiguous anyway.
LOGIN_SEARCH_SIZE_LIMIT = 10

# Characters refused in a login name before any query (besides NUL and other controls, which
# proxy.sasl.is_valid_login refuses). They are LDAP filter metacharacters (RFC 4515 §3) and
# appear in no real login: Dovecot's default auth_username_chars is only letters, digits and
# ".-_@". The backslash is allowed once, as the separator of DOMAIN\user.
FILTER_METACHARACTERS = frozenset("()*")

# Active Directory constants (MS-ADTS 2.2.16, MS-ADA3).
UF_ACCOUNTDISABLE = 0x0002
UF_LOCKOUT = 0x0010
FILETIME_NEVER = (0, 0x7FFFFFFFFFFFFFFF)
LDAP_MATCHING_RULE_IN_CHAIN = "1.2.840.113556.1.4.1941"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

# OpenLDAP ppolicy: pwdAccountLockedTime set to this value means "locked by an administrator
# until unlocked" (slapo-ppolicy(5)); we call that disabled.
PPOLICY_ADMIN_LOCK = "000001010000Z"

# LDAP result codes (RFC 4511 §4.1.9) that are answers rather than trouble.
RESULT_SUCCESS = 0
RESULT_SIZE_LIMIT_EXCEEDED = 4
RESULT_NO_SUCH_OBJECT = 32

GROUP_MEMBERSHIP_MODES = ("memberof", "search")
ID_FORMATS = ("text", "guid")

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=timezone.utc)
_ATTRIBUTE_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+)$")
_GENERALIZED_TIME_RE = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?(?:[.,](\d+))?(Z|[+-]\d{2}(?:\d{2})?)$")


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LdapSettings:
    """How to reach the directory and read accounts from it; `openldap()` and
    `active_directory()` fill everything but the URIs, the service bind and the base DN.

    Invalid values raise ValueError whose message starts with the field name.
    """

    # Servers, tried in order (failover). ldap:// (optionally with start_tls) or ldaps://.
    uris: tuple[str, ...] = ("ldap://127.0.0.1:389",)
    start_tls: bool = False
    ca_file: str = ""  # PEM CA bundle for ldaps/StartTLS; empty: the system's trust store
    # Service bind; an empty bind_dn binds anonymously. The password comes as a string or as a
    # file read at each new connection (so a rotated password is picked up). Never logged.
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    bind_password_file: str = ""
    base_dn: str = ""
    # Accounts: which entries, and the attributes a login name is matched against, in order of
    # preference for the canonical login shown by the CLI.
    user_filter: str = "(objectClass=inetOrgPerson)"
    login_attributes: tuple[str, ...] = ("uid", "mail")
    # What the user part of DOMAIN\user, and of user@domain for one of dns_domains, matches.
    short_name_attribute: str = "uid"
    netbios_domains: tuple[str, ...] = ()  # DOMAIN of DOMAIN\user
    dns_domains: tuple[str, ...] = ()  # domain of user@domain that maps to the short name
    discover_domains: bool = False  # AD: add the NetBIOS and DNS names of base_dn's domain
    id_attribute: str = "entryUUID"
    id_format: str = "text"  # "text" (entryUUID) or "guid" (16 bytes little-endian: objectGUID)
    upstream_identity_attribute: str = "mail"
    display_name_attribute: str = "cn"
    # Groups: from an attribute of the account ("memberof") or by a search ("search").
    group_membership: str = "search"
    member_of_attribute: str = "memberOf"
    group_base_dn: str = ""  # empty: base_dn
    group_object_filter: str = (
        "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))")
    # {dn} is the account's DN, {name} its short name (both escaped here).
    group_member_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={name}))"
    group_name_attribute: str = "cn"
    nested_groups: bool = False  # AD: policy groups count members of members (in-chain rule)
    # Account state.
    disabled_filter: str = ""  # an account matching this filter is disabled
    account_control_attribute: str = ""  # AD: userAccountControl (ACCOUNTDISABLE)
    computed_account_control_attribute: str = ""  # AD: msDS-User-Account-Control-Computed
    locked_time_attribute: str = "pwdAccountLockedTime"  # OpenLDAP ppolicy
    password_policy_dn: str = ""  # ppolicy default policy, for pwdLockoutDuration
    expiry_attributes: tuple[str, ...] = ("pwdEndTime", "shadowExpire")
    password_changed_attribute: str = "pwdChangedTime"
    # Timing and sizes.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    retry_after: float = DEFAULT_RETRY_AFTER
    pool_size: int = DEFAULT_POOL_SIZE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    page_size: int = DEFAULT_PAGE_SIZE
    cache_ttl: float = DEFAULT_CACHE_TTL
    negative_cache_ttl: float = DEFAULT_NEGATIVE_CACHE_TTL

    def __post_init__(self) -> None:
        for name in ("uris", "login_attributes", "netbios_domains", "dns_domains",
                     "expiry_attributes"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        _validate(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LdapSettings:
        """Settings of a preset ("openldap" or "active_directory") with some fields replaced."""
        try:
            values = PRESETS[name]
        except KeyError:
            raise ValueError(f"preset: unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
        return cls(**{**values, **overrides})

    @classmethod
    def openldap(cls, **overrides: Any) -> LdapSettings:
        return cls.preset("openldap", **overrides)

    @classmethod
    def active_directory(cls, **overrides: Any) -> LdapSettings:
        return cls.preset("active_directory", **overrides)

    def replace(self, **changes: Any) -> LdapSettings:
        return dataclasses.replace(self, **changes)


PRESETS: Mapping[str, Mapping[str, Any]] = {
    "openldap": {
        "user_filter": "(objectClass=inetOrgPerson)",
        "login_attributes": ("uid", "mail"),
        "short_name_attribute": "uid",
        "discover_domains": False,
        "id_attribute": "entryUUID",
        "id_format": "text",
        "upstream_identity_attribute": "mail",
        "display_name_attribute": "cn",
        "group_membership": "search",
        "group_object_filter": LdapSettings.group_object_filter,
        "group_member_filter": LdapSettings.group_member_filter,
        "group_name_attribute": "cn",
        "nested_groups": False,
        "account_control_attribute": "",
        "computed_account_control_attribute": "",
        "locked_time_attribute": "pwdAccountLockedTime",
        "expiry_attributes": ("pwdEndTime", "shadowExpire"),
        "password_changed_attribute": "pwdChangedTime",
    },
    "active_directory": {
        "user_filter": "(&(objectCategory=person)(objectClass=user))",
        "login_attributes": ("userPrincipalName", "sAMAccountName", "mail"),
        "short_name_attribute": "sAMAccountName",
        "discover_domains": True,
        "id_attribute": "objectGUID",
        "id_format": "guid",
        "upstream_identity_attribute": "mail",
        "display_name_attribute": "displayName",
        "group_membership": "memberof",
        "member_of_attribute": "memberOf",
        "group_object_filter": "(objectClass=group)",
        "group_member_filter": "(member={dn})",
        "group_name_attribute": "cn",
        "nested_groups": True,
        "account_control_attribute": "userAccountControl",
        "computed_account_control_attribute": "msDS-User-Account-Control-Computed",
        "locked_time_attribute": "",
        "password_policy_dn": "",
        "expiry_attributes": ("accountExpires",),
        "password_changed_attribute": "pwdLastSet",
    },
}


def _validate(s: LdapSettings) -> None:
    if not s.uris:
        raise ValueError("uris: at least one server URI is needed")
    for uri in s.uris:
        _split_uri(uri)  # raises
    if s.start_tls and any(uri.lower().startswith("ldaps:") for uri in s.uris):
        raise ValueError("start_tls: StartTLS cannot be combined with ldaps:// URIs")
    for name in ("bind_dn", "base_dn", "group_base_dn", "password_policy_dn"):
        value = getattr(s, name)
        if value:
            _check_dn(name, value)
    if s.bind_password and s.bind_password_file:
        raise ValueError("bind_password: give either a password or a password file, not both")
    if not s.login_attributes:
        raise ValueError("login_attributes: at least one attribute is needed")
    for name in ("login_attributes", "expiry_attributes"):
        for attr in getattr(s, name):
            _check_attribute(name, attr)
    for name in ("id_attribute", "upstream_identity_attribute", "member_of_attribute",
                 "group_name_attribute"):
        _check_attribute(name, getattr(s, name))
    for name in ("short_name_attribute", "display_name_attribute", "account_control_attribute",
                 "computed_account_control_attribute", "locked_time_attribute",
                 "password_changed_attribute"):
        if getattr(s, name):
            _check_attribute(name, getattr(s, name))
    for name in ("user_filter", "group_object_filter", "disabled_filter"):
        value = getattr(s, name)
        if value or name != "disabled_filter":
            check_filter(name, value)
    check_filter("group_member_filter",
                 s.group_member_filter.replace("{dn}", "x").replace("{name}", "x"))
    leftover = s.group_member_filter.replace("{dn}", "").replace("{name}", "")
    if "{" in leftover or "}" in leftover:
        raise ValueError("group_member_filter: only the placeholders {dn} and {name} are known")
    if s.group_membership not in GROUP_MEMBERSHIP_MODES:
        raise ValueError(f"group_membership: must be one of {', '.join(GROUP_MEMBERSHIP_MODES)}")
    if s.id_format not in ID_FORMATS:
        raise ValueError(f"id_format: must be one of {', '.join(ID_FORMATS)}")
    for domain in (*s.netbios_domains, *s.dns_domains):
        if not domain or any(c in domain for c in "\\@()*") or not is_valid_login(domain):
            raise ValueError(f"netbios_domains/dns_domains: invalid domain name {domain!r}")
    for name in ("connect_timeout", "timeout", "retry_after", "idle_timeout"):
        value = getattr(s, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: must be a positive number of seconds")
    for name in ("cache_ttl", "negative_cache_ttl"):
        value = getattr(s, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: must be zero (no cache) or a positive number of seconds")
    if not isinstance(s.pool_size, int) or not 1 <= s.pool_size <= 256:
        raise ValueError("pool_size: must be an integer from 1 to 256")
    if not isinstance(s.page_size, int) or not 1 <= s.page_size <= 100_000:
        raise ValueError("page_size: must be an integer from 1 to 100000")


def _split_uri(uri: str) -> tuple[str, str, int, bool]:
    """(scheme, host, port, use_ssl) of an ldap:// or ldaps:// URI; ValueError otherwise."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"uris: invalid URI {uri!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise ValueError(f"uris: {uri!r} must start with ldap:// or ldaps://")
    if not parts.hostname:
        raise ValueError(f"uris: {uri!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"uris: {uri!r} must be only scheme, host and port")
    use_ssl = scheme == "ldaps"
    return scheme, parts.hostname, port or (636 if use_ssl else 389), use_ssl


def _check_attribute(name: str, attr: str) -> None:
    if not isinstance(attr, str) or not _ATTRIBUTE_RE.match(attr):
        raise ValueError(f"{name}: {attr!r} is not an attribute name")


def _check_dn(name: str, dn: str) -> None:
    try:
        parts = parse_dn(dn, strip=True)
    except (LDAPException, ValueError, IndexError) as exc:
        raise ValueError(f"{name}: {dn!r} is not a DN: {exc}") from None
    if not parts:
        raise ValueError(f"{name}: {dn!r} is not a DN")


def check_filter(name: str, text: str) -> None:
    """Raise ValueError (starting with name) unless text is an LDAP filter ldap3 can send."""
    if not text.strip().startswith("("):
        raise ValueError(f"{name}: {text!r} is not an LDAP filter (it must be in parentheses)")
    try:
        parse_filter(text, None, auto_escape=False, auto_encode=False, validator=None,
                     check_names=False)
    except (LDAPException, ValueError, IndexError) as exc:
        raise ValueError(f"{name}: {text!r} is not an LDAP filter: {exc}") from None


# --- filters ---------------------------------------------------------------------------------


def escape_value(value: str) -> str:
    """An assertion value for a filter: RFC 4515 escaping of * ( ) \\ NUL, plus whitespace as
    hex, since ldap3 strips whitespace around assertion values when it parses a filter. What
    the server receives is exactly value's UTF-8 bytes."""
    escaped = escape_filter_chars(value)
    return "".join("".join(f"\\{b:02x}" for b in c.encode("utf-8")) if c.isspace() else c
                   for c in escaped)


def equality(attribute: str, value: str) -> str:
    return f"({attribute}={escape_value(value)})"


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


def parse_login(login: str, login_attributes: Sequence[str], short_name_attribute: str = "",
                netbios_domains: Iterable[str] = (), dns_domains: Iterable[str] = ()
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
            return LoginRefused(login, "DOMAIN\\user names are not enabled (no NetBIOS domain "
                                       "known)", invalid=False)
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


# --- values ----------------------------------------------------------------------------------


def filetime_to_datetime(value: int) -> datetime | None:
    """An AD FILETIME (100 ns since 1601-01-01 UTC) as a UTC datetime; None for 0 and 'never'."""
    if value in FILETIME_NEVER or value < 0:
        return None
    try:
        return _FILETIME_EPOCH + timedelta(microseconds=value // 10)
    except OverflowError:
        return None  # beyond year 9999: never, for our purposes


def parse_generalized_time(text: str) -> datetime | None:
    """RFC 4517 §3.3.13 GeneralizedTime ("20240131120000Z", with optional minutes, seconds,
    fraction and offset) as a UTC datetime; None if malformed."""
    match = _GENERALIZED_TIME_RE.match(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        result = datetime(int(year), int(month), int(day), int(hour), int(minute or 0),
                          int(second or 0), tzinfo=timezone.utc)
    except ValueError:
        return None
    if fraction:
        result += timedelta(microseconds=round(float("0." + fraction) * 1_000_000))
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5] or 0))
        result -= sign * offset
    return result


def days_to_datetime(value: int) -> datetime | None:
    """shadowExpire / shadowLastChange: days since 1970-01-01; -1 means never."""
    if value < 0:
        return None
    try:
        return _EPOCH + timedelta(days=value)
    except OverflowError:
        return None


_FILETIME_ATTRIBUTES = frozenset({"accountexpires", "pwdlastset", "lockouttime",
                                  "lastlogontimestamp", "badpasswordtime"})
_DAYS_ATTRIBUTES = frozenset({"shadowexpire", "shadowlastchange"})


def attribute_time(attribute: str, raw: str) -> datetime | None:
    """A time attribute's value, in the encoding its name implies (FILETIME for AD's, days for
    the shadow ones, GeneralizedTime otherwise); None for never, empty or malformed."""
    name = attribute.lower()
    try:
        if name in _FILETIME_ATTRIBUTES:
            return filetime_to_datetime(int(raw))
        if name in _DAYS_ATTRIBUTES:
            return days_to_datetime(int(raw))
    except ValueError:
        return None
    return parse_generalized_time(raw)


def guid_to_str(raw: bytes) -> str:
    """An objectGUID (16 bytes, the first three fields little-endian) as its usual string."""
    return str(uuid.UUID(bytes_le=raw))


def normalize_dn(dn: str) -> str:
    """A DN folded for comparison: attribute types and values lower-cased, spaces trimmed."""
    try:
        parts = parse_dn(dn, strip=True)
    except (LDAPException, ValueError, IndexError):
        return dn.strip().lower()
    return ",".join(f"{a.strip().lower()}={v.strip().lower()}" for a, v, _ in parts)


def rdn_value(dn: str) -> str:
    """The value of a DN's first RDN, unescaped: a group's name from its DN."""
    try:
        parts = parse_dn(dn, strip=True)
    except (LDAPException, ValueError, IndexError):
        return dn
    if not parts:
        return dn
    value = parts[0][1]
    out = bytearray()
    i = 0
    while i < len(value):  # RFC 4514 §3: \ followed by a special character or two hex digits
        if value[i] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", value[i + 1:i + 3]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            out += value[i + 1].encode("utf-8")
            i += 2
        else:
            out += value[i].encode("utf-8")
            i += 1
    return out.decode("utf-8", "replace")


def looks_like_dn(text: str) -> bool:
    if "=" not in text:
        return False
    try:
        return bool(parse_dn(text, strip=True))
    except (LDAPException, ValueError, IndexError):
        return False


# --- cache -----------------------------------------------------------------------------------


class TtlCache:
    """A small thread-safe cache with a lifetime per entry and a bound on its size."""

    def __init__(self, clock: Callable[[], float], max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> tuple[bool, Any]:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return False, None
            expires, value = item
            if self._clock() >= expires:
                del self._data[key]
                return False, None
            return True, value

    def put(self, key: Any, value: Any, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)


# --- connections -----------------------------------------------------------------------------


class _Trouble(Exception):
    """The directory could not answer (internal; surfaces as DirectoryUnavailable)."""


@dataclass
class _ServerState:
    uri: str
    host: str
    port: int
    use_ssl: bool
    down_until: float = 0.0
    last_error: str = ""


@dataclass
class _Pooled:
    conn: ldap3.Connection
    index: int  # which server (position in uris)
    last_used: float


class ConnectionPool:
    """Bound, re-used ldap3 connections with failover across servers. Thread-safe.

    A connection is used by one thread at a time (acquire/release). New connections go to the
    first server not marked down, then to the ones marked down; a server that fails to connect,
    start TLS or bind is marked down for retry_after. An idle connection to a fallback server
    is dropped once a better server is due to be retried, so the pool returns to the preferred
    server by itself.
    """

    def __init__(self, settings: LdapSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._servers = [_ServerState(uri, *_split_uri(uri)[1:]) for uri in settings.uris]
        self._idle: list[_Pooled] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition()
        self.opened = 0  # connections ever opened (for tests and `directory check`)

    # public

    def acquire(self) -> _Pooled:
        deadline = self._clock() + self.settings.connect_timeout * len(self._servers) + \
            self.settings.timeout
        stale: list[_Pooled] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise _Trouble("directory is closed")
                    now = self._clock()
                    preferred = self._preferred_index(now)
                    while self._idle:
                        pooled = self._idle.pop()
                        if (now - pooled.last_used > self.settings.idle_timeout
                                or pooled.index > preferred or pooled.conn.closed):
                            stale.append(pooled)
                            self._open -= 1
                            continue
                        return pooled
                    if self._open < self.settings.pool_size:
                        self._open += 1
                        break
                    remaining = deadline - now
                    if remaining <= 0:
                        raise _Trouble(f"all {self.settings.pool_size} LDAP connections are busy")
                    # Wall-clock wait: a test's fake clock does not advance here, so this is
                    # bounded by the real deadline too.
                    if not self._cond.wait(min(remaining, self.settings.timeout)):
                        raise _Trouble(f"all {self.settings.pool_size} LDAP connections are busy")
        finally:
            for pooled in stale:
                _unbind(pooled.conn)
        try:
            conn, index = self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        return _Pooled(conn, index, self._clock())

    def release(self, pooled: _Pooled) -> None:
        with self._cond:
            if not self._closed and not pooled.conn.closed:
                pooled.last_used = self._clock()
                self._idle.append(pooled)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        _unbind(pooled.conn)

    def discard(self, pooled: _Pooled) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()
        _unbind(pooled.conn)

    def reset(self) -> None:
        """Close idle connections (busy ones close when released after a failure)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            _unbind(pooled.conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self.reset()

    def uri(self, index: int) -> str:
        return self._servers[index].uri

    def stats(self) -> dict[str, Any]:
        with self._cond:
            now = self._clock()
            return {
                "open": self._open, "idle": len(self._idle), "opened": self.opened,
                "servers": [{"uri": s.uri, "down": s.down_until > now,
                             "last_error": s.last_error} for s in self._servers],
            }

    # internal

    def _preferred_index(self, now: float) -> int:
        for i, server in enumerate(self._servers):
            if server.down_until <= now:
                return i
        return len(self._servers)

    def _tls(self, server: _ServerState) -> ldap3.Tls | None:
        if not (self.settings.start_tls or server.use_ssl):
            return None
        # The certificate must chain to ca_file (or the system store) and name the host
        # (ldap3 checks DNS and IP subject alt names); SNI when the host is a name.
        try:
            ipaddress.ip_address(server.host)
            sni = None
        except ValueError:
            sni = server.host
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.settings.ca_file or None,
                         sni=sni)

    def _password(self) -> str:
        if self.settings.bind_password_file:
            try:
                with open(self.settings.bind_password_file, encoding="utf-8") as fh:
                    return fh.read().rstrip("\r\n")
            except OSError as exc:
                raise _Trouble(f"cannot read bind_password_file: {exc.strerror}") from None
        return self.settings.bind_password

    def _connect(self) -> tuple[ldap3.Connection, int]:
        now = self._clock()
        with self._cond:
            order = sorted(range(len(self._servers)),
                           key=lambda i: (self._servers[i].down_until > now, i))
        errors = []
        for index in order:
            server = self._servers[index]
            try:
                conn = self._open_bound(server)
            except _Trouble as exc:
                errors.append(f"{server.uri}: {exc}")
                with self._cond:
                    if server.down_until <= self._clock():
                        log.warning("LDAP server %s failed, skipping it for %.0f s: %s",
                                    server.uri, self.settings.retry_after, exc)
                    server.down_until = self._clock() + self.settings.retry_after
                    server.last_error = str(exc)
                continue
            with self._cond:
                if server.down_until:
                    log.info("LDAP server %s answers again", server.uri)
                server.down_until = 0.0
                server.last_error = ""
                self.opened += 1
            return conn, index
        raise _Trouble("no LDAP server answered: " + "; ".join(errors))

    def _open_bound(self, server: _ServerState) -> ldap3.Connection:
        s = self.settings
        # A fresh ldap3.Server per connection: ldap3 marks an address unavailable for a while
        # after a failure, and our own failover decides that.
        ldap_server = ldap3.Server(server.host, port=server.port, use_ssl=server.use_ssl,
                                   tls=self._tls(server), get_info=ldap3.NONE,
                                   connect_timeout=s.connect_timeout)
        password = self._password() if s.bind_dn else None
        conn = ldap3.Connection(
            ldap_server, user=s.bind_dn or None, password=password,
            authentication=ldap3.SIMPLE if s.bind_dn else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE, auto_referrals=False,
            read_only=True, raise_exceptions=False, check_names=False,
            return_empty_attributes=False)
        try:
            conn.open(read_server_info=False)
            # ldap3 only takes whole seconds for its receive timeout; set the socket's own.
            conn.socket.settimeout(s.timeout)
            if s.start_tls and not server.use_ssl:
                if not conn.start_tls(read_server_info=False):
                    raise _Trouble(f"StartTLS refused: {_result_text(conn)}")
            if not conn.bind(read_server_info=False):
                raise _Trouble(f"service bind refused: {_result_text(conn)}")
        except _Trouble:
            _unbind(conn)
            raise
        except (LDAPException, OSError) as exc:
            _unbind(conn)
            raise _Trouble(_error_text(exc)) from None
        return conn


def _unbind(conn: ldap3.Connection) -> None:
    try:
        if not conn.closed:
            conn.unbind()
    except Exception:  # closing a broken connection: nothing more to do
        pass


def _result_text(conn: ldap3.Connection) -> str:
    result = conn.result or {}
    text = f"{result.get('description', '?')} ({result.get('result', '?')})"
    message = (result.get("message") or "").strip()
    return f"{text}: {message}" if message else text


def _error_text(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


# --- entries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    dn: str
    attributes: Mapping[str, tuple[bytes, ...]]  # lower-cased names

    def raw(self, name: str) -> tuple[bytes, ...]:
        return self.attributes.get(name.lower(), ())

    def texts(self, name: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8", "replace") for v in self.raw(name))

    def text(self, name: str) -> str:
        values = self.texts(name)
        return values[0] if values else ""


def _entries(conn: ldap3.Connection) -> list[Entry]:
    out = []
    for item in conn.response or ():
        if item.get("type") != "searchResEntry":
            continue  # continuation references (AD's DomainDnsZones…): not followed
        attrs: dict[str, tuple[bytes, ...]] = {}
        for name, values in (item.get("raw_attributes") or {}).items():
            base = name.split(";", 1)[0].lower()  # memberOf;range=0-1499 → memberof
            attrs[base] = attrs.get(base, ()) + tuple(values)
        out.append(Entry(item.get("dn", ""), attrs))
    return out


# --- the directory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One policy fact about an account and why."""

    name: str
    ok: bool
    reason: str


@dataclass(frozen=True)
class _Resolution:
    outcome: str  # "found", "not found", "invalid", "refused", "ambiguous"
    reason: str
    account: Account | None = None
    filter: str = ""
    server: str = ""


class LdapDirectory:
    """The Directory of proxy.directory.account over LDAP (OpenLDAP or Active Directory).

    Policy groups and filters come from the `policy` section: legacy_group / legacy_filter say
    who may sign in with app passwords (no group and no filter: everyone), mfa_group /
    mfa_filter who has a second factor. A group is a name or a DN; when both a group and a
    filter are given, both must hold.
    """

    def __init__(self, settings: LdapSettings, *, legacy_group: str | None = None,
                 legacy_filter: str | None = None, mfa_group: str | None = None,
                 mfa_filter: str | None = None, clock: Callable[[], float] = time.monotonic,
                 utcnow: Callable[[], datetime] | None = None) -> None:
        self.settings = settings
        if not settings.base_dn:
            raise ValueError("base_dn: the LDAP directory needs a base DN")
        for name, value in (("legacy_filter", legacy_filter), ("mfa_filter", mfa_filter)):
            if value:
                check_filter(name, value)
        for name, value in (("legacy_group", legacy_group), ("mfa_group", mfa_group)):
            if value is not None and (not value.strip() or not is_valid_login(value)):
                raise ValueError(f"{name}: {value!r} is not a group name or DN")
        self.legacy_group = legacy_group or None
        self.legacy_filter = legacy_filter or None
        self.mfa_group = mfa_group or None
        self.mfa_filter = mfa_filter or None
        self._clock = clock
        self._utcnow = utcnow or (lambda: datetime.now(timezone.utc))
        self._pool = ConnectionPool(settings, clock)
        self._cache = TtlCache(clock)
        self._meta = TtlCache(clock)  # group DNs by name, lockout durations by policy DN
        self._domains_lock = threading.Lock()
        self._domains: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._attributes = self._account_attributes()

    # --- Directory protocol ------------------------------------------------------------

    def lookup(self, login: str) -> Account | None:
        """The account login names, or None (unknown, ambiguous or invalid name).
        Raises DirectoryUnavailable; never returns an account on error."""
        query = self._parse(login)
        if isinstance(query, LoginRefused):
            if query.invalid:
                log.warning("invalid login name refused before lookup: %r (%s)", login,
                            query.reason)
            else:
                log.info("login %r refused before lookup: %s", login, query.reason)
            return None
        key = ("login", query.cache_key)
        hit, cached = self._cache.get(key)
        if hit:
            return cached
        resolution = self._run(lambda conn, index: self._resolve(conn, index, query))
        self._remember(key, resolution.account)
        if resolution.outcome == "ambiguous":
            log.warning("login %r is ambiguous: %s", login, resolution.reason)
        return resolution.account

    def by_key(self, key: str) -> Account | None:
        """The account with this stable id (entryUUID / objectGUID), or None."""
        if self.settings.id_format == "guid":
            id_term = guid_filter(self.settings.id_attribute, key)
            if id_term is None:
                return None
        else:
            if not is_valid_login(key):
                return None
            id_term = equality(self.settings.id_attribute, key)
        cache_key = ("key", key.lower())
        hit, cached = self._cache.get(cache_key)
        if hit:
            return cached

        def find(conn: ldap3.Connection, index: int) -> Account | None:
            filt = both(self.settings.user_filter, id_term)
            entries = self._search(conn, self.settings.base_dn, ldap3.SUBTREE, filt,
                                   self._attributes, size_limit=2)
            if len(entries) != 1:
                return None
            return self._account(conn, index, entries[0], entries[0].text(
                self._login_attribute_of(entries[0])))

        account = self._run(find)
        self._remember(cache_key, account)
        return account

    def close(self) -> None:
        self._pool.close()
        self._cache.clear()

    # --- operations for the CLI and tests ----------------------------------------------

    def check(self, login: str) -> CheckReport:
        """Everything `apppass directory check LOGIN` shows: how the name was searched, the
        account, and each policy verdict with its reason. Bypasses the cache; never raises
        for directory trouble (the report says so)."""
        started = time.monotonic()
        try:
            query = self._parse(login)
        except DirectoryUnavailable as exc:
            return CheckReport(login, "unavailable", str(exc), elapsed=time.monotonic() - started)
        if isinstance(query, LoginRefused):
            outcome = "invalid" if query.invalid else "refused"
            return CheckReport(login, outcome, query.reason, elapsed=time.monotonic() - started)
        try:
            res = self._run(lambda conn, index: self._resolve(conn, index, query))
        except DirectoryUnavailable as exc:
            return CheckReport(login, "unavailable", str(exc), form=query.form,
                               filter=query.filter(self.settings.user_filter),
                               elapsed=time.monotonic() - started)
        return CheckReport(login, res.outcome, res.reason, res.account, form=query.form,
                           filter=res.filter, server=res.server,
                           verdicts=verdicts(res.account) if res.account else (),
                           elapsed=time.monotonic() - started)

    def reset_connections(self) -> None:
        """Close idle pooled connections; the next lookup connects afresh (in failover order)."""
        self._pool.reset()

    def stats(self) -> dict[str, Any]:
        return {**self._pool.stats(), "cached": len(self._cache)}

    def __enter__(self) -> LdapDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------

    def _parse(self, login: str) -> LoginQuery | LoginRefused:
        s = self.settings
        query = parse_login(login, s.login_attributes, s.short_name_attribute,
                            s.netbios_domains, s.dns_domains)
        if isinstance(query, LoginRefused) and query.invalid:
            return query  # malformed or hostile: refused before any query, discovery too
        if s.discover_domains and ("\\" in login or "@" in login):
            found_netbios, found_dns = self._discovered_domains()
            query = parse_login(login, s.login_attributes, s.short_name_attribute,
                                s.netbios_domains + found_netbios, s.dns_domains + found_dns)
        return query

    def _remember(self, key: Any, account: Account | None) -> None:
        ttl = self.settings.cache_ttl if account is not None else self.settings.negative_cache_ttl
        self._cache.put(key, account, ttl)

    def _run(self, operation: Callable[[ldap3.Connection, int], Any]) -> Any:
        """Run operation on a pooled connection; a connection that breaks is replaced once
        (a pooled connection goes stale when its server restarts)."""
        last: str = ""
        for attempt in (1, 2):
            try:
                pooled = self._pool.acquire()
            except _Trouble as exc:
                raise DirectoryUnavailable(str(exc)) from None
            try:
                result = operation(pooled.conn, pooled.index)
            except _Trouble as exc:  # an unexpected result code: the server answered
                self._pool.discard(pooled)
                raise DirectoryUnavailable(f"{self._pool.uri(pooled.index)}: {exc}") from None
            except (LDAPException, OSError) as exc:
                self._pool.discard(pooled)
                last = f"{self._pool.uri(pooled.index)}: {_error_text(exc)}"
                log.info("LDAP connection to %s broke (attempt %d): %s",
                         self._pool.uri(pooled.index), attempt, _error_text(exc))
                continue
            except BaseException:
                self._pool.discard(pooled)
                raise
            self._pool.release(pooled)
            return result
        raise DirectoryUnavailable(last)

    def _search(self, conn: ldap3.Connection, base: str, scope: str, filt: str,
                attributes: Sequence[str] | str, size_limit: int = 0,
                paged: bool = False) -> list[Entry]:
        time_limit = max(1, math.ceil(self.settings.timeout))
        out: list[Entry] = []
        cookie = None
        while True:
            kwargs: dict[str, Any] = {}
            if paged:
                kwargs = {"paged_size": self.settings.page_size, "paged_cookie": cookie}
            conn.search(base, filt, search_scope=scope, attributes=attributes,
                        size_limit=size_limit, time_limit=time_limit, **kwargs)
            result = conn.result or {}
            code = result.get("result")
            if code == RESULT_NO_SUCH_OBJECT:
                return out
            if code not in (RESULT_SUCCESS, RESULT_SIZE_LIMIT_EXCEEDED):
                raise _Trouble(f"search {filt} under {base!r} failed: {_result_text(conn)}")
            out.extend(_entries(conn))
            if code == RESULT_SIZE_LIMIT_EXCEEDED:
                return out
            if not paged:
                return out
            cookie = (((result.get("controls") or {}).get(PAGED_RESULTS_OID) or {})
                      .get("value") or {}).get("cookie")
            if not cookie:
                return out

    def _matches(self, conn: ldap3.Connection, dn: str, filt: str) -> bool:
        """Whether the entry at dn matches filt (evaluated by the server)."""
        return bool(self._search(conn, dn, ldap3.BASE, filt, [ldap3.NO_ATTRIBUTES]))

    def _account_attributes(self) -> list[str]:
        s = self.settings
        names = [*s.login_attributes, s.short_name_attribute, s.id_attribute,
                 s.upstream_identity_attribute, s.display_name_attribute,
                 s.account_control_attribute, s.computed_account_control_attribute,
                 s.locked_time_attribute, *s.expiry_attributes, s.password_changed_attribute]
        if s.group_membership == "memberof":
            names.append(s.member_of_attribute)
        if s.locked_time_attribute:
            names.append("pwdPolicySubentry")
        seen: dict[str, str] = {}
        for name in names:
            if name and name.lower() not in seen:
                seen[name.lower()] = name
        return list(seen.values())

    def _discovered_domains(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """AD: the NetBIOS and DNS names of the domain holding base_dn, read once from the
        configuration partition's crossRef objects."""
        with self._domains_lock:
            if self._domains is not None:
                return self._domains
        domains = self._run(lambda conn, index: self._read_domains(conn))
        with self._domains_lock:
            self._domains = domains
        return domains

    def _read_domains(self, conn: ldap3.Connection) -> tuple[tuple[str, ...], tuple[str, ...]]:
        root = self._search(conn, "", ldap3.BASE, "(objectClass=*)",
                            ["configurationNamingContext"])
        config_nc = root[0].text("configurationNamingContext") if root else ""
        if not config_nc:
            log.warning("discover_domains: the server has no configurationNamingContext "
                        "(not Active Directory?); DOMAIN\\user needs netbios_domains")
            return (), ()
        refs = self._search(conn, f"CN=Partitions,{config_nc}", ldap3.LEVEL,
                            "(&(objectClass=crossRef)(nETBIOSName=*))",
                            ["nETBIOSName", "dnsRoot", "nCName"])
        base = normalize_dn(self.settings.base_dn)
        best: Entry | None = None
        for ref in refs:
            nc = normalize_dn(ref.text("nCName"))
            if nc and (base == nc or base.endswith("," + nc)):
                if best is None or len(nc) > len(normalize_dn(best.text("nCName"))):
                    best = ref
        if best is None:
            log.warning("discover_domains: no domain partition holds base_dn %r",
                        self.settings.base_dn)
            return (), ()
        netbios = best.text("nETBIOSName")
        dns_names = best.texts("dnsRoot")
        log.info("discovered AD domain %s (%s)", netbios, ", ".join(dns_names))
        return (netbios,), tuple(dns_names)

    def _resolve(self, conn: ldap3.Connection, index: int, query: LoginQuery) -> _Resolution:
        s = self.settings
        filt = query.filter(s.user_filter)
        server = self._pool.uri(index)
        entries = self._search(conn, s.base_dn, ldap3.SUBTREE, filt, self._attributes,
                               size_limit=LOGIN_SEARCH_SIZE_LIMIT)
        if not entries:
            return _Resolution("not found", "no entry matches", None, filt, server)
        chosen: Entry | None = entries[0] if len(entries) == 1 else None
        if chosen is None:
            # As AD does: the name as typed (UPN, mail…) wins over the implicit user@domain.
            explicit = [e for e in entries if _matches_terms(e, query.explicit)]
            implicit = [e for e in entries if _matches_terms(e, query.implicit)]
            if len(explicit) == 1:
                chosen = explicit[0]
            elif not explicit and len(implicit) == 1:
                chosen = implicit[0]
        if chosen is None:
            dns = ", ".join(e.dn for e in entries[:3])
            return _Resolution("ambiguous", f"{len(entries)} entries match: {dns}", None,
                               filt, server)
        canonical = chosen.text(self._login_attribute_of(chosen)) or query.login
        account = self._account(conn, index, chosen, canonical)
        if account is None:
            return _Resolution("not found", f"{chosen.dn} has no {s.id_attribute}", None,
                               filt, server)
        return _Resolution("found", "", account, filt, server)

    def _login_attribute_of(self, entry: Entry) -> str:
        for attr in self.settings.login_attributes:
            if entry.text(attr):
                return attr
        return self.settings.short_name_attribute or self.settings.login_attributes[0]

    def _account(self, conn: ldap3.Connection, index: int, entry: Entry,
                 canonical: str) -> Account | None:
        s = self.settings
        key = self._key(entry)
        if not key:
            log.error("LDAP entry %s has no %s: it cannot own app passwords", entry.dn,
                      s.id_attribute)
            return None
        now = self._utcnow()
        short_name = entry.text(s.short_name_attribute) if s.short_name_attribute else ""
        group_dns, group_names = self._groups(conn, entry, short_name)

        reasons = {}
        enabled, disabled_reason, why = self._state(conn, entry, now)
        reasons["enabled"] = why
        legacy_ok, reasons["legacy"] = self._policy(conn, entry, group_dns, self.legacy_group,
                                                    self.legacy_filter, default=True,
                                                    what="legacy sign-in")
        mfa_ok, reasons["mfa"] = self._policy(conn, entry, group_dns, self.mfa_group,
                                              self.mfa_filter, default=False, what="MFA")
        upstream = entry.text(s.upstream_identity_attribute)
        if not upstream and enabled:
            enabled, disabled_reason = False, "no upstream identity"
            reasons["enabled"] = f"the entry has no {s.upstream_identity_attribute}"
        changed = None
        password_must_change = False
        if s.password_changed_attribute:
            raw = entry.text(s.password_changed_attribute)
            changed = attribute_time(s.password_changed_attribute, raw) if raw else None
            password_must_change = raw == "0" and s.password_changed_attribute.lower() == "pwdlastset"
        names = self._names(conn, entry, short_name)
        return Account(
            key=key, login=canonical, upstream_identity=upstream, names=names,
            display_name=entry.text(s.display_name_attribute) if s.display_name_attribute else "",
            groups=group_names, enabled=enabled, disabled_reason=disabled_reason,
            legacy_allowed=legacy_ok, mfa=mfa_ok, password_changed_at=changed, dn=entry.dn,
            extra={"server": self._pool.uri(index), "group_dns": group_dns,
                   "reasons": reasons, "password_must_change": password_must_change},
        )

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

    def _names(self, conn: ldap3.Connection, entry: Entry, short_name: str) -> tuple[str, ...]:
        s = self.settings
        names: list[str] = []
        for attr in (*s.login_attributes, s.short_name_attribute):
            if attr:
                names.extend(entry.texts(attr))
        if short_name:
            netbios, dns = s.netbios_domains, s.dns_domains
            if s.discover_domains:
                with self._domains_lock:
                    domains = self._domains
                if domains is None:
                    domains = self._read_domains(conn)
                    with self._domains_lock:
                        self._domains = domains
                netbios, dns = netbios + domains[0], dns + domains[1]
            names.extend(f"{d}\\{short_name}" for d in netbios)
            names.extend(f"{short_name}@{d}" for d in dns)
        seen: dict[str, str] = {}
        for name in names:
            seen.setdefault(name.lower(), name)
        return tuple(seen.values())

    def _groups(self, conn: ldap3.Connection, entry: Entry,
                short_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        s = self.settings
        if s.group_membership == "memberof":
            dns = entry.texts(s.member_of_attribute)
            return dns, tuple(rdn_value(dn) for dn in dns)
        filt = both(s.group_object_filter,
                    member_filter(s.group_member_filter, entry.dn, short_name))
        groups = self._search(conn, s.group_base_dn or s.base_dn, ldap3.SUBTREE, filt,
                              [s.group_name_attribute], paged=True)
        return (tuple(g.dn for g in groups),
                tuple(g.text(s.group_name_attribute) or rdn_value(g.dn) for g in groups))

    def _state(self, conn: ldap3.Connection, entry: Entry,
               now: datetime) -> tuple[bool, str, str]:
        """(enabled, disabled_reason, explanation): disabled, then expired, then locked."""
        s = self.settings
        control = _int(entry.text(s.account_control_attribute)) if s.account_control_attribute else None
        if control is not None and control & UF_ACCOUNTDISABLE:
            return False, "disabled", f"{s.account_control_attribute} has ACCOUNTDISABLE"
        locked_at = entry.text(s.locked_time_attribute) if s.locked_time_attribute else ""
        if locked_at == PPOLICY_ADMIN_LOCK:
            return False, "disabled", f"{s.locked_time_attribute} is {PPOLICY_ADMIN_LOCK} " \
                                      "(locked by an administrator)"
        if s.disabled_filter and self._matches(conn, entry.dn, s.disabled_filter):
            return False, "disabled", "matches disabled_filter"
        for attr in s.expiry_attributes:
            raw = entry.text(attr)
            expires = attribute_time(attr, raw) if raw else None
            if expires is not None and expires <= now:
                return False, "expired", f"{attr} {expires.isoformat()} has passed"
        computed = (_int(entry.text(s.computed_account_control_attribute))
                    if s.computed_account_control_attribute else None)
        if computed is not None and computed & UF_LOCKOUT:
            return False, "locked", f"{s.computed_account_control_attribute} has LOCKOUT"
        if locked_at:
            when = parse_generalized_time(locked_at)
            duration = self._lockout_duration(conn, entry)
            if when is None or duration == 0 or now < when + timedelta(seconds=duration):
                until = "until unlocked" if not duration or when is None else \
                    f"until {(when + timedelta(seconds=duration)).isoformat()}"
                return False, "locked", f"{s.locked_time_attribute} {locked_at} ({until})"
        return True, "", "not disabled, expired or locked"

    def _lockout_duration(self, conn: ldap3.Connection, entry: Entry) -> int:
        """pwdLockoutDuration of the entry's password policy, in seconds; 0 = until unlocked."""
        policy = entry.text("pwdPolicySubentry") or self.settings.password_policy_dn
        if not policy:
            return 0
        hit, cached = self._meta.get(("ppolicy", normalize_dn(policy)))
        if hit:
            return cached
        found = self._search(conn, policy, ldap3.BASE, "(objectClass=*)", ["pwdLockoutDuration"])
        duration = _int(found[0].text("pwdLockoutDuration")) if found else None
        duration = duration if duration and duration > 0 else 0
        self._meta.put(("ppolicy", normalize_dn(policy)), duration, self.settings.cache_ttl)
        return duration

    def _policy(self, conn: ldap3.Connection, entry: Entry, group_dns: Sequence[str],
                group: str | None, filt: str | None, *, default: bool,
                what: str) -> tuple[bool, str]:
        if not group and not filt:
            return default, f"no {what} group or filter configured"
        reasons = []
        ok = True
        if group:
            member, why = self._member(conn, entry, group_dns, group)
            ok = ok and member
            reasons.append(why)
        if filt:
            matched = self._matches(conn, entry.dn, filt)
            ok = ok and matched
            reasons.append(f"{'matches' if matched else 'does not match'} {filt}")
        return ok, "; ".join(reasons)

    def _member(self, conn: ldap3.Connection, entry: Entry, group_dns: Sequence[str],
                group: str) -> tuple[bool, str]:
        group_dn = self._group_dn(conn, group)
        if group_dn is None:
            return False, f"group {group!r} not found in the directory"
        if normalize_dn(group_dn) in {normalize_dn(dn) for dn in group_dns}:
            return True, f"member of {group_dn}"
        if self.settings.nested_groups and self._matches(
                conn, entry.dn, in_chain_filter(group_dn, self.settings.member_of_attribute)):
            return True, f"member of {group_dn} (through nested groups)"
        return False, f"not a member of {group_dn}"

    def _group_dn(self, conn: ldap3.Connection, group: str) -> str | None:
        if looks_like_dn(group):
            return group
        key = ("group", group.lower())
        hit, cached = self._meta.get(key)
        if hit:
            return cached
        s = self.settings
        filt = both(s.group_object_filter, equality(s.group_name_attribute, group))
        found = self._search(conn, s.group_base_dn or s.base_dn, ldap3.SUBTREE, filt,
                             [ldap3.NO_ATTRIBUTES], size_limit=2)
        if len(found) != 1:
            log.warning("policy group %r: %s", group,
                        "not found" if not found else "several groups have this name; give a DN")
            dn = None
        else:
            dn = found[0].dn
        self._meta.put(key, dn, s.cache_ttl if dn else s.negative_cache_ttl)
        return dn


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _matches_terms(entry: Entry, terms: Sequence[tuple[str, str]]) -> bool:
    return any(value.lower() in {v.lower() for v in entry.texts(attr)} for attr, value in terms)


# --- reports ---------------------------------------------------------------------------------


def verdicts(account: Account) -> tuple[Verdict, ...]:
    reasons = account.extra.get("reasons", {})
    return (
        Verdict("enabled", account.enabled,
                account.disabled_reason + (": " if account.disabled_reason else "")
                + reasons.get("enabled", "")),
        Verdict("legacy sign-in", account.legacy_allowed, reasons.get("legacy", "")),
        Verdict("mfa", account.mfa, reasons.get("mfa", "")),
    )


@dataclass(frozen=True)
class CheckReport:
    """The result of `LdapDirectory.check`: data for the CLI, and lines to print."""

    login: str
    outcome: str  # found, not found, ambiguous, invalid, refused, unavailable
    reason: str = ""
    account: Account | None = None
    form: str = ""
    filter: str = ""
    server: str = ""
    verdicts: tuple[Verdict, ...] = ()
    elapsed: float = 0.0

    @property
    def found(self) -> bool:
        return self.account is not None

    @property
    def allowed(self) -> bool:
        """Found, enabled and allowed legacy sign-in (MFA is the policy layer's to judge)."""
        return self.account is not None and self.account.enabled and self.account.legacy_allowed

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = [("login", self.login), ("result", self.outcome
                                                                + (f": {self.reason}" if self.reason else ""))]
        if self.form:
            rows.append(("form", self.form))
        if self.filter:
            rows.append(("filter", self.filter))
        if self.server:
            rows.append(("server", self.server))
        a = self.account
        if a is not None:
            rows += [("dn", a.dn), ("key", a.key), ("login name", a.login),
                     ("upstream identity", a.upstream_identity or "(none)"),
                     ("display name", a.display_name), ("names", ", ".join(a.names)),
                     ("groups", ", ".join(a.groups) or "(none)")]
            for v in self.verdicts:
                rows.append((v.name, f"{'yes' if v.ok else 'no'} ({v.reason})" if v.reason
                             else ("yes" if v.ok else "no")))
            changed = a.password_changed_at.isoformat() if a.password_changed_at else "unknown"
            rows.append(("password changed", changed))
        rows.append(("time", f"{self.elapsed * 1000:.0f} ms"))
        width = max(len(k) for k, _ in rows)
        return [f"{k.ljust(width)}  {v}" for k, v in rows]

    def __str__(self) -> str:
        return "\n".join(self.lines())


__all__ = [
    "Account", "CheckReport", "ConnectionPool", "DirectoryUnavailable", "LdapDirectory",
    "LdapSettings", "LoginQuery", "LoginRefused", "PRESETS", "TtlCache", "Verdict",
    "attribute_time", "any_of", "both", "check_filter", "equality", "escape_value",
    "filetime_to_datetime", "guid_filter", "guid_to_str", "in_chain_filter", "member_filter",
    "normalize_dn", "parse_generalized_time", "parse_login", "rdn_value", "verdicts",
]
