"""LDAP settings: the presets (openldap, active_directory), every default and every rule in one
place, checked once, and read from `directory: {ldap: {...}}` in apppass.yaml.

`LdapSettings` checks itself when it is made: a value that breaks a rule raises
LdapSettingsError, which names each field and its rule. `read_settings` turns the YAML node into
LdapSettings and reports the same problems in the config's style, with the key path and the value
as the user typed it (`apppass.yaml: directory.ldap.uris: must be a list of ldap:// or ldaps://
URIs (got "http://ldap")`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn

from proxy.configschema import Invalid, Node, choice, duration, existing_file, show
from proxy.directory.ldap.filters import filter_problem
from proxy.sasl import is_valid_login

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
MAX_POOL_SIZE = 256

# A pooled connection idle this long is closed rather than re-used: AD drops idle LDAP
# connections after MaxConnIdleTime (900 s), OpenLDAP after `idletimeout` (off by default).
DEFAULT_IDLE_TIMEOUT = 300.0

# Page size of group searches: AD's MaxPageSize is 1000; OpenLDAP's default sizelimit is 500.
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 100_000

# Cache lifetimes (positive and negative). nscd keeps users 600 s / 20 s and sssd 5400 s; the
# proxy decides access, so disabling someone in the directory must bite within seconds.
DEFAULT_CACHE_TTL = 30.0
DEFAULT_NEGATIVE_CACHE_TTL = 5.0

IdFormat = Literal["text", "guid"]
GroupMembership = Literal["memberof", "search"]
ID_FORMATS: tuple[IdFormat, ...] = ("text", "guid")
GROUP_MEMBERSHIP_MODES: tuple[GroupMembership, ...] = ("memberof", "search")

# An attribute description (RFC 4512 §2.5: a name or an OID), without options.
_ATTRIBUTE_RE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|\d+(?:\.\d+)+")

# Characters a NetBIOS or DNS domain name never has, and that would change DOMAIN\user or
# user@domain (or an LDAP filter) if it had them.
_DOMAIN_REFUSED = frozenset("\\@()*")


# --- the settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LdapSettings:
    """How to reach the directory and read accounts from it. The defaults are the `openldap`
    preset; `active_directory()` is the other one. A preset fills everything but the URIs, the
    service bind and the base DN.

    Made with values that break a rule, it raises LdapSettingsError naming each field and rule.
    An empty string in an optional field is None (in YAML, "" switches off a preset's attribute).
    """

    # Servers, tried in order (failover). ldap:// (optionally with start_tls) or ldaps://.
    uris: tuple[str, ...] = ("ldap://127.0.0.1:389",)
    start_tls: bool = False
    ca_file: str | None = None  # PEM CA bundle for ldaps/StartTLS; None: the system's trust store
    # Service bind; no bind_dn binds anonymously. The password comes as a string or as a file
    # read at each new connection (so a rotated password is picked up). Never logged.
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)
    bind_password_file: str | None = None
    base_dn: str = ""  # required by LdapDirectory (and by the config)
    # Accounts: which entries, and the attributes a login name is matched against, in order of
    # preference for the canonical login shown by the CLI.
    user_filter: str = "(objectClass=inetOrgPerson)"
    login_attributes: tuple[str, ...] = ("uid", "mail")
    # What the user part of DOMAIN\user, and of user@domain for one of dns_domains, matches.
    short_name_attribute: str | None = "uid"
    netbios_domains: tuple[str, ...] = ()  # DOMAIN of DOMAIN\user
    dns_domains: tuple[str, ...] = ()  # domain of user@domain that maps to the short name
    discover_domains: bool = False  # AD: add the NetBIOS and DNS names of base_dn's domain
    id_attribute: str = "entryUUID"
    id_format: IdFormat = (
        "text"  # "text" (entryUUID) or "guid" (16 bytes little-endian: objectGUID)
    )
    upstream_identity_attribute: str = "mail"
    display_name_attribute: str | None = "cn"
    # Groups: from an attribute of the account ("memberof") or by a search ("search").
    group_membership: GroupMembership = "search"
    member_of_attribute: str = "memberOf"
    group_base_dn: str | None = None  # None: base_dn
    group_object_filter: str = (
        "(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames)(objectClass=posixGroup))"
    )
    # {dn} is the account's DN, {name} its short name (both escaped when substituted).
    group_member_filter: str = "(|(member={dn})(uniqueMember={dn})(memberUid={name}))"
    group_name_attribute: str = "cn"
    nested_groups: bool = False  # AD: policy groups count members of members (in-chain rule)
    # Account state.
    disabled_filter: str | None = None  # an account matching this filter is disabled
    account_control_attribute: str | None = None  # AD: userAccountControl (ACCOUNTDISABLE)
    computed_account_control_attribute: str | None = None  # AD: msDS-User-Account-Control-Computed
    locked_time_attribute: str | None = "pwdAccountLockedTime"  # OpenLDAP ppolicy
    password_policy_dn: str | None = None  # ppolicy default policy, for pwdLockoutDuration
    # Times after which an account is expired, and before which it is not yet valid. A value
    # that cannot be read (in the encoding the attribute's name implies) refuses the account.
    expiry_attributes: tuple[str, ...] = ("pwdEndTime", "shadowExpire")
    valid_from_attributes: tuple[str, ...] = ("pwdStartTime",)
    # The last password change (policy.revoke_on_password_change: older codes stop working).
    # AD's pwdLastSet 0, "must change password at next logon", counts as a change now.
    password_changed_attribute: str | None = "pwdChangedTime"
    # Timing (seconds) and sizes.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    retry_after: float = DEFAULT_RETRY_AFTER
    pool_size: int = DEFAULT_POOL_SIZE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    page_size: int = DEFAULT_PAGE_SIZE
    cache_ttl: float = DEFAULT_CACHE_TTL
    negative_cache_ttl: float = DEFAULT_NEGATIVE_CACHE_TTL

    def __post_init__(self) -> None:
        for name in _LISTS:
            value = getattr(self, name)
            if isinstance(value, (str, list)):
                object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        for name in _OPTIONAL:
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        problems = check(self)
        if problems:
            raise LdapSettingsError(problems, self)

    # Overrides are Any: a list field also takes a list or a single string, and __post_init__
    # normalises and checks every value whatever its type.
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LdapSettings:
        """Settings of a preset ("openldap" or "active_directory") with some fields replaced."""
        base = PRESETS.get(name)
        if base is None:
            raise LdapSettingsError(
                [Problem("preset", f"must be one of {', '.join(PRESETS)}")], {"preset": name}
            )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def openldap(cls, **overrides: Any) -> LdapSettings:
        return cls.preset("openldap", **overrides)

    @classmethod
    def active_directory(cls, **overrides: Any) -> LdapSettings:
        return cls.preset("active_directory", **overrides)

    def replace(self, **changes: Any) -> LdapSettings:
        return dataclasses.replace(self, **changes)


# Fields holding several values (a single string is a list of one).
_LISTS = (
    "uris",
    "login_attributes",
    "netbios_domains",
    "dns_domains",
    "expiry_attributes",
    "valid_from_attributes",
)
# Fields that may be unset (None).
_OPTIONAL = (
    "ca_file",
    "bind_dn",
    "bind_password",
    "bind_password_file",
    "short_name_attribute",
    "display_name_attribute",
    "group_base_dn",
    "disabled_filter",
    "account_control_attribute",
    "computed_account_control_attribute",
    "locked_time_attribute",
    "password_policy_dn",
    "password_changed_attribute",
)
# Fields whose value an error never shows.
_SECRET = frozenset({"bind_password"})


# --- the rules -------------------------------------------------------------------------------


class Problem(NamedTuple):
    """A field whose value breaks a rule; `rule` says the rule ("must be true or false")."""

    field: str
    rule: str
    shows_value: bool = True  # an error may show the value ("(got …)")


class LdapSettingsError(ValueError):
    """LdapSettings made with values that break rules. The message lists each problem as
    `field: rule (got value)`; `problems` keeps them apart for the config's error style."""

    def __init__(self, problems: list[Problem], values: object) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(_say(p, values) for p in self.problems))


def _say(problem: Problem, values: object) -> str:
    """`field: rule (got value)`; never the value of a secret."""
    if not problem.shows_value or problem.field in _SECRET:
        return f"{problem.field}: {problem.rule}"
    if isinstance(values, Mapping):
        value = values.get(problem.field)
    else:
        value = getattr(values, problem.field, None)
    shown = show(list(value) if isinstance(value, tuple) else value)
    return f"{problem.field}: {problem.rule} (got {shown})"


Rule = Callable[[object], str | None]  # a field's value -> None, or the rule it breaks

_URIS = "must be a list of ldap:// or ldaps:// URIs"
_ATTRIBUTE = "must be an attribute name like uid or 0.9.2342.19200300.100.1.1"
_DN = "must be a DN like dc=example,dc=org"


def split_uri(uri: str) -> tuple[str, int, bool]:
    """(host, port, use_ssl) of an ldap:// or ldaps:// URI; Invalid says what is wrong."""
    if not isinstance(uri, str):
        raise Invalid("is not one")
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        raise Invalid(f"is not a valid URI ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise Invalid("is not one")
    if not parts.hostname:
        raise Invalid("has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise Invalid("has more than scheme, host and port")
    use_ssl = scheme == "ldaps"
    return parts.hostname, port or (636 if use_ssl else 389), use_ssl


def _uris(value: object) -> str | None:
    if not isinstance(value, tuple) or not value:
        return _URIS
    for uri in value:
        try:
            split_uri(uri)
        except Invalid as exc:
            return f"{_URIS}; {show(uri)} {exc}"
    return None


def _boolean(value: object) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def _integer(minimum: int, maximum: int) -> Rule:
    def rule(value: object) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum:
            return None
        return f"must be an integer >= {minimum} and <= {maximum}"

    return rule


def _seconds(*, zero: bool) -> Rule:
    """A duration in seconds: more than 0, or (zero=True) 0 too."""

    def rule(value: object) -> str | None:
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= 0 if zero else value > 0)
        ):
            return None
        return "must be 0 (no cache) or more seconds" if zero else "must be more than 0 seconds"

    return rule


def _one_of(options: tuple[str, ...]) -> Rule:
    return lambda value: None if value in options else f"must be one of {', '.join(options)}"


def _text(value: object) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _attribute(value: object) -> str | None:
    return None if isinstance(value, str) and _ATTRIBUTE_RE.fullmatch(value) else _ATTRIBUTE


def _attributes(*, at_least_one: bool) -> Rule:
    def rule(value: object) -> str | None:
        if not isinstance(value, tuple) or (at_least_one and not value):
            return "must be a list of attribute names like uid" + (
                " (at least one)" if at_least_one else ""
            )
        for attr in value:
            if _attribute(attr):
                return f"must be a list of attribute names like uid; {show(attr)} is not one"
        return None

    return rule


def _dn(value: object) -> str | None:
    if not isinstance(value, str):
        return _DN
    try:
        parts = parse_dn(value, strip=True)
    except (LDAPException, ValueError, IndexError) as exc:
        return f"{_DN} ({exc})"
    return None if parts else _DN


def _domains(value: object) -> str | None:
    rule = "must be a list of domain names like EXAMPLE or example.org"
    if not isinstance(value, tuple):
        return rule
    for domain in value:
        if (
            not isinstance(domain, str)
            or not domain
            or any(c in _DOMAIN_REFUSED for c in domain)
            or not is_valid_login(domain)
        ):
            return f"{rule}; {show(domain)} is not one"
    return None


def _member_filter(value: object) -> str | None:
    if not isinstance(value, str):
        return filter_problem(value)
    problem = filter_problem(value.replace("{dn}", "x").replace("{name}", "x"))
    if problem:
        return problem
    leftover = value.replace("{dn}", "").replace("{name}", "")
    if "{" in leftover or "}" in leftover:
        return "must be an LDAP filter whose only placeholders are {dn} and {name}"
    return None


def _optional(rule: Rule) -> Rule:
    return lambda value: None if value is None else rule(value)


# field -> its rule. Every field of LdapSettings has one.
RULES: Mapping[str, Rule] = {
    "uris": _uris,
    "start_tls": _boolean,
    "ca_file": _optional(_text),
    "bind_dn": _optional(_dn),
    "bind_password": _optional(_text),
    "bind_password_file": _optional(_text),
    "base_dn": lambda v: None if v == "" else _dn(v),
    "user_filter": filter_problem,
    "login_attributes": _attributes(at_least_one=True),
    "short_name_attribute": _optional(_attribute),
    "netbios_domains": _domains,
    "dns_domains": _domains,
    "discover_domains": _boolean,
    "id_attribute": _attribute,
    "id_format": _one_of(ID_FORMATS),
    "upstream_identity_attribute": _attribute,
    "display_name_attribute": _optional(_attribute),
    "group_membership": _one_of(GROUP_MEMBERSHIP_MODES),
    "member_of_attribute": _attribute,
    "group_base_dn": _optional(_dn),
    "group_object_filter": filter_problem,
    "group_member_filter": _member_filter,
    "group_name_attribute": _attribute,
    "nested_groups": _boolean,
    "disabled_filter": _optional(filter_problem),
    "account_control_attribute": _optional(_attribute),
    "computed_account_control_attribute": _optional(_attribute),
    "locked_time_attribute": _optional(_attribute),
    "password_policy_dn": _optional(_dn),
    "expiry_attributes": _attributes(at_least_one=False),
    "valid_from_attributes": _attributes(at_least_one=False),
    "password_changed_attribute": _optional(_attribute),
    "connect_timeout": _seconds(zero=False),
    "timeout": _seconds(zero=False),
    "retry_after": _seconds(zero=False),
    "pool_size": _integer(1, MAX_POOL_SIZE),
    "idle_timeout": _seconds(zero=False),
    "page_size": _integer(1, MAX_PAGE_SIZE),
    "cache_ttl": _seconds(zero=True),
    "negative_cache_ttl": _seconds(zero=True),
}


def check(s: LdapSettings) -> list[Problem]:
    """Every problem of s: each field against its rule, then the rules between fields."""
    problems = []
    for f in dataclasses.fields(s):
        broken = RULES[f.name](getattr(s, f.name))
        if broken:
            problems.append(Problem(f.name, broken))
    if (
        s.start_tls is True
        and isinstance(s.uris, tuple)
        and any(isinstance(uri, str) and uri.lower().startswith("ldaps:") for uri in s.uris)
    ):
        problems.append(
            Problem("start_tls", "must be false with ldaps:// URIs (they are TLS from the start)")
        )
    if s.bind_password and s.bind_password_file:
        problems.append(
            Problem(
                "bind_password",
                "give either bind_password or bind_password_file, not both",
                shows_value=False,
            )
        )
    return problems


# --- apppass.yaml ----------------------------------------------------------------------------


def _seconds_of(node: Node, key: str, value: object) -> float:
    parsed = duration()(node, key, value)
    assert parsed is not None  # never is not allowed here
    return parsed.total_seconds()


def _file(node: Node, key: str, value: object) -> str:
    return str(existing_file(node, key, value))


def _as_list(node: Node, key: str, value: object) -> tuple[object, ...]:
    return tuple(value) if isinstance(value, list) else (value,)


def _as_is(node: Node, key: str, value: object) -> object:
    return value


# How YAML spells a value where it differs from Python: durations ("30s"), files (relative to
# the config's folder, and they must exist), one string for a list of one.
_YAML_FORMS = {
    **dict.fromkeys(
        (
            "connect_timeout",
            "timeout",
            "retry_after",
            "idle_timeout",
            "cache_ttl",
            "negative_cache_ttl",
        ),
        _seconds_of,
    ),
    **dict.fromkeys(_LISTS, _as_list),
    "ca_file": _file,
    "bind_password_file": _file,
}
# Keys of directory.ldap: every field but bind_password (a secret comes only from a file).
_YAML_KEYS = tuple(f.name for f in dataclasses.fields(LdapSettings) if f.name not in _SECRET)


def read_settings(node: Node) -> LdapSettings | None:
    """The `directory: {ldap: {...}}` mapping as LdapSettings, or None if it has mistakes; each
    mistake is reported on node.ctx with its key path, its rule and the value as typed."""
    before = len(node.ctx.problems)
    preset = node.get("preset", choice(*PRESETS), "openldap")
    for required in ("uris", "base_dn"):
        if not node.has(required):
            node.ctx.error(node.key_path(required), "is required")
    values: dict[str, object] = {}
    for key in _YAML_KEYS:
        value = node.get(key, _YAML_FORMS.get(key, _as_is), None)
        if value is not None:
            values[key] = value
    if values.get("bind_dn") and not node.has("bind_password_file"):
        node.ctx.error(node.key_path("bind_password_file"), "is required when bind_dn is set")
    node.finish()
    try:
        settings = LdapSettings.preset(preset, **values)
    except LdapSettingsError as exc:
        for problem in exc.problems:
            typed = node.data.get(problem.field)
            got = f" (got {show(typed)})" if problem.shows_value and typed is not None else ""
            node.ctx.error(node.key_path(problem.field), problem.rule + got)
        return None
    return settings if len(node.ctx.problems) == before else None


# --- the presets -----------------------------------------------------------------------------

PRESETS: Mapping[str, LdapSettings] = {
    # OpenLDAP: uid or mail logins, entryUUID, groups by search, ppolicy lockout, pwdChangedTime.
    "openldap": LdapSettings(),
    # Active Directory (and Samba AD): userPrincipalName, sAMAccountName, DOMAIN\user and mail
    # logins, objectGUID, userAccountControl / accountExpires / lockout, nested groups, pwdLastSet.
    "active_directory": LdapSettings(
        user_filter="(&(objectCategory=person)(objectClass=user))",
        login_attributes=("userPrincipalName", "sAMAccountName", "mail"),
        short_name_attribute="sAMAccountName",
        discover_domains=True,
        id_attribute="objectGUID",
        id_format="guid",
        display_name_attribute="displayName",
        group_membership="memberof",
        group_object_filter="(objectClass=group)",
        group_member_filter="(member={dn})",
        nested_groups=True,
        account_control_attribute="userAccountControl",
        computed_account_control_attribute="msDS-User-Account-Control-Computed",
        locked_time_attribute=None,
        expiry_attributes=("accountExpires",),
        valid_from_attributes=(),
        password_changed_attribute="pwdLastSet",
    ),
}
