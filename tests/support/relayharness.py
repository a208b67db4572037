"""Stand-ins for the two protocols a relay joins, over real loopback TCP (and TLS on the client
side), for tests/integration/test_relay*.py.

Layout: client peer --TCP/TLS--> [front | relay | up] --TCP--> upstream peer. `front` and `up`
stand in for a frontend and an upstream protocol: they buffer until the relay is started, then
forward their transport's events to it, as proxy/relay.py's docstring shows.
"""

from __future__ import annotations

import hashlib
import random

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from proxy.relay import Relay

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
        self,
        hook=None,
        client_pending=None,
        upstream_pending=None,
        upstream_hook=None,
        splice=True,
        splice_after=0,
    ) -> defer.Deferred:
        """Start the relay; it splices plain TCP from the start unless `splice_after` is set."""
        self.relay = Relay(
            self.front.transport,
            self.up.transport,
            client_pending=self.front.take() if client_pending is None else client_pending,
            upstream_pending=self.up.take() if upstream_pending is None else upstream_pending,
            client_ended=self.front.ended,
            upstream_ended=self.up.ended,
            client_hook=hook,
            upstream_hook=upstream_hook,
            splice=splice,
            splice_after=splice_after,
        )
        self.front.relay, self.up.relay = self.relay.client, self.relay.upstream
        return self.relay.start().addTimeout(TIMEOUT, reactor)

    async def stop(self):
        for port in self.ports:
            await port.stopListening()


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
