"""The SMTP command watch: follows a logged-in session in both directions, sans-IO.

It sits in the relay after login. It follows the client's stream (command lines, DATA content,
BDAT chunks) and the upstream's replies, refuses XCLIENT, XFORWARD, STARTTLS and role reversal
from the client (the proxy's trust with the upstream is not the client's to use), and puts its
own refusals into the reply stream in the right place. Every input is bounded (WatchLimits).

For a code with a sending policy (proxy/codes/sending.py) it also refuses a sender or recipient
the policy does not allow, and, under a daily cap, asks for a place before the first recipient
of each message: it holds the client's input, says `ask`, and goes on when `answer` brings the
store's reply (proxy/smtp/policed.py does the asking). It says when the message a place was held
for was accepted upstream (`slots`: "sent") or not ("returned"), in reply order.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field

from proxy.codes.sending import SendingRules
from proxy.linebuffer import LineBuffer, TooLong
from proxy.smtp.envelope import mail_from, rcpt_to

CRLF = b"\r\n"

# Command line relayed after login: 2048 octets, CRLF included: Postfix's line_length_limit, above
# RFC 5321's 512 plus the parameters of SIZE, DSN (RFC 3461) and SMTPUTF8 addresses. A longer line
# is refused here, never passed on, so no upstream can split it into two commands.
RELAY_MAX_LINE = 2048

# Client input held while the upstream answers DATA: 65536 octets, then close. RFC 2920 §3.1
# makes DATA the last command of a pipelined group: a client sends nothing more until 354, so
# only a misbehaving client fills this; the relay should stop reading while `waiting` is true.
RELAY_MAX_HELD = 65536

# Replies due to the client, in order: 10000, then 421 and close. They are the upstream's to the
# commands awaiting it and the proxy's own to commands it refused while those were awaited: a
# client pipelining refused commands (XCLIENT) against a slow upstream queues them too. Ten times
# Postfix's smtpd_recipient_limit (1000), so a fully pipelined transaction never reaches it.
RELAY_MAX_OUTSTANDING = 10000

# Largest BDAT chunk passed through: 2**31 - 1 octets. An upstream that cannot represent a chunk
# size refuses the command and might read the chunk as commands; a larger size is refused here.
RELAY_MAX_CHUNK = 2**31 - 1

# Commands refused after login, with the reply the client gets instead of the upstream's.
REFUSED_AFTER_LOGIN: dict[str, bytes] = {
    "XCLIENT": b"550 5.7.0 Error: XCLIENT not permitted\r\n",
    "XFORWARD": b"550 5.7.0 Error: XFORWARD not permitted\r\n",
    # TLS negotiated between client and upstream through the relay would hide every later
    # command from the watch.
    "STARTTLS": b"503 5.5.1 Error: STARTTLS not permitted after authentication\r\n",
    # Role reversal (RFC 821 TURN, RFC 2645 ATRN) would turn the streams around.
    "TURN": b"502 5.5.1 Error: TURN not permitted\r\n",
    "ATRN": b"502 5.5.1 Error: ATRN not permitted\r\n",
}

# RFC 5321 §3.8: the server may close with 421 at any time (Postfix: "421 4.7.0 … Error: too
# many …"); the client learns why before the connection ends.
_TOO_MANY_QUEUED = b"421 4.7.0 Error: too many commands awaiting replies, closing connection\r\n"
_LINE_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
_BARE_CR_OR_NUL = b"500 5.5.2 Error: bare <CR> or <NUL> in command\r\n"
_BAD_BDAT = b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"
# Postfix 3.9 (smtpd_forbid_bare_newline) answers a bare <LF> so, and disconnects.
_AMBIGUOUS_END = b"521 5.5.2 Error: bare <CR> or <LF> at end of data\r\n"

# A code's sending policy refused the command (RFC 3463 5.7.1: delivery not authorized; Postfix's
# reject_sender_login_mismatch says "5.7.1 … Sender address rejected: not owned by user"). The
# daily cap, at RCPT: RFC 5321 §4.5.3.1.10 makes 452 the transient refusal of one more recipient.
# The store unable to count: a temporary local error (RFC 5321 451, RFC 3463 4.3.0).
_SENDER_REFUSED = b"550 5.7.1 Error: sender address not allowed for this app password\r\n"
_RECIPIENT_REFUSED = b"550 5.7.1 Error: recipient address not allowed for this app password\r\n"
_DAILY_CAP = b"452 4.7.0 Error: daily message limit of this app password reached\r\n"
_NOT_COUNTED = b"451 4.3.0 Error: cannot count messages now, try again later\r\n"
# A path the watch cannot read exactly is refused, not guessed at (Postfix's wording).
_BAD_SENDER = b"501 5.1.7 Error: bad sender address syntax\r\n"
_BAD_RECIPIENT = b"501 5.1.3 Error: bad recipient address syntax\r\n"

# What `refused` says of the policy's refusals (the audit log; each counted on the code too).
SENDER_REFUSED = "MAIL FROM (sender not allowed)"
RECIPIENT_REFUSED = "RCPT TO (recipient not allowed)"
DAILY_CAP = "RCPT TO (daily message limit)"
BAD_SENDER = "MAIL FROM (address not readable)"
BAD_RECIPIENT = "RCPT TO (address not readable)"
NOT_COUNTED = "RCPT TO (message count unavailable)"
POLICY_REFUSALS = frozenset(
    {SENDER_REFUSED, RECIPIENT_REFUSED, DAILY_CAP, BAD_SENDER, BAD_RECIPIENT}
)

# Slot events: the message a place was held for was accepted upstream, or not.
SENT, RETURNED = "sent", "returned"

_BDAT = re.compile(rb"BDAT ([0-9]{1,10})( LAST)?", re.IGNORECASE)
_DOT_AFTER_BREAK = re.compile(rb"[\r\n]\.")


@dataclass(frozen=True)
class SmtpWatchLimits:
    max_line: int = RELAY_MAX_LINE
    max_held: int = RELAY_MAX_HELD
    max_outstanding: int = RELAY_MAX_OUTSTANDING
    max_chunk: int = RELAY_MAX_CHUNK

    def __post_init__(self) -> None:
        for name in ("max_line", "max_held", "max_outstanding", "max_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"SmtpWatchLimits.{name} must be a positive integer, not {value!r}"
                )


@dataclass(frozen=True)
class Relayed:
    """What the relay does with one call's input: bytes for each side, in order."""

    to_upstream: bytes = b""
    to_client: bytes = b""
    refused: tuple[str, ...] = ()  # commands refused in this call (verbs), for the audit log
    close: str | None = None  # close both sides after writing: the streams cannot stay in step
    ask: bool = False  # hold a place under the daily cap, then call `answer`
    slots: tuple[str, ...] = ()  # SENT or RETURNED per place held, in the order they were held


@dataclass
class _Out:
    to_upstream: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)
    refused: list[str] = field(default_factory=list)
    close: str | None = None
    ask: bool = False
    slots: list[str] = field(default_factory=list)

    def result(self) -> Relayed:
        return Relayed(
            bytes(self.to_upstream),
            bytes(self.to_client),
            tuple(self.refused),
            self.close,
            self.ask,
            tuple(self.slots),
        )


class _Mode(enum.Enum):
    COMMAND = "command"  # client lines are commands
    WAITING = "waiting"  # DATA sent: client input held until the upstream's reply to it
    DATA = "data"  # message content, up to CRLF.CRLF
    CHUNK = "chunk"  # a BDAT chunk's octets
    ASKING = "asking"  # a RCPT awaits a place under the daily cap: client input held
    CLOSED = "closed"


class _Expect(enum.Enum):
    REPLY = "reply"  # the upstream's reply to a relayed command
    DATA_REPLY = "data-reply"  # … to DATA: 354 starts message content
    MESSAGE_END = "message-end"  # … to the end of a message a place was held for: 2xx sent it
    RESET = "reset"  # … to RSET, EHLO or HELO, which gave the transaction's place back


class SmtpCommandWatch:
    """Follows a logged-in SMTP session in both directions; refuses REFUSED_AFTER_LOGIN.

    Feed client bytes to `client_data` and upstream bytes to `upstream_data`, in the order they
    arrive, and write out what each returns. Command lines are relayed one by one (with CRLF
    line ends); message content (DATA up to CRLF.CRLF, BDAT chunks) is relayed as it comes and
    never looked into, except for where it ends. A refused command is not relayed: its reply goes
    to the client after the upstream's replies to the commands before it (RFC 2920 keeps replies
    in order), so a pipelining client stays in step.

    Where upstream implementations disagree on where message content ends (a lone dot between
    bare CR or LF line ends: SMTP smuggling), the watch cannot know what the upstream will read
    as commands, so it closes the session instead of guessing.
    """

    def __init__(
        self,
        *,
        chunking: bool = True,
        limits: SmtpWatchLimits = SmtpWatchLimits(),
        rules: SendingRules | None = None,
    ):
        self.chunking = chunking  # the upstream offered CHUNKING: BDAT carries a chunk
        self.limits = limits
        self.rules = rules  # the code's sending policy, or None
        self._slot = False  # the client's current transaction holds a place under the cap
        self._capped = False  # … was refused one: its other recipients are refused too
        self._asking: bytes | None = None  # the RCPT line awaiting a place
        self._mode = _Mode.COMMAND
        self._lines = LineBuffer(limits.max_line)
        self._queue: deque[_Expect | bytes] = deque()  # replies due to the client, in order
        self._held = bytearray()  # client input while WAITING
        self._chunk_left = 0
        self._data_tail = CRLF  # the last two octets of content relayed (CRLF at the start)
        self._data_held = b""  # a possible end of data, not yet relayed
        self._reply_head = b""  # the first octets of the upstream's current reply line

    @property
    def closed(self) -> bool:
        return self._mode is _Mode.CLOSED

    @property
    def waiting(self) -> bool:
        """The client's input is held until the upstream answers DATA (or the store answers for
        a place under the daily cap): stop reading the client."""
        return self._mode in (_Mode.WAITING, _Mode.ASKING)

    @property
    def queued(self) -> int:
        """Replies due to the client: the upstream's awaited and the proxy's own behind them."""
        return len(self._queue)

    @property
    def buffered(self) -> int:
        return self._lines.buffered + len(self._held) + len(self._data_held)

    def client_data(self, data: bytes) -> Relayed:
        out = _Out()
        if self._mode is not _Mode.CLOSED:
            self._feed_client(data, out)
        return out.result()

    def answer(self, granted: bool | None) -> Relayed:
        """The store's answer to `ask`: a place under the daily cap (True), none left today
        (False), or no answer (None: the store is unavailable). Held input then goes on."""
        out = _Out()
        line, self._asking = self._asking, None
        if self._mode is not _Mode.ASKING or line is None:
            return out.result()
        self._mode = _Mode.COMMAND
        if granted:
            self._slot = True
            if self._expect(_Expect.REPLY, out):
                out.to_upstream += line + CRLF
        elif granted is False:
            self._capped = True
            self._refuse(DAILY_CAP, _DAILY_CAP, out)
        else:
            self._refuse(NOT_COUNTED, _NOT_COUNTED, out)
        if self._mode is _Mode.COMMAND:
            held = bytes(self._held)
            self._held.clear()
            self._feed_client(held, out)
        return out.result()

    def upstream_data(self, data: bytes) -> Relayed:
        out = _Out()
        if self._mode is _Mode.CLOSED:
            return out.result()
        start = pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                self._reply_head = (self._reply_head + data[pos : pos + 4])[:4]
                break
            head = (self._reply_head + data[pos:end])[:4]
            self._reply_head = b""
            pos = end + 1
            if head[3:4] == b"-":
                continue  # RFC 5321 §4.2.1: a continuation line of a multiline reply
            out.to_client += data[start:pos]
            start = pos
            self._reply_done(head[:3], out)
            if self._mode is _Mode.CLOSED:
                return out.result()
        out.to_client += data[start:]
        return out.result()

    # -- the client's stream ------------------------------------------------------------------

    def _feed_client(self, data: bytes, out: _Out) -> None:
        while True:
            mode = self._mode
            if mode is _Mode.COMMAND:
                self._lines.feed(data)
                data = self._commands(out)
                if self._mode is _Mode.COMMAND:
                    return
            elif mode in (_Mode.WAITING, _Mode.ASKING):
                self._held += data
                if len(self._held) > self.limits.max_held:
                    self._close(f"client sent too much while {mode.value}", out)
                return
            elif mode is _Mode.DATA:
                rest = self._content(data, out)
                if rest is None or not self._expect(self._message_end(), out):
                    return
                self._mode = _Mode.COMMAND
                data = rest
            elif mode is _Mode.CHUNK:
                chunk = data[: self._chunk_left]
                out.to_upstream += chunk
                self._chunk_left -= len(chunk)
                data = data[len(chunk) :]
                if self._chunk_left:
                    return
                self._mode = _Mode.COMMAND
            else:
                return
            if self._mode is _Mode.CLOSED:
                return

    def _commands(self, out: _Out) -> bytes:
        """Relay or refuse complete command lines; return the raw input after a DATA or BDAT."""
        while self._mode is _Mode.COMMAND:
            line = self._lines.next_line()
            if line is None:
                return b""
            if isinstance(line, TooLong):
                self._local(_LINE_TOO_LONG, out)
                continue
            if b"\r" in line or b"\x00" in line:
                # An upstream might end a line at a bare CR or cut it at NUL: never relay one.
                self._local(_BARE_CR_OR_NUL, out)
                continue
            words = line.split(None, 1)
            verb = words[0].upper().decode("latin-1") if words else ""
            if verb in REFUSED_AFTER_LOGIN:
                out.refused.append(verb)
                self._local(REFUSED_AFTER_LOGIN[verb], out)
            elif self.rules is not None and verb in ("MAIL", "RCPT", "RSET", "EHLO", "HELO"):
                self._policed(verb, line, out)
            elif verb == "DATA":
                if self._expect(_Expect.DATA_REPLY, out):
                    out.to_upstream += line + CRLF
                    self._mode = _Mode.WAITING
            elif verb == "BDAT" and self.chunking:
                match = _BDAT.fullmatch(line.strip(b" \t"))
                size = int(match.group(1)) if match else -1
                if not 0 <= size <= self.limits.max_chunk:
                    self._local(_BAD_BDAT, out)
                    continue
                last = match is not None and match.group(2) is not None
                if self._expect(self._message_end() if last else _Expect.REPLY, out):
                    out.to_upstream += line + CRLF
                    self._chunk_left = size
                    self._mode = _Mode.CHUNK
            elif self._expect(_Expect.REPLY, out):
                out.to_upstream += line + CRLF
        if self._mode is _Mode.CLOSED:
            return b""
        return self._lines.clear()

    def _content(self, data: bytes, out: _Out) -> bytes | None:
        """Relay message content; return the input after CRLF.CRLF, or None until it comes.

        Looks only at a dot right after a line break. CRLF "." CRLF ends the content; a dot
        between line breaks where either is a bare CR or LF is ambiguous (RFC 5321 §4.1.1.4
        requires CRLF, but upstreams differ), and closes the session before it is relayed.
        """
        window = self._data_tail + self._data_held + data  # the tail was relayed already
        base = len(self._data_tail)
        self._data_held = b""
        pos = 1
        while True:
            match = _DOT_AFTER_BREAK.search(window, pos)
            if match is None:
                out.to_upstream += window[base:]
                self._data_tail = window[-2:]
                return None
            brk = match.start()  # the line break before the dot; window[brk - 1] exists
            after = window[brk + 2 : brk + 4]
            if after[:1] not in (b"\r", b"\n") and after:
                pos = brk + 1  # ".." (dot-stuffing) or ".text": content
                continue
            if after in (b"", b"\r"):  # a possible end: wait for the next octets
                out.to_upstream += window[base : brk + 1]
                self._data_tail = window[brk - 1 : brk + 1]
                self._data_held = window[brk + 1 :]
                return None
            if window[brk - 1 : brk + 4] == b"\r\n.\r\n":
                out.to_upstream += window[base : brk + 4]
                self._data_tail = CRLF
                return window[brk + 4 :]
            if brk > base:
                out.to_upstream += window[base:brk]
            out.to_client += _AMBIGUOUS_END
            self._close("bare CR or LF around the end of message data", out)
            return None

    # -- the sending policy -------------------------------------------------------------------

    def _policed(self, verb: str, line: bytes, out: _Out) -> None:
        """MAIL and RCPT under the code's policy; RSET, EHLO and HELO end the transaction."""
        rules = self.rules
        assert rules is not None
        if verb == "MAIL":
            self._capped = False
            if not rules.any_sender:
                box = mail_from(line)
                if box is None:
                    return self._refuse(BAD_SENDER, _BAD_SENDER, out)
                if not rules.sender_allowed(
                    box.local, box.domain, quoted=box.quoted, routed=box.routed
                ):
                    return self._refuse(SENDER_REFUSED, _SENDER_REFUSED, out)
        elif verb == "RCPT":
            if rules.rcpt_domains:
                box = rcpt_to(line)
                if box is None:
                    return self._refuse(BAD_RECIPIENT, _BAD_RECIPIENT, out)
                if not rules.recipient_allowed(
                    box.local, box.domain, quoted=box.quoted, routed=box.routed
                ):
                    return self._refuse(RECIPIENT_REFUSED, _RECIPIENT_REFUSED, out)
            if rules.max_per_day and not self._slot:
                if self._capped:
                    return self._refuse(DAILY_CAP, _DAILY_CAP, out)
                self._asking = line
                self._mode = _Mode.ASKING
                out.ask = True
                return None
        else:  # RSET, EHLO, HELO: the transaction ends, and its place is given back
            self._capped = False
            if self._slot:
                self._slot = False
                if self._expect(_Expect.RESET, out):
                    out.to_upstream += line + CRLF
                return None
        if self._expect(_Expect.REPLY, out):
            out.to_upstream += line + CRLF
        return None

    def _refuse(self, what: str, reply: bytes, out: _Out) -> None:
        out.refused.append(what)
        self._local(reply, out)

    def _message_end(self) -> _Expect:
        """The expectation for the end of a message: it uses the transaction's place, if any."""
        self._capped = False
        if self._slot:
            self._slot = False
            return _Expect.MESSAGE_END
        return _Expect.REPLY

    # -- replies ------------------------------------------------------------------------------

    def _expect(self, what: _Expect, out: _Out) -> bool:
        """Await the upstream's reply to a command; False (and closed) if the queue is full, and
        then the command is not relayed."""
        return self._enqueue(what, out)

    def _local(self, reply: bytes, out: _Out) -> None:
        """A reply of the proxy's own, in its place among the upstream's."""
        if self._queue:
            self._enqueue(reply, out)
        else:
            out.to_client += reply

    def _enqueue(self, entry: _Expect | bytes, out: _Out) -> bool:
        """Every queued reply counts, the proxy's own too, so the queue never outgrows the limit:
        past it, 421 and close."""
        if len(self._queue) >= self.limits.max_outstanding:
            out.to_client += _TOO_MANY_QUEUED
            self._close("too many commands awaiting replies", out)
            return False
        self._queue.append(entry)
        return True

    def _reply_done(self, code: bytes, out: _Out) -> None:
        """The upstream finished one reply: release what follows it."""
        if not self._queue:
            return  # unsolicited, such as 421 before the upstream closes
        expected = self._queue.popleft()
        assert isinstance(expected, _Expect)
        if expected is _Expect.MESSAGE_END:
            out.slots.append(SENT if code[:1] == b"2" else RETURNED)
        elif expected is _Expect.RESET:
            out.slots.append(RETURNED)
        if expected is _Expect.DATA_REPLY:
            if code == b"354":
                self._mode = _Mode.DATA
                self._data_tail = CRLF
                self._data_held = b""
            else:
                self._mode = _Mode.COMMAND
        elif code == b"354":
            self._close("upstream asked for message content outside DATA", out)
            return
        self._flush(out)
        if expected is _Expect.DATA_REPLY:
            held = bytes(self._held)
            self._held.clear()
            self._feed_client(held, out)

    def _flush(self, out: _Out) -> None:
        while self._queue and isinstance(reply := self._queue[0], bytes):
            self._queue.popleft()
            out.to_client += reply

    def _close(self, reason: str, out: _Out) -> None:
        out.close = reason
        self._mode = _Mode.CLOSED
        self._queue.clear()
        self._held.clear()
        self._lines.clear()
        self._data_held = b""
