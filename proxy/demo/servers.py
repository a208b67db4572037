"""The sandbox's IMAP, POP3 and SMTP servers: twisted.mail's, plus what the proxy sends upstream.

IMAP and POP3 add `AUTHENTICATE`/`AUTH PLAIN` with an initial response and an authzid; IMAP
adds ID and `[CAPABILITY …]` in the tagged OK of a login; SMTP adds Postfix's XCLIENT, enhanced
status codes, and sends only for authenticated sessions to the sandbox's own users. The users,
their mailboxes and the login check are in proxy/demo/accounts.py.
"""

from __future__ import annotations

import email.utils
import ipaddress
import re
import secrets

from twisted.cred import credentials
from twisted.cred.error import LoginFailed
from twisted.internet import defer
from twisted.mail import imap4, pop3, smtp
from twisted.mail.interfaces import IAccountIMAP, IMailboxPOP3, IMessageDelivery, IMessageSMTP
from twisted.python import log
from zope.interface import implementer

from proxy.demo.accounts import Mailbox, PlainCredentials, SandboxView, as_text

# In every greeting: what this server is, and what it is not.
NOTICE = (
    b"apppass sandbox, for trying apppass out only: in memory, no persistence, no TLS,"
    b" loopback only"
)

# SMTP SIZE: 10 240 000 octets, Postfix's default message_size_limit.
MAX_MESSAGE_SIZE = 10_240_000

# Who may send XCLIENT: Postfix's smtpd_authorized_xclient_hosts; the sandbox trusts loopback.
XCLIENT_TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# XCLIENT attributes the sandbox understands (Postfix XCLIENT_README lists these and more).
XCLIENT_ATTRIBUTES = (b"LOGIN", b"NAME", b"ADDR", b"HELO", b"PROTO")


# --- IMAP ---------------------------------------------------------------------------------------

_IMAP = imap4.IMAP4Server


class SandboxIMAP(_IMAP):
    """twisted.mail's IMAP server plus ID, AUTHENTICATE PLAIN with SASL-IR and authzid, and
    `[CAPABILITY …]` in the tagged OK of a login."""

    IDENT = NOTICE

    def __init__(self, sandbox: SandboxView):
        super().__init__()
        self.portal = sandbox.portal  # type: ignore[assignment]  # twisted.mail says portal = None

    def capabilities(self):
        caps = {b"ID": None, b"IDLE": None, b"NAMESPACE": None}
        if self.state == "unauth":
            caps.update({b"SASL-IR": None, b"AUTH": [b"PLAIN"]})
        return caps

    def connectionLost(self, reason):
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox = None
        super().connectionLost(reason)

    # ID (RFC 2971): the proxy sends the client's address (x-originating-ip); answer in kind.
    def do_ID(self, tag, line):
        try:
            imap4.parseNestedParens(line or b"NIL")
        except imap4.MismatchedNesting:
            self.sendBadResponse(tag, b"Malformed ID parameters")
            return
        self.sendUntaggedResponse(b'ID ("name" "apppass sandbox")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = auth_ID = select_ID = (do_ID, _IMAP.arg_line)

    # AUTHENTICATE PLAIN [initial-response] (RFC 3501 §6.2.2, SASL-IR RFC 4959).
    def do_AUTHENTICATE(self, tag, line):
        mechanism, _, initial = (line or b"").strip().partition(b" ")
        if mechanism.upper() != b"PLAIN":
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism")
        elif initial:
            self._login(tag, PlainCredentials.from_base64(initial))
        else:
            self.sendLine(b"+ ")
            self.parseState = "pending"  # parse_pending hands the next line to this Deferred
            self._pendingLiteral = defer.Deferred()
            self._pendingLiteral.addCallback(self._plainResponse, tag)

    # ignore: the base's table is typed with IMAP4Server; twisted calls ours with a SandboxIMAP
    unauth_AUTHENTICATE = (do_AUTHENTICATE, _IMAP.arg_line)  # type: ignore[assignment]

    def _plainResponse(self, line, tag):
        if line.strip() == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
        else:
            self._login(tag, PlainCredentials.from_base64(line))

    def do_LOGIN(self, tag, user, password):
        self._login(tag, credentials.UsernamePassword(user, password))

    # ignore: the base's table is typed with IMAP4Server; twisted calls ours with a SandboxIMAP
    unauth_LOGIN = (do_LOGIN, _IMAP.arg_astring, _IMAP.arg_finalastring)  # type: ignore[assignment]

    def _login(self, tag, creds):
        d = self.portal.login(creds, None, IAccountIMAP)
        d.addCallbacks(self._loggedIn, self._loginFailed, callbackArgs=(tag,), errbackArgs=(tag,))

    def _loggedIn(self, result, tag):
        _, self.account, self._onLogout = result
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        caps = b" ".join(self.listCapabilities())
        self.sendPositiveResponse(tag, b"[CAPABILITY " + caps + b"] Logged in")

    def _loginFailed(self, failure, tag):
        if failure.check(LoginFailed):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed.")
        else:
            log.err(failure, "sandbox IMAP login")
            self.sendBadResponse(tag, b"Server error")

    # APPEND without a flag list (as imaplib sends it) would crash twisted.mail: flags is None.
    def do_APPEND(self, tag, mailbox, flags, date, message):
        super().do_APPEND(tag, mailbox, flags or [], date, message)

    # ignore: the base's table is typed with IMAP4Server; twisted calls ours with a SandboxIMAP
    auth_APPEND = select_APPEND = (  # type: ignore[assignment]
        do_APPEND,
        _IMAP.arg_astring,
        _IMAP.opt_plist,
        _IMAP.opt_datetime,
        _IMAP.arg_literal,
    )

    # IDLE (RFC 2177): Twisted's, with the continuation text RFC 3501 §7.5 asks for.
    def do_IDLE(self, tag):
        self.sendContinuationRequest(b"idling")
        self.parseTag, self.lastState, self.parseState = tag, self.parseState, "idle"

    # ignore: the base's table is typed with IMAP4Server; twisted calls ours with a SandboxIMAP
    auth_IDLE = select_IDLE = (do_IDLE,)  # type: ignore[assignment]


# --- POP3 ---------------------------------------------------------------------------------------


class SandboxPOP3(pop3.POP3):
    """twisted.mail's POP3 server with `AUTH PLAIN [initial-response]` (RFC 5034) and authzid."""

    def __init__(self, sandbox: SandboxView):
        self.portal = sandbox.portal  # type: ignore[assignment]  # twisted.mail says portal = None
        self.magic = NOTICE  # the greeting text; APOP is not offered

    def listCapabilities(self):
        return [b"TOP", b"UIDL", b"USER", b"SASL PLAIN", b"IMPLEMENTATION apppass-sandbox"]

    def do_AUTH(self, mechanism=None, initial=None, *extra):
        if extra:
            self.failResponse(b"Syntax: AUTH mechanism [initial-response]")
        elif self.mbox is not None:
            self.failResponse(b"Already authenticated")
        elif mechanism is None:
            self.successResponse(b"SASL mechanisms follow")
            self.sendLine(b"PLAIN")
            self.sendLine(b".")
        elif mechanism.upper() != b"PLAIN":
            self.failResponse(b"Unsupported SASL mechanism")
        elif initial is None:
            self.sendLine(b"+ ")
            self.state = "PLAIN"
        else:
            self._plain(initial)

    def state_PLAIN(self, line):
        self.state = "COMMAND"
        if line.strip() == b"*":
            self.failResponse(b"AUTH cancelled")
        else:
            self._plain(line)

    def _plain(self, response):
        creds = PlainCredentials.from_base64(response)
        d = self.portal.login(creds, None, IMailboxPOP3)
        d.addCallback(self._cbMailbox, creds.authzid.encode())
        d.addErrback(self._ebMailbox).addErrback(self._ebUnexpected)

    def _ebMailbox(self, failure):
        failure.trap(LoginFailed)
        self.failResponse(b"[AUTH] Authentication failed")

    def do_DELE(self, i):
        try:
            self.mbox.deleteMessage(int(i) - 1)
        except ValueError:
            self.failResponse(b"No such message")
        else:
            self.successResponse(b"Deleted")


# --- SMTP ---------------------------------------------------------------------------------------

# RFC 3463 codes for the replies twisted.mail writes without one (RFC 2034 wants them all).
_ENHANCED = {
    221: b"2.0.0",
    235: b"2.7.0",
    250: b"2.0.0",
    451: b"4.3.0",
    454: b"4.7.0",
    500: b"5.5.2",
    501: b"5.5.4",
    503: b"5.5.1",
    504: b"5.5.4",
    535: b"5.7.8",
    550: b"5.1.1",
    553: b"5.1.3",
}
_HAS_ENHANCED = re.compile(rb"[245]\.\d{1,3}\.\d{1,3} ")


@implementer(IMessageSMTP)
class _IncomingMessage:
    def __init__(self, inbox: Mailbox):
        self._inbox = inbox
        self._lines: list[bytes] = []
        self._size = 0

    def lineReceived(self, line):
        self._size += len(line) + 2
        if self._size > MAX_MESSAGE_SIZE:
            raise smtp.SMTPServerError(552, b"5.3.4 Message size exceeds fixed limit")
        self._lines.append(line)

    def eomReceived(self):
        self._inbox.deliver(b"\r\n".join(self._lines) + b"\r\n")
        return defer.succeed(None)

    def connectionLost(self):
        self._lines = []


@implementer(IMessageDelivery)
class Submission:
    """What an authenticated user may do: send to the sandbox's own users, nowhere else."""

    def __init__(self, sandbox: SandboxView, user: str):
        self._sandbox = sandbox
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        name, addr = as_text(helo[0] or "unknown"), as_text(helo[1])
        rcpt = " ".join(f"<{u.dest}>" for u in recipients)
        return (
            f"Received: from {name} ([{addr}])\n\t(Authenticated sender: {self.user})\n"
            f"\tby {self._sandbox.domain} (apppass sandbox) with ESMTPA id "
            f"{secrets.token_hex(5).upper()}\n"
            f"\tfor {rcpt}; {email.utils.formatdate(localtime=True)}"
        ).encode()

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        owner = self._sandbox.user_for_address(str(user.dest))
        if owner is None:
            raise smtp.SMTPBadRcpt(
                user.dest,
                550,
                "5.1.1 Recipient unknown: the sandbox delivers "
                "only to its own users and relays nothing",
            )
        inbox = self._sandbox.mailbox(owner)
        return lambda: _IncomingMessage(inbox)


class SandboxSMTP(smtp.ESMTP):
    """twisted.mail's ESMTP server plus Postfix's XCLIENT, enhanced status codes, and no mail
    from sessions that have not authenticated."""

    noisy = False

    def __init__(self, sandbox: SandboxView):
        super().__init__(chal={b"PLAIN": PlainCredentials})
        self.portal = sandbox.portal  # type: ignore[assignment]  # twisted.mail says portal = None
        self.host = sandbox.domain.encode("idna")
        self._sandbox = sandbox
        self._client_addr = b""
        self._xclient_helo: bytes | None = None

    def connectionMade(self):
        super().connectionMade()
        self._client_addr = self.transport.getPeer().host.encode("ascii")

    def greeting(self):
        return self.host + b" ESMTP " + NOTICE

    def extensions(self):
        return {
            b"SIZE": [b"%d" % MAX_MESSAGE_SIZE],
            b"8BITMIME": None,
            b"PIPELINING": None,
            b"ENHANCEDSTATUSCODES": None,
            b"XCLIENT": list(XCLIENT_ATTRIBUTES),
            b"AUTH": [b"PLAIN"],
        }

    def sendCode(self, code, message=b""):
        if code in _ENHANCED and not _HAS_ENHANCED.match(message):
            message = _ENHANCED[code] + b" " + message
        super().sendCode(code, message)

    def do_EHLO(self, rest):
        # The client address is the one XCLIENT named; the EHLO reply carries no status code.
        self._helo = (self._xclient_helo or rest, self._client_addr)
        self._from, self._to = None, []
        smtp.SMTP.sendCode(self, 250, self.host + b" Hello " + rest + b"\n" + self.listExtensions())

    def ext_AUTH(self, rest):
        if not rest.strip():  # twisted.mail would raise IndexError
            self.sendCode(501, b"5.5.4 Syntax: AUTH mechanism [initial-response]")
        else:
            super().ext_AUTH(rest)

    def validateFrom(self, helo, origin):
        if not self.authenticated:
            raise smtp.SMTPServerError(530, "5.7.0 Authentication required")
        return super().validateFrom(helo, origin)

    def ext_XCLIENT(self, rest):
        """Postfix XCLIENT (XCLIENT_README): override the client's attributes, then greet again."""
        if not _xclient_trusted(self.transport.getPeer().host):
            self.sendCode(550, b"5.7.0 Error: insufficient authorization")
            return
        if self._from is not None:
            self.sendCode(503, b"5.5.1 Error: MAIL transaction in progress")
            return
        if not rest.strip():
            self.sendCode(501, b"5.5.4 Syntax: XCLIENT attribute=value ...")
            return
        attributes = {}
        for item in rest.split():
            name, eq, value = item.partition(b"=")
            if not eq or name.upper() not in XCLIENT_ATTRIBUTES:
                self.sendCode(501, b"5.5.4 Bad XCLIENT attribute name: " + name)
                return
            try:
                decoded = smtp.xtext_decode(value)[0]
            except (ValueError, TypeError):
                decoded = None
            if decoded is None or re.search(r"[\x00-\x1f\x7f]", decoded):  # no CR LF in Received
                self.sendCode(501, b"5.5.4 Bad XCLIENT attribute value: " + value)
                return
            if decoded.upper() not in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                attributes[name.upper()] = decoded
        login = attributes.get(b"LOGIN")
        if login is not None and login not in self._sandbox.users:
            self.sendCode(550, b"5.7.1 XCLIENT LOGIN names no sandbox user")
            return
        if b"ADDR" in attributes:
            self._client_addr = attributes[b"ADDR"].encode("utf-8")
        if b"HELO" in attributes:
            self._xclient_helo = attributes[b"HELO"].encode("utf-8")
        self.authenticated = login is not None
        self.delivery = Submission(self._sandbox, login) if login is not None else None
        self._helo, self._from, self._to = (self._xclient_helo, self._client_addr), None, []
        self.sendCode(220, self.greeting())


def _xclient_trusted(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    return any(addr in net for net in XCLIENT_TRUSTED if net.version == addr.version)
