"""LdapDirectory: login names resolve to accounts and their policy facts in OpenLDAP or Active
Directory, through ldap3.

ldap3 is synchronous. `LdapDirectory` is therefore synchronous too and thread-safe: the proxy
calls it from a thread pool (never on the reactor thread), the CLI calls it directly. Bound
connections are pooled and re-used (proxy/directory/ldap/pool.py); any trouble (down, slow,
refused service bind, an unexpected result code) raises DirectoryUnavailable, a temporary
failure, and never yields an account.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import ldap3

from proxy.directory.account import Account, DirectoryUnavailable
from proxy.directory.ldap.accounts import AccountReader, Domains, PolicyRules
from proxy.directory.ldap.cache import TtlCache
from proxy.directory.ldap.check import CheckReport, verdicts
from proxy.directory.ldap.filters import (
    LoginQuery,
    LoginRefused,
    both,
    check_filter,
    contains,
    equality,
    guid_filter,
    parse_login,
)
from proxy.directory.ldap.pool import ConnectionPool
from proxy.directory.ldap.search import Entry, search
from proxy.directory.ldap.settings import LdapSettings
from proxy.directory.ldap.values import normalize_dn
from proxy.sasl import is_valid_login

log = logging.getLogger(__name__)

# A login search that returns more entries than this is ambiguous anyway.
LOGIN_SEARCH_SIZE_LIMIT = 10


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

    blocking = True  # ldap3 is synchronous: the proxy calls it from a thread pool

    def __init__(
        self,
        settings: LdapSettings,
        *,
        legacy_group: str | None = None,
        legacy_filter: str | None = None,
        mfa_group: str | None = None,
        mfa_filter: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        utcnow: Callable[[], datetime] | None = None,
    ) -> None:
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
        self._pool = ConnectionPool(settings, clock)
        self._reader = AccountReader(settings, clock, utcnow or (lambda: datetime.now(UTC)))
        self._cache: TtlCache[Account | None] = TtlCache(clock)  # accounts by login and by key
        self._domains_lock = threading.Lock()
        self._domains: Domains | None = None

    # --- Directory protocol ------------------------------------------------------------

    def lookup(self, login: str) -> Account | None:
        """The account login names, or None (unknown, ambiguous or invalid name).
        Raises DirectoryUnavailable; never returns an account on error."""
        query = self._parse(login)
        if isinstance(query, LoginRefused):
            if query.invalid:
                log.warning(
                    "invalid login name refused before lookup: %r (%s)", login, query.reason
                )
            else:
                log.info("login %r refused before lookup: %s", login, query.reason)
            return None
        key = ("login", query.cache_key)
        hit, cached = self._cache.get(key)
        if hit:
            return cached
        resolution = self._pool.run(lambda conn, index: self._resolve(conn, index, query))
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
            entries = search(
                conn,
                self.settings,
                self.settings.base_dn,
                ldap3.SUBTREE,
                filt,
                self._reader.attributes,
                size_limit=2,
            )
            if len(entries) != 1:
                return None
            return self._account(
                conn,
                index,
                entries[0],
                entries[0].text(self._reader.login_attribute_of(entries[0])),
            )

        account = self._pool.run(find)
        self._remember(cache_key, account)
        return account

    def search(self, text: str, limit: int = 20) -> list[Account]:
        """Accounts whose login names or display name contain `text` (admins' search), at most
        `limit`, by login. Not cached; raises DirectoryUnavailable."""
        attributes = [*self.settings.login_attributes]
        if self.settings.display_name_attribute:
            attributes.append(self.settings.display_name_attribute)
        filt = both(self.settings.user_filter, contains(attributes, text))

        def find(conn: ldap3.Connection, index: int) -> list[Account]:
            entries = search(
                conn,
                self.settings,
                self.settings.base_dn,
                ldap3.SUBTREE,
                filt,
                self._reader.attributes,
                size_limit=limit,
            )
            found = []
            for entry in entries[:limit]:
                login = entry.text(self._reader.login_attribute_of(entry))
                account = self._account(conn, index, entry, login) if login else None
                if account is not None:
                    found.append(account)
            return found

        return sorted(self._pool.run(find), key=lambda a: a.login.lower())

    def verify_password(self, account: Account, password: str) -> bool:
        """A simple bind as the account's DN (whatever name the person typed, it resolved to this
        account first) on a fresh connection; False for a wrong, empty or refused password
        (locked, disabled), DirectoryUnavailable when no server answers."""
        return self._pool.bind_as(account.dn, password)

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
            res = self._pool.run(lambda conn, index: self._resolve(conn, index, query))
        except DirectoryUnavailable as exc:
            return CheckReport(
                login,
                "unavailable",
                str(exc),
                form=query.form,
                filter=query.filter(self.settings.user_filter),
                elapsed=time.monotonic() - started,
            )
        return CheckReport(
            login,
            res.outcome,
            res.reason,
            res.account,
            form=query.form,
            filter=res.filter,
            server=res.server,
            verdicts=verdicts(res.account) if res.account else (),
            elapsed=time.monotonic() - started,
        )

    def reset_connections(self) -> None:
        """Close idle pooled connections; the next lookup connects afresh (in failover order)."""
        self._pool.reset()

    def stats(self) -> dict[str, object]:
        return {**self._pool.stats(), "cached": len(self._cache)}

    def __enter__(self) -> LdapDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------

    def _parse(self, login: str) -> LoginQuery | LoginRefused:
        s = self.settings
        query = parse_login(
            login, s.login_attributes, s.short_name_attribute, s.netbios_domains, s.dns_domains
        )
        if isinstance(query, LoginRefused) and query.invalid:
            return query  # malformed or hostile: refused before any query, discovery too
        if s.discover_domains and ("\\" in login or "@" in login):
            found_netbios, found_dns = self._discovered_domains()
            query = parse_login(
                login,
                s.login_attributes,
                s.short_name_attribute,
                s.netbios_domains + found_netbios,
                s.dns_domains + found_dns,
            )
        return query

    def _remember(self, key: Hashable, account: Account | None) -> None:
        ttl = self.settings.cache_ttl if account is not None else self.settings.negative_cache_ttl
        self._cache.put(key, account, ttl)

    def _account(
        self, conn: ldap3.Connection, index: int, entry: Entry, canonical: str
    ) -> Account | None:
        policy = PolicyRules(self.legacy_group, self.legacy_filter, self.mfa_group, self.mfa_filter)
        return self._reader.read(
            conn,
            entry,
            canonical,
            server=self._pool.uri(index),
            policy=policy,
            domains=self._domains_on,
        )

    def _discovered_domains(self) -> Domains:
        """AD: the NetBIOS and DNS names of the domain holding base_dn, read once from the
        configuration partition's crossRef objects."""
        with self._domains_lock:
            if self._domains is not None:
                return self._domains
        domains = self._pool.run(lambda conn, index: self._read_domains(conn))
        with self._domains_lock:
            self._domains = domains
        return domains

    def _domains_on(self, conn: ldap3.Connection) -> Domains:
        """The discovered domains, read on conn (an account's connection) the first time."""
        with self._domains_lock:
            domains = self._domains
        if domains is None:
            domains = self._read_domains(conn)
            with self._domains_lock:
                self._domains = domains
        return domains

    def _read_domains(self, conn: ldap3.Connection) -> Domains:
        root = search(
            conn, self.settings, "", ldap3.BASE, "(objectClass=*)", ["configurationNamingContext"]
        )
        config_nc = root[0].text("configurationNamingContext") if root else ""
        if not config_nc:
            log.warning(
                "discover_domains: the server has no configurationNamingContext "
                "(not Active Directory?); DOMAIN\\user needs netbios_domains"
            )
            return (), ()
        refs = search(
            conn,
            self.settings,
            f"CN=Partitions,{config_nc}",
            ldap3.LEVEL,
            "(&(objectClass=crossRef)(nETBIOSName=*))",
            ["nETBIOSName", "dnsRoot", "nCName"],
        )
        base = normalize_dn(self.settings.base_dn)
        best: Entry | None = None
        for ref in refs:
            nc = normalize_dn(ref.text("nCName"))
            if (
                nc
                and (base == nc or base.endswith("," + nc))
                and (best is None or len(nc) > len(normalize_dn(best.text("nCName"))))
            ):
                best = ref
        if best is None:
            log.warning(
                "discover_domains: no domain partition holds base_dn %r", self.settings.base_dn
            )
            return (), ()
        netbios = best.text("nETBIOSName")
        dns_names = best.texts("dnsRoot")
        log.info("discovered AD domain %s (%s)", netbios, ", ".join(dns_names))
        return (netbios,), tuple(dns_names)

    def _resolve(self, conn: ldap3.Connection, index: int, query: LoginQuery) -> _Resolution:
        s = self.settings
        filt = query.filter(s.user_filter)
        server = self._pool.uri(index)
        entries = search(
            conn,
            s,
            s.base_dn,
            ldap3.SUBTREE,
            filt,
            self._reader.attributes,
            size_limit=LOGIN_SEARCH_SIZE_LIMIT,
        )
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
            return _Resolution(
                "ambiguous", f"{len(entries)} entries match: {dns}", None, filt, server
            )
        canonical = chosen.text(self._reader.login_attribute_of(chosen)) or query.login
        account = self._account(conn, index, chosen, canonical)
        if account is None:
            return _Resolution(
                "not found", f"{chosen.dn} has no {s.id_attribute}", None, filt, server
            )
        return _Resolution("found", "", account, filt, server)


def _matches_terms(entry: Entry, terms: Sequence[tuple[str, str]]) -> bool:
    return any(value.lower() in {v.lower() for v in entry.texts(attr)} for attr, value in terms)
