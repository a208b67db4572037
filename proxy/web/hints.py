"""Setup hints shown with a new code: what to type into a mail app or a printer (server, port,
encryption, user name), generated from the configured mail listeners so they are always true.
Pure."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from proxy.config import Listener, Settings
from proxy.directory.account import Account
from proxy.protocols import MailProtocol, TlsMode

# How mail apps name each TLS mode (Thunderbird, Apple Mail, Outlook say "SSL/TLS" for TLS
# from the first byte), best first.
SECURITY = {TlsMode.IMPLICIT: "SSL/TLS", TlsMode.STARTTLS: "STARTTLS", TlsMode.NONE: "None"}
_ORDER = {TlsMode.IMPLICIT: 0, TlsMode.STARTTLS: 1, TlsMode.NONE: 2}
NAMES = {MailProtocol.IMAP: "IMAP", MailProtocol.POP3: "POP3", MailProtocol.SMTP: "SMTP"}


@dataclass(frozen=True)
class Endpoint:
    protocol: str  # IMAP, POP3, SMTP
    server: str
    port: int
    security: str  # SSL/TLS, STARTTLS, None
    note: str = ""  # e.g. where a connection without encryption may sign in from


@dataclass(frozen=True)
class Hints:
    username: str  # what to type as the user name
    other_names: tuple[str, ...]  # further names that work too
    sender: str  # a mail address of the account, for a printer's "From" ("" if none known)
    incoming: tuple[Endpoint, ...]  # IMAP then POP3
    outgoing: tuple[Endpoint, ...]  # SMTP (submission, with authentication)

    @property
    def printer(self) -> Endpoint | None:
        """Scan to email: a printer sends with SMTP; the best endpoint it is likely to support."""
        return self.outgoing[0] if self.outgoing else None


def mail_server(settings: Settings, listener: Listener) -> str:
    """What devices connect to: web.mail_host, else a loopback listener's own address (the
    demo), else this machine's name."""
    if settings.web.mail_host:
        return settings.web.mail_host
    try:
        if ipaddress.ip_address(listener.host).is_loopback:
            return listener.host
    except ValueError:
        pass
    return settings.hostname


def endpoints(settings: Settings, protocol: MailProtocol) -> tuple[Endpoint, ...]:
    listeners = sorted(
        (x for x in settings.listeners if x.protocol == protocol),
        key=lambda x: (_ORDER[x.tls], x.port),
    )
    out = []
    for listener in listeners:
        note = ""
        if listener.tls is TlsMode.NONE:
            nets = ", ".join(str(n) for n in listener.plaintext_auth_from)
            note = f"only from {nets}" if nets else "no password may be sent over it"
        server = mail_server(settings, listener)
        out.append(Endpoint(NAMES[protocol], server, listener.port, SECURITY[listener.tls], note))
    return tuple(out)


def setup_hints(settings: Settings, account: Account, scopes: tuple[str, ...]) -> Hints:
    """Hints for a code of `account` valid for `scopes`."""
    incoming: list[Endpoint] = []
    for protocol in (MailProtocol.IMAP, MailProtocol.POP3):
        if protocol.value in scopes:
            incoming.extend(endpoints(settings, protocol))
    outgoing = endpoints(settings, MailProtocol.SMTP) if "smtp" in scopes else ()
    others = tuple(n for n in account.names if n.lower() != account.login.lower())
    sender = next((n for n in (account.login, *account.names) if "@" in n), "")
    return Hints(account.login, others, sender, tuple(incoming), tuple(outgoing))
