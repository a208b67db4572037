"""Specification of the SMTP command watch (proxy/smtp/watch.py): a logged-in session followed
in both directions, the proxy's own refusals slotted into the reply stream in order."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.codes.sending import SendingPolicy, resolve
from proxy.smtp.watch import RETURNED, SENT, SmtpCommandWatch, SmtpWatchLimits
from tests.support.streams import split_at


class Session:
    """A watch between a scripted client and upstream; collects what each side receives."""

    def __init__(self, **kwargs):
        self.watch = SmtpCommandWatch(**kwargs)
        self.upstream = bytearray()
        self.client = bytearray()
        self.refused: list[str] = []
        self.closed: str | None = None
        self.asked = 0
        self.slots: list[str] = []

    def _apply(self, result):
        self.upstream += result.to_upstream
        self.client += result.to_client
        self.refused += result.refused
        self.closed = self.closed or result.close
        self.asked += result.ask
        self.slots += result.slots
        return self

    def answer(self, granted) -> Session:
        return self._apply(self.watch.answer(granted))

    def send(self, data: bytes) -> Session:
        self._apply(self.watch.client_data(data))
        return self

    def reply(self, data: bytes) -> Session:
        self._apply(self.watch.upstream_data(data))
        return self


def test_watch_relays_commands_and_replies_unchanged():
    s = Session().send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert bytes(s.upstream) == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    s.reply(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert bytes(s.client) == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert s.refused == [] and s.closed is None


def test_watch_refuses_xclient_sent_after_login_with_nothing_outstanding():
    s = Session().send(b"XCLIENT LOGIN=bob ADDR=10.0.0.1\r\n")
    assert bytes(s.upstream) == b""
    assert bytes(s.client) == b"550 5.7.0 Error: XCLIENT not permitted\r\n"
    assert s.refused == ["XCLIENT"]


def test_watch_refuses_pipelined_xclient_and_keeps_the_replies_in_order():
    s = Session().send(b"MAIL FROM:<a@b>\r\n  xclient LOGIN=bob\r\nRCPT TO:<c@d>\r\n")
    assert bytes(s.upstream) == b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
    assert bytes(s.client) == b""  # the refusal waits for the reply to MAIL
    s.reply(b"250 2.1.0 Ok\r\n")
    assert bytes(s.client) == b"250 2.1.0 Ok\r\n550 5.7.0 Error: XCLIENT not permitted\r\n"
    s.reply(b"250 2.1.5 Ok\r\n")
    assert bytes(s.client).endswith(b"not permitted\r\n250 2.1.5 Ok\r\n")
    assert s.refused == ["XCLIENT"]


def test_watch_never_looks_into_data_content_containing_xclient():
    content = (
        b"Subject: XCLIENT\r\n\r\nXCLIENT ADDR=6.6.6.6\r\nXFORWARD NAME=x\r\n"
        b"..\r\n.XCLIENT\r\nSTARTTLS\r\n"
    )
    s = Session().send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    s.reply(b"250 Ok\r\n250 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    s.send(content + b".\r\n")
    assert bytes(s.upstream).endswith(b"DATA\r\n" + content + b".\r\n")
    assert s.refused == [] and s.closed is None


def test_watch_refuses_xclient_after_the_end_of_data():
    s = Session().send(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    s.reply(b"250 Ok\r\n250 Ok\r\n354 go\r\n")
    s.send(b"XCLIENT in content\r\n.\r\nXCLIENT LOGIN=bob\r\nQUIT\r\n")
    assert bytes(s.upstream).endswith(b"XCLIENT in content\r\n.\r\nQUIT\r\n")
    assert s.refused == ["XCLIENT"]
    s.reply(b"250 2.0.0 queued\r\n221 Bye\r\n")
    assert bytes(s.client).endswith(
        b"250 2.0.0 queued\r\n550 5.7.0 Error: XCLIENT not permitted\r\n221 Bye\r\n"
    )


def test_watch_holds_input_after_data_until_the_upstream_answers():
    s = Session().send(b"DATA\r\nXCLIENT LOGIN=bob\r\n")
    assert s.watch.waiting and bytes(s.upstream) == b"DATA\r\n"
    s.reply(b"354 go\r\n")  # it was content after all
    assert not s.watch.waiting and s.refused == []
    assert bytes(s.upstream) == b"DATA\r\nXCLIENT LOGIN=bob\r\n"


def test_watch_reads_input_after_a_refused_data_as_commands():
    s = Session().send(b"DATA\r\nXCLIENT LOGIN=bob\r\nNOOP\r\n")
    s.reply(b"554 5.5.1 Error: no valid recipients\r\n")
    assert s.refused == ["XCLIENT"]
    assert bytes(s.upstream) == b"DATA\r\nNOOP\r\n"
    assert bytes(s.client) == (
        b"554 5.5.1 Error: no valid recipients\r\n550 5.7.0 Error: XCLIENT not permitted\r\n"
    )


def test_watch_passes_an_empty_message():
    s = Session().send(b"DATA\r\n").reply(b"354 go\r\n").send(b".\r\nNOOP\r\n")
    assert bytes(s.upstream) == b"DATA\r\n.\r\nNOOP\r\n"


@pytest.mark.parametrize(
    "content",
    [
        b"hi\n.\nXCLIENT LOGIN=bob\r\n",
        b"hi\r\n.\nQUIT\r\n",
        b"hi\n.\r\nXCLIENT x\r\n",
        b"hi\r.\r\nXCLIENT x\r\n",
        b".\nXCLIENT x\r\n",
        b"hi\r\n.\rXCLIENT\r\n",
    ],
)
def test_watch_closes_rather_than_guess_at_a_bare_cr_or_lf_end_of_data(content):
    s = Session().send(b"DATA\r\n").reply(b"354 go\r\n").send(content)
    assert s.closed and s.watch.closed
    assert b".\n" not in bytes(s.upstream) and b"\r.\r" not in bytes(s.upstream)
    assert b"XCLIENT" not in bytes(s.upstream)
    assert bytes(s.client).endswith(b"521 5.5.2 Error: bare <CR> or <LF> at end of data\r\n")
    assert s.watch.client_data(b"NOOP\r\n").to_upstream == b""


def test_watch_passes_bdat_chunks_through_unread():
    chunk = b"XCLIENT ADDR=6.6.6.6\r\n"
    s = Session().send(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"XCLIENT ADDR=7.7.7.7\r\n")
    assert bytes(s.upstream) == b"BDAT %d LAST\r\n" % len(chunk) + chunk
    assert s.refused == ["XCLIENT"]
    s.reply(b"250 2.0.0 queued\r\n")
    assert bytes(s.client) == b"250 2.0.0 queued\r\n550 5.7.0 Error: XCLIENT not permitted\r\n"


@pytest.mark.parametrize(
    "line", [b"BDAT", b"BDAT x", b"BDAT 10 LAST extra", b"BDAT -1", b"BDAT 99999999999"]
)
def test_watch_refuses_a_bdat_whose_chunk_size_it_cannot_be_sure_of(line):
    s = Session().send(line + b"\r\nXCLIENT x\r\n")
    assert bytes(s.upstream) == b""
    assert bytes(s.client) == (
        b"501 5.5.4 Syntax: BDAT count [LAST]\r\n550 5.7.0 Error: XCLIENT not permitted\r\n"
    )


def test_watch_without_chunking_reads_what_follows_bdat_as_commands():
    s = Session(chunking=False).send(b"BDAT 22\r\nXCLIENT ADDR=6.6.6.6\r\n")
    assert bytes(s.upstream) == b"BDAT 22\r\n" and s.refused == ["XCLIENT"]


@pytest.mark.parametrize("verb", ["STARTTLS", "XFORWARD", "TURN", "ATRN"])
def test_watch_refuses_commands_that_would_blind_it_or_borrow_the_proxys_trust(verb):
    s = Session().send(verb.lower().encode() + b" x\r\n")
    assert bytes(s.upstream) == b"" and s.refused == [verb]
    assert bytes(s.client).startswith((b"550 5.7.0", b"503 5.5.1", b"502 5.5.1"))


def test_watch_relays_command_lines_with_crlf_line_ends():
    s = Session().send(b"NOOP\nRSET\r\n")
    assert bytes(s.upstream) == b"NOOP\r\nRSET\r\n"


@pytest.mark.parametrize("line", [b"NOOP\rXCLIENT LOGIN=bob", b"NOOP\x00XCLIENT LOGIN=bob"])
def test_watch_refuses_bare_cr_and_nul_in_command_lines(line):
    s = Session().send(line + b"\r\n")
    assert bytes(s.upstream) == b""
    assert bytes(s.client) == b"500 5.5.2 Error: bare <CR> or <NUL> in command\r\n"


def test_watch_refuses_command_lines_too_long_to_relay_safely():
    s = Session().send(b"NOOP " + b"x" * 3000 + b" XCLIENT LOGIN=bob\r\nNOOP\r\n")
    assert bytes(s.upstream) == b"NOOP\r\n"
    assert bytes(s.client) == b"500 5.5.2 Error: line too long\r\n"


def test_watch_counts_a_multiline_reply_once():
    s = Session().send(b"EHLO x\r\nXCLIENT\r\n")
    s.reply(b"250-mx\r\n250-PIPE")
    assert bytes(s.client) == b"250-mx\r\n250-PIPE"
    s.reply(b"LINING\r\n250 8BITMIME\r\n")
    assert bytes(s.client) == (
        b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n550 5.7.0 Error: XCLIENT not permitted\r\n"
    )


def test_watch_closes_when_a_client_floods_before_the_reply_to_data():
    s = Session(limits=SmtpWatchLimits(max_held=10)).send(b"DATA\r\n" + b"x" * 11)
    assert s.closed and s.watch.buffered == 0


def test_watch_closes_when_the_upstream_asks_for_content_outside_data():
    s = Session().send(b"NOOP\r\n").reply(b"354 go\r\n")
    assert s.closed


def test_watch_closes_when_too_many_commands_await_replies():
    s = Session(limits=SmtpWatchLimits(max_outstanding=3)).send(b"NOOP\r\n" * 4)
    assert s.closed
    assert bytes(s.upstream) == b"NOOP\r\n" * 3  # the one it cannot await is not relayed
    assert bytes(s.client) == TOO_MANY


TOO_MANY = b"421 4.7.0 Error: too many commands awaiting replies, closing connection\r\n"


def test_refusals_queued_behind_a_slow_upstream_are_bounded_then_421_and_close():
    """The review's flood: a logged-in client pipelines XCLIENT behind one command the upstream
    does not answer; each refusal waits for that reply, and used to wait without bound."""
    limits = SmtpWatchLimits(max_outstanding=1000)
    s = Session(limits=limits).send(b"NOOP\r\n")
    flood = b"XCLIENT LOGIN=bob\r\n" * 100
    for _ in range(9):
        s.send(flood)
        assert s.watch.queued <= 1000 and not s.closed
    s.send(flood)
    assert s.watch.queued == 0 and s.closed == "too many commands awaiting replies"
    assert bytes(s.client) == TOO_MANY
    assert bytes(s.upstream) == b"NOOP\r\n"
    assert s.watch.client_data(flood).to_client == b""  # closed: nothing more is read


# What a client may pipeline after login: commands relayed (awaiting a reply), commands refused
# (a reply of the proxy's own, queued behind those), and lines the watch refuses as malformed.
FLOOD_LINE = st.sampled_from(
    [
        b"XCLIENT LOGIN=bob",
        b"XFORWARD ADDR=10.0.0.1",
        b"STARTTLS",
        b"TURN",
        b"NOOP",
        b"RCPT TO:<a@b>",
        b"NOOP\rXCLIENT",
        b"x" * 80,
        b"BDAT x",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(FLOOD_LINE, max_size=80),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    limit=st.integers(min_value=1, max_value=20),
)
def test_the_reply_queue_never_exceeds_its_limit_while_the_upstream_is_silent(lines, cuts, limit):
    stream = b"".join(line + b"\r\n" for line in lines)
    s = Session(limits=SmtpWatchLimits(max_line=64, max_outstanding=limit))
    for piece in split_at(stream, cuts):
        s.send(piece)
        assert s.watch.queued <= limit
    if s.closed:
        assert s.closed == "too many commands awaiting replies"
        assert bytes(s.client).endswith(TOO_MANY) and s.watch.queued == 0


def test_watch_passes_unsolicited_upstream_replies():
    s = Session().reply(b"421 4.4.2 mx Error: timeout exceeded\r\n")
    assert bytes(s.client) == b"421 4.4.2 mx Error: timeout exceeded\r\n"


# --- the watch against a simulated upstream (properties) -------------------------------------

FORBIDDEN = {b"XCLIENT", b"XFORWARD", b"STARTTLS", b"TURN", b"ATRN"}


class FakeUpstream:
    """An SMTP server after login, reading its input the way real ones differ: a line ends at
    CRLF only ("crlf"), at LF with one CR before it dropped, as Postfix ("lf"), or at any of CR,
    LF and CRLF ("any"). A "." line ends DATA; a BDAT chunk is read whatever the reply."""

    def __init__(self, *, flavor: str, chunking: bool = True, strict: bool = False):
        self.flavor = flavor
        self.chunking = chunking
        self.strict = strict  # as real servers: a message or EHLO ends the transaction
        self.buf = bytearray()
        self.mode = "command"
        self.chunk_left = 0
        self.last_chunk = False
        self.recipients = False
        self.executed: list[bytes] = []
        self.lines: list[bytes] = []  # every command line, as executed
        self.messages = 0  # messages accepted (an end of data, a BDAT LAST, with recipients)
        self.content = bytearray()

    def _line(self) -> bytes | None:
        if self.flavor == "crlf":
            end, size = self.buf.find(b"\r\n"), 2
        elif self.flavor == "lf":
            end, size = self.buf.find(b"\n"), 1
        else:
            ends = [i for i in (self.buf.find(b"\r"), self.buf.find(b"\n")) if i >= 0]
            end = min(ends, default=-1)
            if end >= 0 and self.buf[end : end + 1] == b"\r":
                if end + 1 == len(self.buf):
                    return None  # CR or CRLF: not known yet
                size = 2 if self.buf[end + 1 : end + 2] == b"\n" else 1
            else:
                size = 1
        if end < 0:
            return None
        line = bytes(self.buf[:end])
        del self.buf[: end + size]
        return line[:-1] if self.flavor == "lf" and line.endswith(b"\r") else line

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        while True:
            if self.mode == "chunk":
                step = min(self.chunk_left, len(self.buf))
                self.content += self.buf[:step]
                del self.buf[:step]
                self.chunk_left -= step
                if self.chunk_left:
                    break
                self.mode = "command"
                if self.strict and self.last_chunk:
                    if not self.recipients:
                        out += b"554 5.5.1 Error: no valid recipients\r\n"
                        continue
                    self.messages += 1
                    self.recipients = False
                out += b"250 2.0.0 Ok BDAT\r\n"
                continue
            line = self._line()
            if line is None:
                break
            if self.mode == "data":
                if line == b".":
                    self.mode = "command"
                    if self.strict:
                        self.messages += 1
                        self.recipients = False
                    out += b"250 2.0.0 Ok queued\r\n"
                else:
                    self.content += line + b"\n"
                continue
            words = line.split()
            verb = words[0].upper() if words else b""
            self.executed.append(verb)
            self.lines.append(line)
            if verb == b"DATA":
                if self.recipients:
                    self.mode = "data"
                    out += b"354 End data with <CR><LF>.<CR><LF>\r\n"
                else:
                    out += b"554 5.5.1 Error: no valid recipients\r\n"
            elif verb == b"BDAT" and self.chunking and len(words) in (2, 3) and words[1].isdigit():
                self.chunk_left = int(words[1])
                self.last_chunk = len(words) == 3 and words[2].upper() == b"LAST"
                self.mode = "chunk"
            elif verb in (b"MAIL", b"RSET"):
                self.recipients = False
                out += b"250 2.0.0 Ok " + verb + b"\r\n"
            elif verb == b"RCPT":
                self.recipients = True
                out += b"250 2.1.5 Ok RCPT\r\n"
            elif verb == b"EHLO":
                self.recipients = self.recipients and not self.strict
                out += b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
            else:
                if verb == b"HELO" and self.strict:
                    self.recipients = False
                out += b"250 2.0.0 Ok " + verb + b"\r\n"
        return bytes(out)


def run_watch(stream: bytes, cuts: list[int], *, flavor: str, chunking: bool, eager: bool):
    """Pass a client stream through a watch to a FakeUpstream; return (upstream, client, watch).
    eager: the upstream answers after every chunk; otherwise only when the client has sent all."""
    watch = SmtpCommandWatch(chunking=chunking)
    upstream = FakeUpstream(flavor=flavor, chunking=chunking)
    to_client = bytearray()
    replies_due = bytearray()

    def deliver(result):
        nonlocal replies_due
        to_client.extend(result.to_client)
        replies_due += upstream.feed(result.to_upstream)

    def flush():
        nonlocal replies_due
        while replies_due and not watch.closed:
            due, replies_due = bytes(replies_due), bytearray()
            deliver(watch.upstream_data(due))

    for chunk in split_at(stream, cuts):
        deliver(watch.client_data(chunk))
        if eager:
            flush()
    flush()
    return upstream, bytes(to_client), watch


LINE_END = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
COMMAND = st.sampled_from(
    [
        b"MAIL FROM:<a@b>",
        b"RCPT TO:<c@d>",
        b"DATA",
        b"RSET",
        b"NOOP",
        b"EHLO h",
        b"BDAT x",
        b"BDAT 3 LAST",
        b"XCLIENT ADDR=6.6.6.6",
        b" xclient login=bob",
        b"XFORWARD ADDR=1.1.1.1",
        b"\tSTARTTLS",
        b"TURN",
        b"NOOP\rXCLIENT LOGIN=bob",
        b"NOOP\x00XCLIENT LOGIN=bob",
    ]
)
SMUGGLED = st.sampled_from([b"XCLIENT ADDR=6.6.6.6", b".", b"..", b"hello", b"", b"DATA"])
ITEMS = st.lists(
    st.one_of(
        # a command line
        st.tuples(COMMAND, LINE_END).map(b"".join),
        # a BDAT chunk, its declared size sometimes off by one
        st.builds(
            lambda payload, delta, last: (
                b"BDAT %d%s\r\n" % (max(0, len(payload) + delta), b" LAST" if last else b"")
                + payload
            ),
            st.sampled_from([b"XCLIENT ADDR=6.6.6.6\r\n", b"\r\n.\r\n", b"abc"])
            | st.binary(max_size=10),
            st.sampled_from([0, 0, 0, -1, 1]),
            st.booleans(),
        ),
        # a transaction's envelope, up to DATA
        st.just(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"),
        # message content, an end of data (well formed or smuggled), and lines after it
        st.builds(
            lambda lines, end, after: b"".join(a + b for a, b in [*lines, (end, b""), *after]),
            st.lists(st.tuples(SMUGGLED, LINE_END), max_size=4),
            st.sampled_from([b".\r\n", b".\n", b".\r", b".\r\r\n", b""]),
            st.lists(st.tuples(SMUGGLED, LINE_END), max_size=2),
        ),
        st.binary(max_size=8),
    ),
    max_size=25,
)
FLAVOR = st.sampled_from(["crlf", "lf", "any"])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=ITEMS,
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    flavor=FLAVOR,
    chunking=st.booleans(),
    eager=st.booleans(),
)
def test_no_upstream_ever_executes_a_refused_command_whatever_the_client_sends(
    items, cuts, flavor, chunking, eager
):
    upstream, _, _ = run_watch(b"".join(items), cuts, flavor=flavor, chunking=chunking, eager=eager)
    assert not FORBIDDEN & set(upstream.executed)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=ITEMS,
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    flavor=FLAVOR,
    chunking=st.booleans(),
)
def test_watch_output_does_not_depend_on_how_input_is_chunked(items, cuts, flavor, chunking):
    stream = b"".join(items)
    whole = run_watch(stream, [], flavor=flavor, chunking=chunking, eager=False)
    split = run_watch(stream, cuts, flavor=flavor, chunking=chunking, eager=False)
    assert split[0].executed == whole[0].executed
    assert split[1] == whole[1]


@settings(max_examples=300, deadline=None)
@given(
    content=st.lists(st.tuples(SMUGGLED, LINE_END), max_size=4),
    end=st.sampled_from([b".\r\n", b".\n", b".\r", b".\r\r\n", b".\rX", b""]),
    after=st.lists(st.tuples(SMUGGLED | COMMAND, LINE_END), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    flavor=FLAVOR,
)
def test_no_end_of_data_variant_smuggles_a_command_past_the_watch(
    content, end, after, cuts, flavor
):
    stream = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + b"".join(
        a + b for a, b in [*content, (end, b""), *after]
    )
    upstream, _, _ = run_watch(stream, cuts, flavor=flavor, chunking=True, eager=True)
    assert not FORBIDDEN & set(upstream.executed)


PIPELINED = {
    b"NOOP": b"250 2.0.0 Ok NOOP\r\n",
    b"RSET": b"250 2.0.0 Ok RSET\r\n",
    b"MAIL FROM:<a@b>": b"250 2.0.0 Ok MAIL\r\n",
    b"RCPT TO:<c@d>": b"250 2.1.5 Ok RCPT\r\n",
    b"VRFY bob": b"250 2.0.0 Ok VRFY\r\n",
    b"EHLO h": b"250-mx\r\n250-PIPELINING\r\n250 CHUNKING\r\n",
    b"XCLIENT ADDR=6.6.6.6": b"550 5.7.0 Error: XCLIENT not permitted\r\n",
    b"XFORWARD NAME=x": b"550 5.7.0 Error: XFORWARD not permitted\r\n",
    b"STARTTLS": b"503 5.5.1 Error: STARTTLS not permitted after authentication\r\n",
}


@settings(max_examples=200, deadline=None)
@given(
    commands=st.lists(st.sampled_from(sorted(PIPELINED)), max_size=20),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    eager=st.booleans(),
)
def test_replies_reach_a_pipelining_client_in_command_order(commands, cuts, eager):
    stream = b"".join(command + b"\r\n" for command in commands)
    _, to_client, _ = run_watch(stream, cuts, flavor="crlf", chunking=True, eager=eager)
    assert to_client == b"".join(PIPELINED[command] for command in commands)


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=200), max_size=30),
    upstream=st.lists(st.binary(max_size=60), max_size=30),
)
def test_watch_never_raises_on_arbitrary_bytes_and_stays_bounded(chunks, upstream):
    limits = SmtpWatchLimits(max_line=64, max_held=128, max_outstanding=20)
    watch = SmtpCommandWatch(limits=limits)
    for data, reply in zip(chunks, upstream + [b""] * len(chunks), strict=False):
        watch.client_data(data)
        watch.upstream_data(reply)
        assert watch.buffered <= limits.max_line + limits.max_held + 2


MESSAGE_LINE = st.sampled_from(
    [
        b"XCLIENT ADDR=6.6.6.6",
        b"XFORWARD NAME=evil",
        b"STARTTLS",
        b"..",
        b"..XCLIENT",
        b"BDAT 5",
        b"DATA",
        b"QUIT",
        b"",
    ]
) | st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(MESSAGE_LINE, max_size=30), cuts=st.lists(st.integers(min_value=0), max_size=20)
)
def test_well_formed_message_content_is_relayed_byte_for_byte(lines, cuts):
    # RFC 5321 §4.5.2: the client stuffs a leading dot; a lone "." only ends the content.
    content = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    stream = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + content + b".\r\nNOOP\r\n"
    upstream, to_client, watch = run_watch(stream, cuts, flavor="crlf", chunking=True, eager=True)
    assert not watch.closed and b"550" not in to_client
    assert upstream.executed == [b"MAIL", b"RCPT", b"DATA", b"NOOP"]
    assert bytes(upstream.content) == content.replace(b"\r\n", b"\n")


# --- a code's sending policy --------------------------------------------------------------------

# The printer of the README: may send as scanner@example.org, to example.org, ten a day.
PRINTER = resolve(
    SendingPolicy(("scanner@example.org",), ("example.org",), 10), ("printer1",), "printer1"
)
UNCAPPED = resolve(SendingPolicy(("own",), ("example.org",), None), ("a@example.org",), "a")


def test_a_sender_the_code_may_not_use_is_refused_and_the_session_goes_on():
    s = Session(rules=PRINTER).send(b"MAIL FROM:<boss@example.org>\r\nNOOP\r\n")
    assert bytes(s.upstream) == b"NOOP\r\n"
    assert s.refused == ["MAIL FROM (sender not allowed)"] and s.closed is None
    assert bytes(s.client).startswith(b"550 5.7.1 ")
    s.reply(b"250 2.0.0 Ok\r\n").send(b"MAIL FROM:<Scanner@Example.org> SIZE=9\r\n")
    assert bytes(s.upstream).endswith(b"MAIL FROM:<Scanner@Example.org> SIZE=9\r\n")


@pytest.mark.parametrize(
    "recipient",
    [
        b"<boss@example.com>",
        b"<boss@sub.example.org>",
        b"<boss%evil.example@example.org>",
        b"<@example.org:boss@evil.example>",
        b'<"boss"@example.org>',
        b"<boss@[192.0.2.1]>",
    ],
)
def test_a_recipient_outside_the_codes_domains_is_refused(recipient):
    s = Session(rules=UNCAPPED).send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:" + recipient + b"\r\n")
    assert bytes(s.upstream) == b"MAIL FROM:<a@example.org>\r\n"
    s.reply(b"250 2.1.0 Ok\r\n")
    assert bytes(s.client) == (
        b"250 2.1.0 Ok\r\n550 5.7.1 Error: recipient address not allowed for this app password\r\n"
    )
    assert s.refused == ["RCPT TO (recipient not allowed)"]


def test_a_path_the_watch_cannot_read_exactly_is_refused_not_guessed():
    s = Session(rules=PRINTER).send(b"MAIL FROM:scanner@example.org\r\n")
    assert bytes(s.client) == b"501 5.1.7 Error: bad sender address syntax\r\n"
    assert bytes(s.upstream) == b""


def test_under_a_daily_cap_the_first_recipient_waits_for_a_place_and_input_is_held():
    s = Session(rules=PRINTER).send(
        b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    assert s.asked == 1 and s.watch.waiting
    assert bytes(s.upstream) == b"MAIL FROM:<scanner@example.org>\r\n"
    s.answer(True)
    assert s.asked == 1  # one place per message, not per recipient
    assert bytes(s.upstream).endswith(
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    s.reply(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n").send(b"scan\r\n.\r\n")
    assert s.slots == []
    s.reply(b"250 2.0.0 Ok: queued\r\n")
    assert s.slots == [SENT]


def test_when_the_days_places_are_taken_every_recipient_of_the_message_gets_452():
    s = Session(rules=PRINTER).send(
        b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n"
    )
    s.reply(b"250 Ok\r\n").answer(False)
    assert s.asked == 1  # the second recipient is not asked about again
    assert bytes(s.client) == b"250 Ok\r\n" + 2 * (
        b"452 4.7.0 Error: daily message limit of this app password reached\r\n"
    )
    assert s.refused == ["RCPT TO (daily message limit)"] * 2 and s.closed is None
    s.send(b"RSET\r\nMAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n")
    assert s.asked == 2  # a new message asks again


def test_a_store_that_cannot_answer_refuses_the_recipient_as_temporary():
    s = Session(rules=PRINTER).send(
        b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
    )
    s.reply(b"250 Ok\r\n").answer(None)
    assert bytes(s.client).endswith(
        b"451 4.3.0 Error: cannot count messages now, try again later\r\n"
    )
    assert bytes(s.upstream) == b"MAIL FROM:<scanner@example.org>\r\n"


@pytest.mark.parametrize("reset", [b"RSET", b"EHLO printer", b"HELO printer"])
def test_a_reset_gives_the_place_back_when_the_upstream_answers_it(reset):
    s = Session(rules=PRINTER).send(
        b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
    )
    s.answer(True).send(reset + b"\r\n")
    assert s.slots == []
    s.reply(b"250 Ok\r\n250 Ok\r\n")
    assert s.slots == []
    s.reply(b"250 Ok\r\n")
    assert s.slots == [RETURNED]


def test_a_message_the_upstream_refuses_gives_its_place_back():
    s = Session(rules=PRINTER).send(
        b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
    )
    s.answer(True).send(b"BDAT 4 LAST\r\nscan")
    s.reply(b"250 Ok\r\n250 Ok\r\n554 5.7.1 rejected\r\n")
    assert s.slots == [RETURNED]


def test_a_message_pipelined_behind_an_accepted_one_needs_its_own_place():
    envelope = b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
    s = Session(rules=PRINTER).send(envelope).answer(True).send(b"BDAT 1 LAST\r\nx" + envelope)
    assert s.asked == 2  # asked before the first message's reply came
    s.answer(True).reply(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n")
    assert s.slots == [SENT]


POLICY_ADDRESS = st.sampled_from(
    [
        b"<scanner@example.org>",
        b"<SCANNER@Example.ORG>",
        b"<other@example.org>",
        b"<scanner@example.org.evil.example>",
        b"<scanner@evil.example>",
        b"<@evil.example:scanner@example.org>",
        b"<@example.org:boss@evil.example>",
        b'<"scanner"@example.org>',
        b'<"a>b"@example.org>',
        b"<boss%evil.example@example.org>",
        b"<boss!evil.example@example.org>",
        b"<>",
        b"scanner@example.org",
        b"<scanner@example.org> SIZE=10",
        b"<scanner@example.org>x",
        b"<scanner@example.org",
        b"< scanner@example.org>",
        b"<scanner@[10.0.0.1]>",
        b"<a@b@example.org>",
        b"<boss@example.org> <boss@evil.example>",
    ]
)
POLICY_COMMAND = st.one_of(
    st.tuples(
        st.sampled_from([b"MAIL FROM:", b"mail from: ", b"MAIL  FROM:", b"RCPT TO:", b"rcpt to: "]),
        POLICY_ADDRESS,
    ).map(lambda parts: parts[0] + parts[1] + b"\r\n"),
    st.sampled_from(
        [
            b"DATA\r\nscan\r\n.\r\n",
            b"BDAT 4 LAST\r\nscan",
            b"BDAT 2\r\nsc",
            b"RSET\r\n",
            b"EHLO printer\r\n",
            b"NOOP\r\n",
            b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<boss@example.org>\r\nDATA\r\nx\r\n.\r\n",
        ]
    ),
)


def _first_path(line: bytes) -> bytes:
    """The address an upstream reads, as a lenient one would: the first <...>."""
    start = line.index(b"<") + 1
    return line[start : line.index(b">", start)]


def run_policed(stream: bytes, cuts: list[int], places: int, eager: bool):
    """The printer's watch before a transactional FakeUpstream, its store granting `places`
    places under the cap: (upstream, slot events, places granted)."""
    watch = SmtpCommandWatch(chunking=True, rules=PRINTER)
    upstream = FakeUpstream(flavor="crlf", chunking=True, strict=True)
    replies_due = bytearray()
    events: list[str] = []
    granted = 0

    def deliver(result):
        nonlocal granted
        replies_due.extend(upstream.feed(result.to_upstream))
        events.extend(result.slots)
        if result.ask:
            ok = granted < places
            granted += ok
            deliver(watch.answer(ok))

    def flush():
        while replies_due and not watch.closed:
            due = bytes(replies_due)
            replies_due.clear()
            deliver(watch.upstream_data(due))

    for chunk in split_at(stream, cuts):
        deliver(watch.client_data(chunk))
        if eager:
            flush()
    flush()
    return upstream, events, granted


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    commands=st.lists(POLICY_COMMAND, max_size=30),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
    places=st.integers(min_value=0, max_value=4),
    eager=st.booleans(),
)
def test_no_upstream_ever_sees_a_sender_or_recipient_the_policy_refuses_nor_one_message_too_many(
    commands, cuts, places, eager
):
    upstream, events, granted = run_policed(b"".join(commands), cuts, places, eager)
    for line in upstream.lines:
        verb = line[:4].upper()
        if verb == b"MAIL":
            assert _first_path(line).lower() == b"scanner@example.org", line
        elif verb == b"RCPT":
            local, _, domain = _first_path(line).rpartition(b"@")
            assert domain.lower() == b"example.org" and local, line
            assert not set(local) & set(b'%!@"') and not local.startswith(b"@"), line
    assert upstream.messages <= granted <= places
    assert events.count(SENT) == upstream.messages
    assert events.count(SENT) + events.count(RETURNED) <= granted
