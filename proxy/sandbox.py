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

Each user's INBOX starts with a welcome message.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import hmac
import ipaddress
import re
import secrets
from io import BytesIO
from typing import NamedTuple

from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import LoginFailed, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol
from twisted.mail import imap4, pop3, smtp
from twisted.mail.interfaces import (
    IAccountIMAP,
    IChallengeResponse,
    IMailboxIMAP,
    IMailboxIMAPInfo,
    IMailboxPOP3,
    IMessageDelivery,
    IMessageIMAP,
    IMessageIMAPFile,
    IMessageSMTP,
)
from twisted.protocols import policies
from twisted.python import log
from zope.interface import implementer

from proxy import sasl

# In every greeting: what this server is, and what it is not.
NOTICE = b"apppass sandbox, for trying apppass out only: in memory, no persistence, no TLS, loopback only"

# SMTP SIZE: 10 240 000 octets, Postfix's default message_size_limit.
MAX_MESSAGE_SIZE = 10_240_000

# Who may send XCLIENT: Postfix's smtpd_authorized_xclient_hosts; the sandbox trusts loopback.
XCLIENT_TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

# XCLIENT attributes the sandbox understands (Postfix XCLIENT_README lists these and more).
XCLIENT_ATTRIBUTES = (b"LOGIN", b"NAME", b"ADDR", b"HELO", b"PROTO")

# System flags of RFC 3501 §2.3.2 (\Recent is not kept).
MAILBOX_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


def _crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF, as IMAP (RFC 3501 §2.2) and RFC 5322 want it."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


# --- the in-memory store ------------------------------------------------------------------------

@implementer(IMessageIMAP, IMessageIMAPFile)
class Message:
    """One stored message (or, as a sub-part, one MIME part): raw bytes, a UID and flags."""

    def __init__(self, raw: bytes, uid: int = 0, flags: tuple[str, ...] = ()):
        self.raw = _crlf(raw)
        self.uid = uid
        self.flags = set(flags)
        self.date = email.utils.formatdate(localtime=True)
        self._parsed = email.message_from_bytes(self.raw, policy=email.policy.compat32)
        _, sep, body = self.raw.partition(b"\r\n\r\n")
        self._body = body if sep else b""

    # IMessageIMAP
    def getUID(self) -> int:
        return self.uid

    def getFlags(self) -> list[str]:
        return sorted(self.flags)

    def getInternalDate(self) -> str:
        return self.date

    def getHeaders(self, negate: bool, *names) -> dict[str, str]:
        wanted = {_text(n).lower() for n in names}
        headers: dict[str, str] = {}
        for name, value in self._parsed.items():
            key = name.lower()
            if (key in wanted) != negate and key not in headers:  # the first of repeated fields
                headers[key] = str(value)
        return headers

    def getBodyFile(self) -> BytesIO:
        return BytesIO(self._body)

    def getSize(self) -> int:
        return len(self.raw)

    def isMultipart(self) -> bool:
        return self._parsed.is_multipart()

    def getSubPart(self, part: int) -> Message:
        if not self.isMultipart():
            raise TypeError("not a multipart message")
        return Message(self._parsed.get_payload(part).as_bytes())

    # IMessageIMAPFile
    def open(self) -> BytesIO:
        return BytesIO(self.raw)


@implementer(IMailboxIMAP, IMailboxIMAPInfo)
class Mailbox:
    """An in-memory IMAP mailbox; POP3 sees the INBOX through `_POP3Maildrop`."""

    def __init__(self, name: str):
        self.name = name
        self.messages: list[Message] = []
        self.listeners: list = []
        self.uid_validity = secrets.randbelow(2**31) + 1
        self.uid_next = 1

    def deliver(self, raw: bytes, flags: tuple[str, ...] = ()) -> int:
        """Store a message and tell every IMAP session that has this mailbox selected; the UID."""
        message = Message(raw, self.uid_next, flags)
        self.uid_next += 1
        self.messages.append(message)
        for listener in list(self.listeners):
            listener.newMessages(len(self.messages), None)
        return message.uid

    def remove(self, gone: list[Message]) -> None:
        """POP3's QUIT: the sandbox does not tell selected IMAP sessions (no EXPUNGE push)."""
        self.messages = [m for m in self.messages if m not in gone]

    # IMailboxIMAPInfo
    def getFlags(self) -> list[str]:
        return list(MAILBOX_FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    # IMailboxIMAP
    def getUIDValidity(self) -> int:
        return self.uid_validity

    def getUIDNext(self) -> int:
        return self.uid_next

    def getUID(self, message: int) -> int:
        return self.messages[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum("\\Seen" not in m.flags for m in self.messages)

    def isWriteable(self) -> bool:
        return True

    def destroy(self) -> None:
        self.messages = []

    def requestStatus(self, names):
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener) -> None:
        self.listeners.remove(listener)

    def addMessage(self, message, flags, date=None):
        return defer.succeed(self.deliver(message.read(), tuple(_text(f) for f in flags)))

    def expunge(self) -> list[int]:
        """Sequence numbers as RFC 3501 §7.4.1 reports them: each one after the previous removal."""
        expunged, kept = [], []
        for seq, message in enumerate(self.messages, 1):
            if "\\Deleted" in message.flags:
                expunged.append(seq - len(expunged))
            else:
                kept.append(message)
        self.messages = kept
        return expunged

    def _select(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, Message]]:
        last = (self.messages[-1].uid if uid else len(self.messages)) if self.messages else 0
        messages.last = last
        return [(seq, m) for seq, m in enumerate(self.messages, 1) if (m.uid if uid else seq) in messages]

    def fetch(self, messages, uid):
        return self._select(messages, uid)

    def store(self, messages, flags, mode, uid):
        changed = {}
        for seq, message in self._select(messages, uid):
            if mode == 0:
                message.flags = set(flags)
            elif mode > 0:
                message.flags |= set(flags)
            else:
                message.flags -= set(flags)
            changed[seq] = message.getFlags()
        return changed


class _Account(imap4.MemoryAccount):
    """twisted.mail's in-memory account, holding our mailboxes; INBOX always exists."""

    def __init__(self, name: str):
        super().__init__(name)
        self.addMailbox("INBOX")

    def _emptyMailbox(self, name, id):
        return Mailbox(name)


class _POP3Maildrop(pop3.Mailbox):
    """The INBOX as one POP3 session sees it: fixed at login, deletions applied at QUIT (RFC 1939)."""

    def __init__(self, inbox: Mailbox):
        self._inbox = inbox
        self._messages = list(inbox.messages)
        self._deleted: set[int] = set()

    def _message(self, i: int) -> Message:
        if not 0 <= i < len(self._messages):
            raise ValueError("no such message")
        return self._messages[i]

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self._deleted else m.getSize() for n, m in enumerate(self._messages)]
        return 0 if i in self._deleted else self._message(i).getSize()

    def getMessage(self, i):
        # twisted.mail.pop3 turns LF into CRLF on the way out, so hand it LF line endings.
        return BytesIO(self._message(i).raw.replace(b"\r\n", b"\n"))

    def getUidl(self, i):
        return b"%d.%d" % (self._inbox.uid_validity, self._message(i).uid)

    def deleteMessage(self, i):
        self._message(i)
        if i in self._deleted:
            raise ValueError("message already deleted")
        self._deleted.add(i)

    def undeleteMessages(self):
        self._deleted.clear()

    def sync(self):
        self._inbox.remove([self._messages[i] for i in self._deleted])
        self._deleted.clear()


# --- authentication: one portal for the three protocols -----------------------------------------

class IAuthzidPlain(credentials.ICredentials):
    """SASL PLAIN credentials (RFC 4616): authzid, authcid and password; `valid` if well-formed."""


@implementer(IAuthzidPlain, IChallengeResponse)
class PlainCredentials:
    """SASL PLAIN as twisted.mail's SMTP server drives it (IChallengeResponse), or from base64."""

    def __init__(self) -> None:
        self.authzid = self.authcid = self.password = ""
        self.valid = False

    @classmethod
    def from_base64(cls, data: bytes) -> PlainCredentials:
        creds = cls()
        try:
            creds.setResponse(sasl.decode_b64(data))
        except sasl.SaslError:
            pass
        return creds

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        try:
            self.authzid, parsed = sasl.parse_plain(response)
        except sasl.SaslError:
            self.valid = False
            return
        self.authcid, self.password, self.valid = parsed.login, parsed.secret, True

    def moreChallenges(self) -> bool:
        return False


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@implementer(ICredentialsChecker)
class _Checker:
    """The master account may log in as any user (authzid); a user with a password as itself."""

    credentialInterfaces = (IAuthzidPlain, credentials.IUsernamePassword)

    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def requestAvatarId(self, creds):
        if IAuthzidPlain.providedBy(creds):
            user = self._plain(creds)
        else:
            user = self._own_password(_text(creds.username), _text(creds.password))
        return defer.succeed(user) if user else defer.fail(UnauthorizedLogin())

    def _plain(self, creds: PlainCredentials) -> str | None:
        if not creds.valid:
            return None
        if not creds.authzid or creds.authzid == creds.authcid:
            return self._own_password(creds.authcid, creds.password)
        sb = self._sandbox
        if (_same(creds.authcid, sb.master_user) and _same(creds.password, sb.master_password)
                and creds.authzid in sb.users):
            return creds.authzid
        return None

    def _own_password(self, user: str, password: str) -> str | None:
        known = self._sandbox.users.get(user)
        return user if known is not None and _same(password, known) else None


@implementer(IRealm)
class _Realm:
    def __init__(self, sandbox: Sandbox):
        self._sandbox = sandbox

    def requestAvatar(self, user, mind, *interfaces):
        for iface in interfaces:
            if iface is IAccountIMAP:
                return iface, self._sandbox._accounts[user], lambda: None
            if iface is IMailboxPOP3:
                return iface, _POP3Maildrop(self._sandbox.mailbox(user)), lambda: None
            if iface is IMessageDelivery:
                return iface, _Submission(self._sandbox, user), lambda: None
        raise NotImplementedError(interfaces)


# --- IMAP ---------------------------------------------------------------------------------------

_IMAP = imap4.IMAP4Server


class SandboxIMAP(_IMAP):
    """twisted.mail's IMAP server plus ID, AUTHENTICATE PLAIN with SASL-IR and authzid, and
    `[CAPABILITY …]` in the tagged OK of a login."""

    IDENT = NOTICE

    def __init__(self, sandbox: Sandbox):
        super().__init__()
        self.portal = sandbox._portal

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

    unauth_AUTHENTICATE = (do_AUTHENTICATE, _IMAP.arg_line)

    def _plainResponse(self, line, tag):
        if line.strip() == b"*":
            self.sendBadResponse(tag, b"AUTHENTICATE cancelled")
        else:
            self._login(tag, PlainCredentials.from_base64(line))

    def do_LOGIN(self, tag, user, password):
        self._login(tag, credentials.UsernamePassword(user, password))

    unauth_LOGIN = (do_LOGIN, _IMAP.arg_astring, _IMAP.arg_finalastring)

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

    auth_APPEND = select_APPEND = (do_APPEND, _IMAP.arg_astring, _IMAP.opt_plist, _IMAP.opt_datetime,
                                     _IMAP.arg_literal)

    # IDLE (RFC 2177): Twisted's, with the continuation text RFC 3501 §7.5 asks for.
    def do_IDLE(self, tag):
        self.sendContinuationRequest(b"idling")
        self.parseTag, self.lastState, self.parseState = tag, self.parseState, "idle"

    auth_IDLE = select_IDLE = (do_IDLE,)


# --- POP3 ---------------------------------------------------------------------------------------

class SandboxPOP3(pop3.POP3):
    """twisted.mail's POP3 server with `AUTH PLAIN [initial-response]` (RFC 5034) and authzid."""

    def __init__(self, sandbox: Sandbox):
        self.portal = sandbox._portal
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
_ENHANCED = {221: b"2.0.0", 235: b"2.7.0", 250: b"2.0.0", 451: b"4.3.0", 454: b"4.7.0",
             500: b"5.5.2", 501: b"5.5.4", 503: b"5.5.1", 504: b"5.5.4", 535: b"5.7.8",
             550: b"5.1.1", 553: b"5.1.3"}
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
class _Submission:
    """What an authenticated user may do: send to the sandbox's own users, nowhere else."""

    def __init__(self, sandbox: Sandbox, user: str):
        self._sandbox = sandbox
        self.user = user

    def receivedHeader(self, helo, origin, recipients):
        name, addr = _text(helo[0] or "unknown"), _text(helo[1])
        rcpt = " ".join(f"<{u.dest}>" for u in recipients)
        return (f"Received: from {name} ([{addr}])\n\t(Authenticated sender: {self.user})\n"
                f"\tby {self._sandbox.domain} (apppass sandbox) with ESMTPA id {secrets.token_hex(5).upper()}\n"
                f"\tfor {rcpt}; {email.utils.formatdate(localtime=True)}").encode("utf-8")

    def validateFrom(self, helo, origin):
        return origin

    def validateTo(self, user):
        owner = self._sandbox.user_for_address(str(user.dest))
        if owner is None:
            raise smtp.SMTPBadRcpt(user.dest, 550, "5.1.1 Recipient unknown: the sandbox delivers "
                                                   "only to its own users and relays nothing")
        inbox = self._sandbox.mailbox(owner)
        return lambda: _IncomingMessage(inbox)


class SandboxSMTP(smtp.ESMTP):
    """twisted.mail's ESMTP server plus Postfix's XCLIENT, enhanced status codes, and no mail
    from sessions that have not authenticated."""

    noisy = False

    def __init__(self, sandbox: Sandbox):
        super().__init__(chal={b"PLAIN": PlainCredentials})
        self.portal = sandbox._portal
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
        return {b"SIZE": [b"%d" % MAX_MESSAGE_SIZE], b"8BITMIME": None, b"PIPELINING": None,
                b"ENHANCEDSTATUSCODES": None, b"XCLIENT": list(XCLIENT_ATTRIBUTES), b"AUTH": [b"PLAIN"]}

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
        self.delivery = _Submission(self._sandbox, login) if login is not None else None
        self._helo, self._from, self._to = (self._xclient_helo, self._client_addr), None, []
        self.sendCode(220, self.greeting())


def _xclient_trusted(host: str) -> bool:
    addr = ipaddress.ip_address(host)
    return any(addr in net for net in XCLIENT_TRUSTED if net.version == addr.version)


# --- the sandbox --------------------------------------------------------------------------------

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
""".encode("utf-8")


class Sandbox:
    """In-memory IMAP, POP3 and SMTP on loopback for `apppass demo`.

    `users` maps a login name to its own password, or None for a user who can only be reached
    through the master account (SASL PLAIN authzid, or SMTP XCLIENT LOGIN).
    """

    def __init__(self, users: dict[str, str | None], master_user: str, master_password: str,
                 domain: str = "example.test"):
        if not master_user or not master_password:
            raise ValueError("the sandbox needs a master user and a master password")
        if master_user in users:
            raise ValueError("the master user must not also be a mailbox user")
        self.users = dict(users)
        self.master_user, self.master_password, self.domain = master_user, master_password, domain
        self._accounts = {user: _Account(user) for user in self.users}
        for user in self.users:
            self.mailbox(user).deliver(_welcome(user, self.address(user), domain))
        self._portal = Portal(_Realm(self), [_Checker(self)])
        self._listening: list = []
        self._factories: list[policies.WrappingFactory] = []

    def address(self, user: str) -> str:
        """The user's mail address: the login name if it has an @, else login@domain."""
        return user if "@" in user else f"{user}@{self.domain}"

    def user_for_address(self, address: str) -> str | None:
        return next((u for u in self.users if self.address(u).lower() == address.lower()), None)

    def mailbox(self, user: str) -> Mailbox:
        """The user's INBOX (KeyError for an unknown user)."""
        return self._accounts[user].mailboxes["INBOX"]

    def listen(self, reactor, host: str = "127.0.0.1", imap_port: int = 0, pop3_port: int = 0,
               smtp_port: int = 0) -> Ports:
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
            for port, cls in ((imap_port, SandboxIMAP), (pop3_port, SandboxPOP3), (smtp_port, SandboxSMTP)):
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
