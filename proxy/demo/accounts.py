"""The sandbox's users: their in-memory mailboxes, and how a login proves who it is.

Shared by the sandbox's IMAP, POP3 and SMTP servers (proxy/demo/servers.py): a message stored
here is seen by all three. A login is SASL PLAIN (RFC 4616) from the master account with an
authzid naming the user, or a user's own password. Nothing is written to disk.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import email.utils
import hmac
import re
import secrets
from io import BytesIO
from typing import Protocol

from twisted.cred import credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.mail import imap4, pop3
from twisted.mail.interfaces import (
    IChallengeResponse,
    IMailboxIMAP,
    IMailboxIMAPInfo,
    IMessageIMAP,
    IMessageIMAPFile,
)
from zope.interface import implementer

from proxy import sasl

# System flags of RFC 3501 §2.3.2 (\Recent is not kept).
MAILBOX_FLAGS = ("\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft")


def _crlf(raw: bytes) -> bytes:
    """Every line ending as CRLF, as IMAP (RFC 3501 §2.2) and RFC 5322 want it."""
    return re.sub(rb"\r?\n", b"\r\n", raw)


def as_text(value: bytes | str) -> str:
    """A name or flag as twisted.mail hands it over (bytes or str), as str."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class SandboxView(Protocol):
    """The sandbox as its login check and its servers see it (Sandbox, proxy/demo/sandbox.py)."""

    users: dict[str, str | None]  # login name: its own password, or None (master account only)
    master_user: str
    master_password: str
    domain: str
    portal: Portal

    def mailbox(self, user: str) -> Mailbox: ...

    def user_for_address(self, address: str) -> str | None: ...


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
        wanted = {as_text(n).lower() for n in names}
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
        sub = self._parsed.get_payload(part)
        assert isinstance(sub, email.message.Message)  # a multipart's parts are messages
        return Message(sub.as_bytes())

    # IMessageIMAPFile
    def open(self) -> BytesIO:
        return BytesIO(self.raw)


@implementer(IMailboxIMAP, IMailboxIMAPInfo)
class Mailbox:
    """An in-memory IMAP mailbox; POP3 sees the INBOX through `POP3Maildrop`."""

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
        return defer.succeed(self.deliver(message.read(), tuple(as_text(f) for f in flags)))

    def expunge(self) -> list[int]:
        """Sequence numbers as RFC 3501 §7.4.1 reports them: each one after the previous removal."""
        expunged: list[int] = []
        kept: list[Message] = []
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
        return [
            (seq, m)
            for seq, m in enumerate(self.messages, 1)
            if (m.uid if uid else seq) in messages
        ]

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


class Account(imap4.MemoryAccount):
    """twisted.mail's in-memory account, holding our mailboxes; INBOX always exists."""

    def __init__(self, name: str):
        super().__init__(name)
        self.addMailbox("INBOX")

    def _emptyMailbox(self, name, id):
        return Mailbox(name)


class POP3Maildrop(pop3.Mailbox):
    """The INBOX as one POP3 session sees it: fixed at login, deletions applied at QUIT
    (RFC 1939)."""

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


# --- authentication: one checker for the three protocols ----------------------------------------


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
class Checker:
    """The master account may log in as any user (authzid); a user with a password as itself."""

    credentialInterfaces = (IAuthzidPlain, credentials.IUsernamePassword)

    def __init__(self, sandbox: SandboxView):
        self._sandbox = sandbox

    def requestAvatarId(self, creds):
        if IAuthzidPlain.providedBy(creds):
            user = self._plain(creds)
        else:
            user = self._own_password(as_text(creds.username), as_text(creds.password))
        return defer.succeed(user) if user else defer.fail(UnauthorizedLogin())

    def _plain(self, creds: PlainCredentials) -> str | None:
        if not creds.valid:
            return None
        if not creds.authzid or creds.authzid == creds.authcid:
            return self._own_password(creds.authcid, creds.password)
        sb = self._sandbox
        if (
            _same(creds.authcid, sb.master_user)
            and _same(creds.password, sb.master_password)
            and creds.authzid in sb.users
        ):
            return creds.authzid
        return None

    def _own_password(self, user: str, password: str) -> str | None:
        known = self._sandbox.users.get(user)
        return user if known is not None and _same(password, known) else None
