"""A tiny local IMAP/POP3/SMTP upstream for `apppass demo` only: for trying apppass out.

It is not a mail server. Mail lives in memory and is gone when the process stops, there is no
TLS, and it listens on loopback only. It accepts exactly what the proxy sends upstream:

- IMAP (twisted.mail.imap4): `ID`, `AUTHENTICATE PLAIN` with or without SASL-IR, where the
  PLAIN message is `authzid NUL master NUL master-password` and authzid names the user; `LOGIN`
  for users that have a password of their own. The tagged OK carries `[CAPABILITY …]`.
- POP3 (twisted.mail.pop3): `AUTH PLAIN` as above, `USER`/`PASS` for users with a password.
- SMTP (twisted.mail.smtp): `XCLIENT LOGIN=… ADDR=…` from loopback, as Postfix does it, and
  `AUTH PLAIN` as above. Only authenticated sessions may send, and only to the sandbox's own
  users: a message to one of them lands in that user's INBOX, readable over IMAP and POP3.

Each user's INBOX starts with a welcome message. This module ties the pieces together and puts
them on loopback ports: the users, their mailboxes and the login check are in
proxy/demo/accounts.py, the three protocol servers in proxy/demo/servers.py.
"""

from __future__ import annotations

import email.utils
import ipaddress
import secrets
from typing import NamedTuple, cast

from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.mail.interfaces import IAccountIMAP, IMailboxPOP3, IMessageDelivery
from twisted.protocols import policies
from zope.interface import implementer

from proxy.demo.accounts import Account, Checker, Mailbox, POP3Maildrop
from proxy.demo.servers import SandboxIMAP, SandboxPOP3, SandboxSMTP, Submission


class Ports(NamedTuple):
    imap: int
    pop3: int
    smtp: int


class _Factory(protocol.ServerFactory):
    noisy = False

    def __init__(self, protocol_class, sandbox: Sandbox):
        self._protocol_class, self._sandbox = protocol_class, sandbox

    def buildProtocol(self, addr):
        p = self._protocol_class(self._sandbox)
        p.factory = self
        return p


def _welcome(user: str, address: str, domain: str) -> bytes:
    return f"""\
From: apppass sandbox <postmaster@{domain}>
To: <{address}>
Subject: Welcome to the apppass sandbox
Date: {email.utils.formatdate(localtime=True)}
Message-ID: <welcome.{secrets.token_hex(6)}@{domain}>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Welcome to the apppass sandbox, {user}!

This mailbox is a stand-in for your real mail server, so that you can try apppass
with curl or a mail client. It is for trying apppass out only: mail lives in memory
and is gone when `apppass demo` stops, there is no TLS, and it listens on loopback only.

Try sending a message to {address} through the proxy's SMTP port, then read it
here over IMAP or POP3.
""".encode()


@implementer(IRealm)
class _Realm:
    """What a logged-in user gets: the IMAP account, a POP3 view of the INBOX, or SMTP
    submission."""

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def requestAvatar(self, user, mind, *interfaces):
        for iface in interfaces:
            if iface is IAccountIMAP:
                return iface, self._sandbox._accounts[user], lambda: None
            if iface is IMailboxPOP3:
                return iface, POP3Maildrop(self._sandbox.mailbox(user)), lambda: None
            if iface is IMessageDelivery:
                return iface, Submission(self._sandbox, user), lambda: None
        raise NotImplementedError(interfaces)


class Sandbox:
    """In-memory IMAP, POP3 and SMTP on loopback for `apppass demo`.

    `users` maps a login name to its own password, or None for a user who can only be reached
    through the master account (SASL PLAIN authzid, or SMTP XCLIENT LOGIN).
    """

    def __init__(
        self,
        users: dict[str, str | None],
        master_user: str,
        master_password: str,
        domain: str = "example.test",
    ):
        if not master_user or not master_password:
            raise ValueError("the sandbox needs a master user and a master password")
        if master_user in users:
            raise ValueError("the master user must not also be a mailbox user")
        self.users = dict(users)
        self.master_user, self.master_password, self.domain = master_user, master_password, domain
        self._accounts = {user: Account(user) for user in self.users}
        for user in self.users:
            self.mailbox(user).deliver(_welcome(user, self.address(user), domain))
        self.portal = Portal(_Realm(self), [Checker(self)])
        self._listening: list = []
        self._factories: list[policies.WrappingFactory] = []

    def address(self, user: str) -> str:
        """The user's mail address: the login name if it has an @, else login@domain."""
        return user if "@" in user else f"{user}@{self.domain}"

    def user_for_address(self, address: str) -> str | None:
        return next((u for u in self.users if self.address(u).lower() == address.lower()), None)

    def mailbox(self, user: str) -> Mailbox:
        """The user's INBOX (KeyError for an unknown user)."""
        # twisted.mail's MemoryAccount declares `mailboxes = None`; its __init__ sets a dict.
        mailboxes = cast("dict[str, Mailbox]", self._accounts[user].mailboxes)
        return mailboxes["INBOX"]

    def listen(
        self,
        reactor,
        host: str = "127.0.0.1",
        imap_port: int = 0,
        pop3_port: int = 0,
        smtp_port: int = 0,
    ) -> Ports:
        """Listen on loopback (port 0: any free port); returns the bound ports."""
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the sandbox listens on loopback only, not on {host!r}")
        if self._listening:
            raise RuntimeError("the sandbox is already listening")
        try:
            for port, cls in (
                (imap_port, SandboxIMAP),
                (pop3_port, SandboxPOP3),
                (smtp_port, SandboxSMTP),
            ):
                factory = policies.WrappingFactory(_Factory(cls, self))  # tracks live connections
                self._listening.append(reactor.listenTCP(port, factory, interface=host))
                self._factories.append(factory)
        except Exception:
            self.stop()
            raise
        return Ports(*(p.getHost().port for p in self._listening))

    def stop(self) -> defer.Deferred:
        """Stop listening and close every open connection; fires when the ports are closed."""
        listening, self._listening = self._listening, []
        factories, self._factories = self._factories, []
        for factory in factories:
            for connection in list(factory.protocols):
                connection.transport.loseConnection()
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in listening])
