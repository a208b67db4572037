"""One LDAP search on a bound connection: result codes, paging, and the entries it returns."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import ldap3

from proxy.directory.ldap.pool import Trouble, result_text
from proxy.directory.ldap.settings import LdapSettings

# LDAP result codes (RFC 4511 §4.1.9) that are answers rather than trouble.
RESULT_SUCCESS = 0
RESULT_SIZE_LIMIT_EXCEEDED = 4
RESULT_NO_SUCH_OBJECT = 32

# The simple paged results control (RFC 2696).
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"


@dataclass(frozen=True)
class Entry:
    """A search result entry: its DN and raw attribute values, by lower-cased name."""

    dn: str
    attributes: Mapping[str, tuple[bytes, ...]]  # lower-cased names

    def raw(self, name: str) -> tuple[bytes, ...]:
        return self.attributes.get(name.lower(), ())

    def texts(self, name: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8", "replace") for v in self.raw(name))

    def text(self, name: str) -> str:
        values = self.texts(name)
        return values[0] if values else ""


def search(
    conn: ldap3.Connection,
    settings: LdapSettings,
    base: str,
    scope: str,
    filt: str,
    attributes: Sequence[str] | str,
    *,
    size_limit: int = 0,
    paged: bool = False,
) -> list[Entry]:
    """The entries under base matching filt, page by page (settings.page_size) when paged. No
    such base is no entries; a size limit reached keeps the entries that came. Any other
    result code raises Trouble."""
    time_limit = max(1, math.ceil(settings.timeout))  # the server counts whole seconds
    out: list[Entry] = []
    cookie = None
    while True:
        paging: dict[str, object] = {}
        if paged:
            paging = {"paged_size": settings.page_size, "paged_cookie": cookie}
        conn.search(
            base,
            filt,
            search_scope=scope,
            attributes=attributes,
            size_limit=size_limit,
            time_limit=time_limit,
            **paging,
        )
        result = conn.result or {}
        code = result.get("result")
        if code == RESULT_NO_SUCH_OBJECT:
            return out
        if code not in (RESULT_SUCCESS, RESULT_SIZE_LIMIT_EXCEEDED):
            raise Trouble(f"search {filt} under {base!r} failed: {result_text(conn)}")
        out.extend(_entries(conn))
        if code == RESULT_SIZE_LIMIT_EXCEEDED:
            return out
        if not paged:
            return out
        cookie = (
            ((result.get("controls") or {}).get(PAGED_RESULTS_OID) or {}).get("value") or {}
        ).get("cookie")
        if not cookie:
            return out


def matches(conn: ldap3.Connection, settings: LdapSettings, dn: str, filt: str) -> bool:
    """Whether the entry at dn matches filt (evaluated by the server)."""
    return bool(search(conn, settings, dn, ldap3.BASE, filt, [ldap3.NO_ATTRIBUTES]))


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
