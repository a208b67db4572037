"""The relay over real loopback TCP (and TLS on the client side): bytes intact both ways,
bounded buffering under a slow reader, half-close, errors, counts, leftovers and the client hook.

Layout of every test: client peer --TCP/TLS--> [front | relay | up] --TCP--> upstream peer.
`front` and `up` stand in for a frontend and an upstream protocol: they buffer until the relay
is started, then forward their transport's events to it, as proxy/relay.py's docstring shows.
"""

from __future__ import annotations

import hashlib
import random

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from proxy.relay import (
    BUFFER_BOUND_TCP,
    BUFFER_BOUND_TLS,
    Relay,
    RelayResult,
    supports_half_close,
)
from proxy.tls import ServerTLS, upstream_tls

pytestmark = pytest.mark.integration

TIMEOUT = 60  # seconds; a hung test fails instead of blocking the suite (no sleeps anywhere)


def wait(d: defer.Deferred) -> defer.Deferred:
    return d.addTimeout(TIMEOUT, reactor)


# --- proxy-side stand-ins ------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class ProxySide(protocol.Protocol):
    """A frontend or upstream protocol: pre-relay it buffers, then it forwards to the relay."""

    def __init__(self, made: defer.Deferred | None = None):
        self.made = made
        self.relay = None
        self.buffered = b""
        self.ended = False  # read EOF before the handover
        self.ended_early = defer.Deferred()
        self.after_forward = None
        self._waiting: list[tuple[int, defer.Deferred]] = []

    def connectionMade(self):
        if self.made is not None:
            self.made.callback(self)

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.dataReceived(data)
            if self.after_forward is not None:
                self.after_forward()
            return
        self.buffered += data
        for n, d in list(self._waiting):
            if len(self.buffered) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def readConnectionLost(self):
        if self.relay is not None:
            self.relay.readConnectionLost()
            return
        self.ended = True  # handed over with the leftovers
        self.ended_early.callback(None)

    def writeConnectionLost(self):
        if self.relay is not None:
            self.relay.writeConnectionLost()

    def connectionLost(self, reason):
        if self.relay is not None:
            self.relay.connectionLost(reason)

    def take(self) -> bytes:
        data, self.buffered = self.buffered, b""
        return data

    def buffered_at_least(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        if len(self.buffered) >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d


# --- client and upstream peers ------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Peer(protocol.Protocol):
    """A scripted end: optional greeting on connect; `payload` sent on connect or on the first
    data received, then a write half-close; on read EOF optionally a last word, then close."""

    def __init__(
        self,
        greeting=b"",
        payload=b"",
        send_on_first_data=False,
        half_close=True,
        on_eof_send=b"",
        close_on_eof=True,
        abort_on_first_data=False,
    ):
        self.greeting, self.payload = greeting, payload
        self.send_on_first_data, self.half_close = send_on_first_data, half_close
        self.on_eof_send, self.close_on_eof = on_eof_send, close_on_eof
        self.abort_on_first_data = abort_on_first_data
        self.received = bytearray()
        self.sent = False
        self.got_eof = False
        self.eof = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)
        if not self.send_on_first_data:
            self._send()

    def _send(self):
        if self.sent:
            return
        self.sent = True
        if self.payload:
            self.transport.write(self.payload)
        if self.half_close:
            self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.received += data
        if self.abort_on_first_data:
            self.transport.abortConnection()
            return
        if self.send_on_first_data:
            self._send()

    def readConnectionLost(self):
        self.got_eof = True
        self.eof.callback(bytes(self.received))
        if self.on_eof_send:
            self.transport.write(self.on_eof_send)
        if self.close_on_eof:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        if not self.eof.called:
            self.eof.callback(bytes(self.received))
        self.lost.callback(reason.value)  # the exception, as a value


# --- the harness --------------------------------------------------------------------------------


class Env:
    """Listening upstream and proxy, a connected client, and the two proxy-side protocols."""

    def __init__(self):
        self.ports = []
        self.front: ProxySide | None = None
        self.up: ProxySide | None = None
        self.relay: Relay | None = None

    @classmethod
    async def create(cls, client_peer, upstream_peer, server_tls=None, client_tls=None):
        env = cls()
        up_port = reactor.listenTCP(
            0, protocol.Factory.forProtocol(lambda: upstream_peer), interface="127.0.0.1"
        )
        env.ports.append(up_port)
        made = defer.Deferred()
        front_factory = protocol.Factory.forProtocol(lambda: ProxySide(made))
        if server_tls is None:
            proxy_port = reactor.listenTCP(0, front_factory, interface="127.0.0.1")
        else:
            proxy_port = reactor.listenSSL(0, front_factory, server_tls, interface="127.0.0.1")
        env.ports.append(proxy_port)
        client_factory = protocol.ClientFactory.forProtocol(lambda: client_peer)
        if client_tls is None:
            reactor.connectTCP("127.0.0.1", proxy_port.getHost().port, client_factory)
        else:
            reactor.connectSSL("127.0.0.1", proxy_port.getHost().port, client_factory, client_tls)
        env.front = await made.addTimeout(TIMEOUT, reactor)
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", up_port.getHost().port)
        env.up = await ep.connect(protocol.Factory.forProtocol(ProxySide))
        return env

    def start(
        self, hook=None, client_pending=None, upstream_pending=None, upstream_hook=None
    ) -> defer.Deferred:
        self.relay = Relay(
            self.front.transport,
            self.up.transport,
            client_pending=self.front.take() if client_pending is None else client_pending,
            upstream_pending=self.up.take() if upstream_pending is None else upstream_pending,
            client_ended=self.front.ended,
            upstream_ended=self.up.ended,
            client_hook=hook,
            upstream_hook=upstream_hook,
        )
        self.front.relay, self.up.relay = self.relay.client, self.relay.upstream
        return self.relay.start().addTimeout(TIMEOUT, reactor)

    async def stop(self):
        for port in self.ports:
            await port.stopListening()


@pytest.fixture(scope="module")
def pki(test_ca):
    return {
        "server": ServerTLS(str(test_ca.cert), str(test_ca.key)),
        "client": upstream_tls("localhost", ca_file=str(test_ca.ca)),
    }


def tls_args(pki, tls: bool) -> dict:
    return {"server_tls": pki["server"], "client_tls": pki["client"]} if tls else {}


# --- bytes both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls-client"])
@pytest_twisted.ensureDeferred
async def test_large_random_payloads_arrive_intact_both_ways_and_are_counted(pki, tls):
    rng = random.Random(1)
    up_data, down_data = rng.randbytes(6 * 2**20 + 17), rng.randbytes(5 * 2**20 + 3)
    greeting = b"* OK upstream ready\r\n"
    # The client starts when the greeting reaches it (so its bytes flow through the relay);
    # the upstream starts on the client's first bytes. Under TLS the client cannot half-close:
    # it sends, then waits for the upstream's end.
    client = Peer(payload=up_data, send_on_first_data=True, half_close=not tls)
    upstream = Peer(
        greeting=greeting,
        payload=down_data,
        send_on_first_data=True,
        half_close=True,
        close_on_eof=True,
    )
    env = await Env.create(client, upstream, **tls_args(pki, tls))
    try:
        await wait(env.up.buffered_at_least(len(greeting)))
        done = env.start()
        assert bytes(await wait(client.eof)) == greeting + down_data
        if tls:
            client.transport.loseConnection()
        result = await done
        assert (
            await wait(upstream.eof) == up_data
        )  # the relay is done; the peer may read a bit later
        assert result.bytes_up == len(up_data)
        assert result.bytes_down == len(greeting) + len(down_data)
        assert result.clean
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_leftovers_from_the_handover_go_first_and_are_counted():
    greeting = b"* OK upstream ready\r\n"
    client = Peer(greeting=b"A1 early\r\n", payload=b"A2 later\r\n", send_on_first_data=True)
    upstream = Peer(greeting=greeting, half_close=False)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.buffered_at_least(len(b"A1 early\r\n")))
        await wait(env.up.buffered_at_least(len(greeting)))
        done = env.start()
        assert await wait(upstream.eof) == b"A1 early\r\nA2 later\r\n"
        await wait(upstream.lost)
        result = await done
        assert bytes(client.received) == greeting
        assert (result.bytes_up, result.bytes_down) == (20, len(greeting))
    finally:
        await env.stop()


# --- flow control -------------------------------------------------------------------------------


def write_buffered(transport) -> int:
    """Octets a transport holds in user space waiting to be sent (TLS layers included)."""
    total = 0
    t = transport
    while isinstance(t, TLSMemoryBIOProtocol):
        total += sum(map(len, t._appSendBuffer))
        aggregator = getattr(t, "_aggregator", None)
        total += sum(map(len, getattr(aggregator, "_buffer", [])))
        t = t.transport
    return total + len(t.dataBuffer) - t.offset + t._tempDataLen


class Flow:
    """Coordinates a slow reader: the client stops reading every STEP octets and starts again
    only once back-pressure has reached the source (relay paused and source paused)."""

    STEP = 2 * 2**20

    def __init__(self):
        self.client = None
        self.source = None
        self.relay_side = None
        self.stalls = 0
        self.max_buffered = 0
        self.samples = 0
        self.transport = None

    def sample(self):
        if self.transport is not None:
            self.samples += 1
            self.max_buffered = max(self.max_buffered, write_buffered(self.transport))

    def check(self):
        if (
            self.client.paused
            and self.source.paused
            and self.relay_side is not None
            and self.relay_side.reading_paused
        ):
            self.stalls += 1
            self.client.resume()


@implementer(IPushProducer)
class Source(protocol.Protocol):
    """Upstream peer that streams `total` random octets as fast as its transport takes them,
    starting when the client's first bytes arrive (so the relay is already in place)."""

    CHUNK = 64 * 1024

    def __init__(self, total: int, flow: Flow):
        self.remaining = total
        self.flow = flow
        self.rng = random.Random(7)
        self.digest = hashlib.sha256()
        self.paused = True
        self.started = False
        self.finished = False

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def dataReceived(self, data):
        if not self.started:
            self.started = True
            self.resumeProducing()

    def pauseProducing(self):
        self.paused = True
        self.flow.check()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.remaining:
            chunk = self.rng.randbytes(min(self.CHUNK, self.remaining))
            self.remaining -= len(chunk)
            self.digest.update(chunk)
            self.transport.write(chunk)
        if not self.remaining and not self.finished:
            self.finished = True
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self.flow.client.unthrottle()

    def stopProducing(self):
        self.remaining = 0


class SlowReader(protocol.Protocol):
    def __init__(self, flow: Flow):
        self.flow = flow
        self.digest = hashlib.sha256()
        self.count = 0
        self.since_resume = 0
        self.paused = False
        self.throttled = True
        self.pauses = 0
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"GO\r\n")

    def dataReceived(self, data):
        self.digest.update(data)
        self.count += len(data)
        self.since_resume += len(data)
        if self.throttled and not self.paused and self.since_resume >= Flow.STEP:
            self.paused = True
            self.pauses += 1
            self.transport.pauseProducing()
            self.flow.check()

    def resume(self):
        if self.paused:
            self.paused = False
            self.since_resume = 0
            self.transport.resumeProducing()

    def unthrottle(self):
        self.throttled = False
        self.resume()

    def connectionLost(self, reason):
        self.lost.callback(reason.value)  # the exception, as a value


@implementer(IPushProducer)
class ObservedProducer:
    """Wraps the relay's producer on the client transport: sample and re-check on each pause."""

    def __init__(self, inner, flow: Flow):
        self.inner, self.flow = inner, flow

    def pauseProducing(self):
        self.flow.sample()
        self.inner.pauseProducing()
        self.flow.check()

    def resumeProducing(self):
        self.inner.resumeProducing()

    def stopProducing(self):
        self.inner.stopProducing()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls-client"])
@pytest_twisted.ensureDeferred
async def test_slow_reader_keeps_relay_buffers_bounded_while_upstream_sends_50_mb(pki, tls):
    total = 50 * 10**6
    flow = Flow()
    flow.client, flow.source = SlowReader(flow), Source(total, flow)
    env = await Env.create(flow.client, flow.source, **tls_args(pki, tls))
    try:
        await wait(env.front.buffered_at_least(len(b"GO\r\n")))
        front_transport = env.front.transport
        register = front_transport.registerProducer
        front_transport.registerProducer = lambda p, s: register(ObservedProducer(p, flow), s)
        flow.transport = front_transport
        env.up.after_forward = flow.sample  # right after each upstream chunk was written
        done = env.start()
        flow.relay_side = env.relay.upstream
        result: RelayResult = await done
        await wait(flow.client.lost)

        assert flow.client.count == total
        assert flow.client.digest.digest() == flow.source.digest.digest()
        assert result.bytes_down == total and result.closed_by == "upstream" and result.clean
        # The relay never held more than Twisted's buffers allow...
        bound = BUFFER_BOUND_TLS if tls else BUFFER_BOUND_TCP
        print(
            f"\n[{'tls' if tls else 'tcp'}] max relay write buffer {flow.max_buffered} octets "
            f"(bound {bound}); {flow.samples} samples, {flow.stalls} stalls, "
            f"{env.relay.client.pauses} relay pauses"
        )
        assert 0 < flow.max_buffered <= bound
        # ...because back-pressure really happened, repeatedly, all the way to the source.
        assert flow.client.pauses >= 5
        assert env.relay.client.pauses >= 5
        assert flow.stalls >= 5
    finally:
        await env.stop()


# --- half-close ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_half_close_reaches_the_upstream_which_can_still_answer():
    client = Peer(payload=b"QUIT\r\n", half_close=True, close_on_eof=True)
    upstream = Peer(on_eof_send=b"221 2.0.0 bye\r\n", close_on_eof=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        assert supports_half_close(env.front.transport)
        done = env.start()
        assert await wait(upstream.eof) == b"QUIT\r\n"
        assert upstream.got_eof  # a read EOF, not a lost connection: it may still write
        assert await wait(client.eof) == b"221 2.0.0 bye\r\n"
        assert client.got_eof
        result = await done
        assert result.closed_by == "client" and result.clean
        assert (result.bytes_up, result.bytes_down) == (6, 15)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_client_eof_before_the_handover_is_passed_on_after_the_leftovers():
    client = Peer(payload=b"A1 NOOP\r\nA2 LOGOUT\r\n", half_close=True, close_on_eof=True)
    upstream = Peer(half_close=False, on_eof_send=b"* BYE\r\n", close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.ended_early)
        done = env.start()
        assert await wait(upstream.eof) == b"A1 NOOP\r\nA2 LOGOUT\r\n" and upstream.got_eof
        assert await wait(client.eof) == b"* BYE\r\n"
        result = await done
        assert (result.closed_by, result.bytes_up, result.bytes_down) == ("client", 20, 7)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_half_close_reaches_the_client():
    client = Peer(payload=b"a LOGOUT\r\n", half_close=False, on_eof_send=b"late\r\n")
    upstream = Peer(payload=b"* BYE\r\n", send_on_first_data=True, half_close=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        assert await wait(client.eof) == b"* BYE\r\n" and client.got_eof
        assert await wait(upstream.eof) == b"a LOGOUT\r\nlate\r\n"
        result = await done
        assert result.closed_by == "upstream" and result.clean
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_eof_closes_a_tls_client_after_delivering_everything(pki):
    data = random.Random(3).randbytes(3 * 2**20)
    client = Peer(payload=b"GO", half_close=False, close_on_eof=False)
    upstream = Peer(payload=data, send_on_first_data=True, half_close=True, close_on_eof=False)
    env = await Env.create(client, upstream, **tls_args(pki, True))
    try:
        assert not supports_half_close(env.front.transport)  # TLS: no TCP half-close under it
        done = env.start()
        await wait(client.lost)
        assert bytes(client.received) == data
        result = await done
        assert result.closed_by == "upstream" and result.bytes_down == len(data)
    finally:
        await env.stop()


# --- errors and aborts --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_error_closes_the_client():
    client = Peer(payload=b"A1 FETCH 1:* BODY[]\r\n", half_close=False, close_on_eof=False)
    upstream = Peer(abort_on_first_data=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await wait(client.eof)  # the client sees its connection end
        result = await done
        assert result.closed_by == "upstream" and not result.clean
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_client_error_closes_the_upstream():
    client = Peer(abort_on_first_data=True, half_close=False)
    upstream = Peer(greeting=b"* OK\r\n", half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await wait(upstream.lost)
        result = await done
        assert result.closed_by == "client" and not result.clean
        assert result.bytes_down == len(b"* OK\r\n")
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_abort_drops_both_sides_with_the_reason():
    client = Peer(half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        env.relay.abort("code revoked")
        await wait(client.lost)
        await wait(upstream.lost)
        result = await done
        assert (result.closed_by, result.reason, result.clean) == ("proxy", "code revoked", False)
    finally:
        await env.stop()


# --- the client hook ----------------------------------------------------------------------------


class RefuseXclient:
    """What the SMTP relay does after login: drop XCLIENT commands, answer them itself."""

    def __init__(self):
        self.partial = b""

    def __call__(self, data: bytes) -> tuple[bytes, bytes]:
        self.partial += data
        forward, reply = b"", b""
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            if line.upper().startswith(b"XCLIENT"):
                reply += b"550 5.7.0 XCLIENT not allowed\r\n"
            else:
                forward += line + b"\n"
        return forward, reply


@pytest_twisted.ensureDeferred
async def test_hook_drops_what_it_refuses_and_replies_to_the_client():
    sent = b"MAIL FROM:<a@example.org>\r\nXCLIENT ADDR=10.0.0.1\r\nRCPT TO:<b@exa"
    client = Peer(payload=sent, half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.buffered_at_least(10))  # part of it arrives as a leftover
        done = env.start(hook=RefuseXclient())
        client.transport.write(b"mple.org>\r\nxclient NAME=spoof\r\nQUIT\r\n")
        client.transport.loseWriteConnection()
        assert (
            await wait(upstream.eof)
            == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n"
        )
        await wait(client.eof)
        assert bytes(client.received) == b"550 5.7.0 XCLIENT not allowed\r\n" * 2
        result = await done
        assert result.bytes_up == len(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n"
        )
        assert result.bytes_down == 2 * len(b"550 5.7.0 XCLIENT not allowed\r\n")
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_hook_that_raises_aborts_the_session():
    def broken(data):
        raise ValueError("bug")

    client = Peer(payload=b"NOOP\r\n", half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start(hook=broken)
        await wait(client.lost)
        await wait(upstream.lost)
        result = await done
        assert (result.closed_by, result.reason) == ("proxy", "client hook failed")
        assert result.bytes_up == 0
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_hook_can_answer_the_upstream_and_filter_what_the_client_gets():
    partial = b""

    def answer_pings(data: bytes) -> tuple[bytes, bytes]:
        nonlocal partial
        partial += data
        to_client, to_upstream = b"", b""
        while b"\n" in partial:
            line, partial = partial.split(b"\n", 1)
            if line == b"PING\r":
                to_upstream += b"PONG\r\n"
            else:
                to_client += line + b"\n"
        return to_client, to_upstream

    client = Peer(payload=b"go\r\n", half_close=False, close_on_eof=True)
    upstream = Peer(
        payload=b"* OK hi\r\nPING\r\n", send_on_first_data=True, half_close=True, close_on_eof=False
    )
    env = await Env.create(client, upstream)
    try:
        done = env.start(upstream_hook=answer_pings)
        assert await wait(client.eof) == b"* OK hi\r\n"
        assert await wait(upstream.eof) == b"go\r\nPONG\r\n"
        result = await done
        assert (result.bytes_up, result.bytes_down) == (4 + 6, 9)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_pause_reading_holds_a_side_until_resumed_even_under_back_pressure():
    client = Peer(half_close=False, close_on_eof=True)
    upstream = Peer(half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        side = env.relay.client
        assert env.front.transport in reactor.getReaders()
        side.pause_reading("waiting for 354")
        assert side.reading_paused and env.front.transport not in reactor.getReaders()
        side.pause_reading("write buffer")  # keys nest
        side.resume_reading("waiting for 354")
        assert side.reading_paused and env.front.transport not in reactor.getReaders()
        side.resume_reading("write buffer")
        assert not side.reading_paused and env.front.transport in reactor.getReaders()
        client.transport.loseWriteConnection()
        await wait(upstream.eof)
        await done
    finally:
        await env.stop()
