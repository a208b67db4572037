"""A code's sending policy (SMTP): whom it may send as, to which domains, how many messages a
day. Stored on the code (codes/store.py), resolved at login against the account (its own
addresses) into the `SendingRules` the SMTP command watch applies (smtp/watch.py). Pure.

A code without any of the three has no policy: its sessions are relayed as before. A code with
any of them has a sender rule too: the addresses given (`--mail-from`), or else the account's own
addresses (`own`), so that a printer's code limited to ten messages a day cannot also send as
anyone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

OWN = "own"  # the account's own addresses: its names that are mail addresses, its identity
ANY = "*"  # any sender, the null sender included

# Senders and recipient domains one code may list: a printer needs one or two of each; the
# networks a code may be limited to are capped the same (proxy/manage.py MAX_NETWORKS).
MAX_SENDERS = 16
MAX_DOMAINS = 16

# Messages a day a code may be limited to: Gmail caps a mailbox at 2,000 a day, Microsoft 365 at
# 10,000; a code's cap is meant to be far lower.
MAX_MESSAGES_PER_DAY = 100_000

# RFC 5321 §4.5.3.1: a domain is at most 255 octets, a label 63; a local part 64.
_MAX_DOMAIN = 255
_MAX_LABEL = 63
_MAX_LOCAL = 64

# What a dot-atom local part may hold (RFC 5322 §3.2.3 atext), and UTF-8 beyond ASCII (RFC 6531).
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)

# Local-part characters that ask a mail server to route on (the percent hack, bang paths): a
# recipient carrying one could reach another domain through an allowed one, so a recipient
# domain rule refuses them.
_ROUTING = frozenset("%!")


def domain_problem(value: str) -> str | None:
    """Why `value` is not a domain name like example.org (None if it is one)."""
    if not value or len(value) > _MAX_DOMAIN or value.startswith(".") or value.endswith("."):
        return "is not a domain like example.org"
    for label in value.split("."):
        if not label or len(label) > _MAX_LABEL or label.startswith("-") or label.endswith("-"):
            return "is not a domain like example.org"
        if not all(c.isalnum() or c == "-" for c in label):
            return "is not a domain like example.org"
    return None


def address_problem(value: str) -> str | None:
    """Why `value` is not a plain mail address like scanner@example.org (None if it is one)."""
    local, at, domain = value.rpartition("@")
    if not at or not local or len(local) > _MAX_LOCAL or domain_problem(domain):
        return "is not a mail address like scanner@example.org"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "is not a mail address like scanner@example.org"
    if not all(c in _ATEXT or c == "." or ord(c) > 127 for c in local):
        return "is not a mail address like scanner@example.org"
    return None


def sender_problem(value: str) -> str | None:
    """Why `value` is not a sender rule: an address, *@domain, own or * (None if it is one)."""
    if value in (OWN, ANY):
        return None
    if value.startswith("*@"):
        if domain_problem(value[2:]):
            return "is not *@ followed by a domain like example.org"
        return None
    if address_problem(value):
        return "is not a mail address like scanner@example.org, *@example.org, own or *"
    return None


@dataclass(frozen=True)
class SendingPolicy:
    """What is stored on a code: sender rules (addresses, *@domain, own, *), recipient domains
    (empty: any), and the daily message cap (None: none). Values are lower-case."""

    mail_from: tuple[str, ...] = ()
    rcpt_domains: tuple[str, ...] = ()
    max_per_day: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.mail_from or self.rcpt_domains or self.max_per_day)

    def describe(self) -> str:
        """One line for people: "as own addresses; to example.org; 10 messages a day"."""
        if not self.active:
            return "any sender, any recipient, no daily cap"
        senders = [
            "own addresses" if s == OWN else "any address" if s == ANY else s
            for s in self.mail_from
        ]
        parts = [f"as {', '.join(senders)}"]
        parts.append(f"to {', '.join(self.rcpt_domains)}" if self.rcpt_domains else "to anyone")
        if self.max_per_day:
            parts.append(f"{self.max_per_day} message{'s' if self.max_per_day != 1 else ''} a day")
        return "; ".join(parts)


def policy(
    mail_from: Iterable[str], rcpt_domains: Iterable[str], max_per_day: int | None
) -> SendingPolicy:
    """A policy from checked values, lower-cased, each once; with any rule and no sender rule,
    the senders are the account's own addresses."""
    senders = tuple(dict.fromkeys(s.strip().lower() for s in mail_from))
    domains = tuple(dict.fromkeys(d.strip().lower() for d in rcpt_domains))
    if not senders and (domains or max_per_day):
        senders = (OWN,)
    return SendingPolicy(senders, domains, max_per_day)


def stored(mail_from: str, rcpt_domains: str, max_per_day: int | None) -> SendingPolicy:
    """The policy from its columns (space-separated lists, as both stores keep them)."""
    return SendingPolicy(tuple(mail_from.split()), tuple(rcpt_domains.split()), max_per_day)


def columns(p: SendingPolicy) -> dict[str, Any]:
    return {
        "mail_from": " ".join(p.mail_from),
        "rcpt_domains": " ".join(p.rcpt_domains),
        "max_messages_per_day": p.max_per_day,
    }


def own_addresses(names: Iterable[str], identity: str) -> tuple[str, ...]:
    """An account's own mail addresses: its names that are addresses (an AD proxyAddresses value
    "smtp:x@y" as x@y) and its upstream identity if it is one, lower-cased, each once."""
    found = []
    for name in (identity, *names):
        if name[:5].lower() == "smtp:":
            name = name[5:]
        if address_problem(name) is None:
            found.append(name.lower())
    return tuple(dict.fromkeys(found))


@dataclass(frozen=True)
class SendingRules:
    """A policy as one login applies it: `own` replaced by the account's addresses."""

    any_sender: bool
    senders: frozenset[str]  # lower-cased addresses
    sender_domains: frozenset[str]  # from *@domain
    rcpt_domains: frozenset[str]  # empty: any recipient
    max_per_day: int | None

    def sender_allowed(self, local: str, domain: str, *, quoted: bool, routed: bool) -> bool:
        """May the code send with this envelope sender ("" and "" for the null sender)?"""
        if self.any_sender:
            return True
        if routed or not domain:
            return False
        if domain.lower() in self.sender_domains:
            return True
        return not quoted and f"{local}@{domain}".lower() in self.senders

    def recipient_allowed(self, local: str, domain: str, *, quoted: bool, routed: bool) -> bool:
        """May the code send to this recipient? Only a plain address in a listed domain."""
        if not self.rcpt_domains:
            return True
        if routed or quoted or any(c in _ROUTING for c in local):
            return False
        return domain.lower() in self.rcpt_domains


def resolve(p: SendingPolicy, names: Iterable[str], identity: str) -> SendingRules | None:
    """The rules for a login of the account with these names and upstream identity (None for a
    code without a policy)."""
    if not p.active:
        return None
    senders: set[str] = set()
    domains: set[str] = set()
    for rule in p.mail_from:
        if rule == OWN:
            senders.update(own_addresses(names, identity))
        elif rule.startswith("*@"):
            domains.add(rule[2:])
        elif rule != ANY:
            senders.add(rule)
    return SendingRules(
        ANY in p.mail_from,
        frozenset(senders),
        frozenset(domains),
        frozenset(p.rcpt_domains),
        p.max_per_day,
    )
