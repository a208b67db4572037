"""The relay's splice(2) path over real loopback TCP: what the copy path guarantees still holds
(bytes intact both ways, the buffering bound under a stalled reader, half-close, close_with),
and a real proxy splices only sessions that are plaintext on both sides, with no command watch.

Same layout as test_relay.py: client peer --TCP--> [front | relay | up] --TCP--> upstream peer.
"""

from __future__ import annotations

import fcntl
import hashlib
import imaplib
import random
import smtplib
import ssl
import termios
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from zope.interface import implementer

from proxy.relay import BUFFER_BOUND_SPLICE, SPLICE_AFTER, RelayResult
from tests.integration.harness import start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.support.relayharness import (
    TIMEOUT,
    Env,
    Flow,
    Peer,
    SlowReader,
    Source,
    wait,
    write_buffered,
)

pytestmark = pytest.mark.integration

MB = 10**6


async def until(condition, what: str) -> None:
    """Poll `condition` every few milliseconds until it holds, or fail after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.005, lambda: None)


async def spliced(env: Env) -> None:
    await until(lambda: env.relay.splicer is not None, "the relay to splice")


# --- bytes both ways ----------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol, IPushProducer)
class Streamer(protocol.Protocol):
    """Sends `total` seeded random octets when `go()` is called (as fast as its transport takes
    them), and half-closes on `finish()`; hashes what it receives until the other side's EOF."""

    CHUNK = 256 * 1024

    def __init__(self, total: int, seed: int):
        self.remaining, self.rng = total, random.Random(seed)
        self.sent, self.got = hashlib.sha256(), hashlib.sha256()
        self.count = 0
        self.paused = False
        self.eof = defer.Deferred()
        self.lost = defer.Deferred()

    def go(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.remaining:
            chunk = self.rng.randbytes(min(self.CHUNK, self.remaining))
            self.remaining -= len(chunk)
            self.sent.update(chunk)
            self.transport.write(chunk)
        if not self.remaining and not self.paused:
            self.transport.unregisterProducer()
            self.remaining = -1  # done

    def pauseProducing(self):
        self.paused = True

    def finish(self):
        self.transport.loseWriteConnection()

    def stopProducing(self):
        self.remaining = 0

    def dataReceived(self, data):
        self.got.update(data)
        self.count += len(data)

    def readConnectionLost(self):
        self.eof.callback(None)
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.eof.called:
            self.eof.callback(None)
        self.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_50_mb_each_way_through_a_spliced_session_arrive_byte_for_byte():
    total = 50 * MB
    client, upstream = Streamer(total, seed=1), Streamer(total, seed=2)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await spliced(env)
        client.go()
        upstream.go()
        await until(lambda: client.count == upstream.count == total, "both downloads")
        assert env.relay.splicer is not None  # still spliced: nothing ended yet
        client.finish()
        upstream.finish()
        await wait(client.eof)
        await wait(upstream.eof)
        result: RelayResult = await done
        assert (client.count, upstream.count) == (total, total)
        assert client.got.digest() == upstream.sent.digest()
        assert upstream.got.digest() == client.sent.digest()
        assert (result.bytes_up, result.bytes_down, result.clean) == (total, total, True)
        assert result.spliced == 2 * total  # all of it, both ways, by splice
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_a_session_is_copied_until_a_bulk_read_then_spliced():
    small, big = 100, 5 * MB
    client, upstream = Streamer(small, seed=3), Streamer(big, seed=4)
    env = await Env.create(client, upstream)
    try:
        done = env.start(splice_after=SPLICE_AFTER)
        client.go()  # a command's worth
        await until(lambda: upstream.count == small, "the command to reach the upstream")
        assert env.relay.splicer is None and env.relay._handover is None  # copied
        upstream.go()  # a message body: its first big read starts the splice
        await until(lambda: env.relay.splicer is not None, "the relay to splice")
        await until(lambda: client.count == big, "the download")
        client.finish()
        upstream.finish()
        await wait(client.eof)
        await wait(upstream.eof)
        result: RelayResult = await done
        assert client.got.digest() == upstream.sent.digest()
        assert upstream.got.digest() == client.sent.digest()
        assert (result.bytes_up, result.bytes_down) == (small, big)
        assert 0 < result.spliced <= big - SPLICE_AFTER  # the reads before the splice: copied
    finally:
        await env.stop()


# --- flow control -------------------------------------------------------------------------------


class SpliceFlow(Flow):
    """Flow (test_relay.py) for a spliced relay: back-pressure has reached the relay when the
    splicer stopped reading the upstream; each sample reads the pipe's fill from the kernel."""

    def __init__(self):
        super().__init__()
        self.env: Env | None = None
        self.max_in_pipe = 0
        self.max_user_space = 0

    @property
    def splicer(self):
        return self.env.relay.splicer if self.env and self.env.relay else None

    def sample(self):
        splicer = self.splicer
        if splicer is None:
            return
        channel = splicer.channels[1]  # upstream -> client
        if channel.pipe is not None:
            fill = fcntl.ioctl(channel.pipe[0], termios.FIONREAD, b"\0\0\0\0")
            in_pipe = int.from_bytes(fill, "little")
            assert in_pipe == channel.held
            self.max_in_pipe = max(self.max_in_pipe, in_pipe)
            self.samples += 1
        user = write_buffered(self.env.front.transport) + write_buffered(self.env.up.transport)
        self.max_user_space = max(self.max_user_space, user)

    def check(self):
        splicer = self.splicer
        if self.client.paused and self.source.paused and splicer and not splicer.reading[1]:
            self.sample()
            self.stalls += 1
            self.client.resume()


@pytest_twisted.ensureDeferred
async def test_stalled_reader_keeps_a_spliced_relay_within_the_pipe():
    total = 50 * MB
    flow = SpliceFlow()
    flow.client, flow.source = SlowReader(flow), Source(total, flow)
    env = await Env.create(flow.client, flow.source)
    flow.env = env
    try:
        await wait(env.front.buffered_at_least(len(b"GO\r\n")))
        done = env.start()  # the leftover GO goes out first, then the relay splices
        await spliced(env)
        # The splicer stops reading between the source's pauses: look every few milliseconds.
        poll = task.LoopingCall(flow.check)
        poll.start(0.005)
        try:
            result: RelayResult = await done
        finally:
            poll.stop()
        await wait(flow.client.lost)

        assert flow.client.count == total
        assert flow.client.digest.digest() == flow.source.digest.digest()
        assert result.bytes_down == total and result.closed_by == "upstream" and result.clean
        assert result.spliced >= total - BUFFER_BOUND_SPLICE
        print(
            f"\n[splice] max in pipe {flow.max_in_pipe} octets (bound {BUFFER_BOUND_SPLICE}), "
            f"{flow.samples} samples, {flow.stalls} stalls"
        )
        # The pipe held the stalled direction's octets, never more than its bound, and none
        # waited in user space; back-pressure reached the source again and again.
        assert 0 < flow.max_in_pipe <= BUFFER_BOUND_SPLICE
        assert flow.max_user_space == 0
        assert flow.client.pauses >= 5 and flow.stalls >= 5
    finally:
        await env.stop()


# --- half-close and ends ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_half_close_while_spliced_reaches_the_upstream_which_goes_on_sending():
    answer = random.Random(5).randbytes(2 * MB)
    client = Peer(half_close=False, close_on_eof=True)
    client.send_on_first_data = True  # never: the client is driven below
    upstream = Peer(on_eof_send=answer, close_on_eof=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await spliced(env)
        client.transport.write(b"a LOGOUT\r\n")
        client.transport.loseWriteConnection()
        assert await wait(upstream.eof) == b"a LOGOUT\r\n"
        assert upstream.got_eof  # a read EOF: the upstream may still write, and does
        assert await wait(client.eof) == answer and client.got_eof
        result = await done
        assert (result.closed_by, result.clean) == ("client", True)
        assert (result.bytes_up, result.bytes_down) == (10, len(answer))
        assert result.spliced >= 10
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_close_with_while_spliced_delivers_what_was_relayed_then_the_farewell():
    data = random.Random(9).randbytes(20 * MB)
    client = Peer(half_close=False, close_on_eof=True)
    upstream = Peer(payload=data, send_on_first_data=True, half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await spliced(env)
        client.transport.write(b"go")
        await until(lambda: len(client.received) > MB, "the download to be under way")
        assert env.relay.splicer is not None
        farewell = b"* BYE code revoked\r\n"
        env.relay.close_with("code revoked", farewell)
        await wait(client.lost)
        await wait(upstream.lost)
        result = await done
        got = bytes(client.received)
        assert got.endswith(farewell)
        assert got[: -len(farewell)] == data[: result.bytes_down]  # a prefix, nothing lost
        assert (result.closed_by, result.reason, result.clean) == ("proxy", "code revoked", True)
        assert result.spliced > MB
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_reset_while_spliced_closes_the_client_not_cleanly():
    client = Peer(half_close=False, close_on_eof=True)
    upstream = Peer(abort_on_first_data=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await spliced(env)
        client.transport.write(b"a FETCH 1 BODY[]\r\n")
        await wait(client.lost)  # after its EOF the client closes
        result = await done
        assert (result.closed_by, result.clean, result.bytes_up) == ("upstream", False, 18)
    finally:
        await env.stop()


# --- a real proxy: which sessions are spliced ---------------------------------------------------


PLAIN_AUTH = {"plaintext_auth_from": ["127.0.0.0/8"]}


@pytest_twisted.async_yield_fixture(scope="module")
async def imap_proxy(dovecot, test_ca, tmp_path_factory):
    """IMAP with a plaintext upstream: a plaintext client is spliced, a TLS client is not."""
    cert = {"cert_file": str(test_ca.cert), "key_file": str(test_ca.key)}
    harness = await start_proxy(
        tmp_path_factory.mktemp("splice-imap"),
        listeners=[
            {"name": "plain", "protocol": "imap", "tls": "none", **PLAIN_AUTH},
            {"name": "implicit", "protocol": "imap", "tls": "implicit", **cert},
        ],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "none",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    yield harness
    await harness.stop()


async def session_event(harness, code_id: int) -> dict:
    def ended():
        return [e for e in harness.audit_events("session") if e.get("code") == code_id]

    await until(lambda: bool(ended()), "the session's audit event")
    return ended()[0]


def splicing(harness) -> bool:
    """Whether a live session of this proxy is being spliced now (run in the reactor)."""
    relays = [getattr(s, "_relay", None) for s in harness.service.sessions]
    return any(r is not None and r.splicer is not None for r in relays)


def revoked_while_idle(harness, port: int, code_id: int, code: str) -> bytes:
    """Log in, SELECT, IDLE; revoke the code once the proxy has spliced the session; return
    what the client got after `+ idling` up to the proxy's close."""
    imap = imaplib.IMAP4("127.0.0.1", port)
    try:
        imap.login("alice", code)
        folder = f"spliced-{uuid.uuid4().hex}"
        assert imap.create(folder)[0] == "OK"
        body = b"x" * 998 + b"\r\n"
        message = b"Subject: bulk\r\n\r\n" + body * (4 * SPLICE_AFTER // len(body))
        assert imap.append(folder, None, None, message)[0] == "OK"  # a bulk upload: splice
        imap.select("INBOX")
        imap.send(b"i IDLE\r\n")
        while not imap.readline().startswith(b"+"):
            pass
        deadline = time.monotonic() + TIMEOUT
        while not threads.blockingCallFromThread(reactor, splicing, harness):
            assert time.monotonic() < deadline, "the session was never spliced"
        harness.store.revoke(code_id)
        imap.sock.settimeout(TIMEOUT)
        rest = b""
        while chunk := imap.sock.recv(4096):
            rest += chunk
        return rest
    finally:
        imap.shutdown()


@pytest_twisted.ensureDeferred
async def test_plaintext_imap_session_is_spliced_and_revocation_still_says_bye(imap_proxy):
    code_id, code = imap_proxy.issue("alice", label="spliced")
    rest = await threads.deferToThread(
        revoked_while_idle, imap_proxy, imap_proxy.port("plain"), code_id, code
    )
    assert rest.endswith(f"* BYE app password {code_id} revoked\r\n".encode())
    event = await session_event(imap_proxy, code_id)
    assert event["spliced"] > 0 and event["closed_by"] == "proxy"


@pytest_twisted.ensureDeferred
async def test_a_short_plaintext_session_is_copied_not_spliced(imap_proxy):
    code_id, code = imap_proxy.issue("alice", label="short")

    def client():
        with imaplib.IMAP4("127.0.0.1", imap_proxy.port("plain")) as c:
            c.login("alice", code)
            c.select("INBOX")
            c.logout()

    await threads.deferToThread(client)
    event = await session_event(imap_proxy, code_id)
    assert event["spliced"] == 0 and event["bytes_down"] > 0


@pytest_twisted.ensureDeferred
async def test_a_tls_client_is_relayed_by_copy(imap_proxy, test_ca):
    code_id, code = imap_proxy.issue("alice", label="tls")
    context = ssl.create_default_context(cafile=str(test_ca.ca))

    def client():
        with imaplib.IMAP4_SSL("localhost", imap_proxy.port("implicit"), ssl_context=context) as c:
            c.login("alice", code)
            c.select("INBOX")
            c.logout()

    await threads.deferToThread(client)
    event = await session_event(imap_proxy, code_id)
    assert event["spliced"] == 0 and event["bytes_down"] > 0


@pytest_twisted.ensureDeferred
async def test_a_plaintext_smtp_session_keeps_its_command_watch(postfix, tmp_path):
    harness = await start_proxy(
        tmp_path,
        listeners=[{"name": "plain", "protocol": "smtp", "tls": "none", **PLAIN_AUTH}],
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.smtp_port,
                "tls": "none",
                "login": "xclient",
            }
        },
    )
    try:
        code_id, code = harness.issue("alice", label="smtp")

        def client():
            with smtplib.SMTP("127.0.0.1", harness.port("plain"), timeout=TIMEOUT) as smtp:
                smtp.ehlo("printer.example.test")
                smtp.login("alice", code)
                assert smtp.docmd("XCLIENT", "ADDR=192.0.2.1")[0] == 550  # the watch refuses
                smtp.noop()

        await threads.deferToThread(client)
        event = await session_event(harness, code_id)
        assert event["spliced"] == 0 and event["bytes_up"] > 0
    finally:
        await harness.stop()
