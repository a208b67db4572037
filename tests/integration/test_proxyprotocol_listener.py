"""The PROXY protocol listener wrapper over real loopback TCP: a trusted balancer's header gives
the wrapped protocol the client's addresses, an untrusted peer is direct (or refused when the
listener requires the balancer), and a trusted peer without a complete header is dropped.
The parser and the trusted-peer policy alone: tests/unit/test_proxyprotocol.py."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, endpoints, protocol, reactor, task

from proxy.proxyprotocol import ProxyProtocolFactory, ProxyProtocolWrapper, TrustedProxies

pytestmark = pytest.mark.integration


class Recorder(protocol.Protocol):
    def __init__(self, made: defer.Deferred, lost: defer.Deferred):
        self.made, self.lost = made, lost
        self.data = b""

    def connectionMade(self):
        self.made.callback((self.transport.getPeer(), self.transport.getHost()))
        self.transport.write(b"* OK greeting\r\n")

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(self.data)


class Sender(protocol.Protocol):
    def __init__(self, payload: bytes, closed: defer.Deferred):
        self.payload, self.closed = payload, closed
        self.received = b""

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data
        if b"\r\n" in self.received:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.closed.callback(self.received)


async def run_listener(trusted: TrustedProxies, payload: bytes, close_after=False):
    made, lost, closed = defer.Deferred(), defer.Deferred(), defer.Deferred()
    rejected = []
    factory = protocol.Factory.forProtocol(lambda: Recorder(made, lost))
    wrapper = ProxyProtocolFactory(
        factory, trusted, on_reject=lambda peer, why: rejected.append(why)
    )
    port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")
    try:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await ep.connect(protocol.Factory.forProtocol(lambda: Sender(payload, closed)))
        received = await closed.addTimeout(10, reactor)
        return made, lost, received, rejected
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrapper_starts_the_protocol_after_the_header_with_the_proxied_addresses():
    trusted = TrustedProxies.parse(["127.0.0.0/8"])
    made, lost, received, rejected = await run_listener(
        trusted, b"PROXY TCP4 203.0.113.9 198.51.100.2 40000 143\r\nA1 NOOP\r\n"
    )
    peer, host = await made
    assert (peer.host, peer.port) == ("203.0.113.9", 40000)
    assert (host.host, host.port) == ("198.51.100.2", 143)
    assert received == b"* OK greeting\r\n"
    assert await lost == b"A1 NOOP\r\n"
    assert rejected == []


@pytest_twisted.ensureDeferred
async def test_wrapper_treats_an_untrusted_peer_as_direct_and_never_parses_its_bytes():
    trusted = TrustedProxies.parse(["10.0.0.0/8"])
    made, lost, _received, _rejected = await run_listener(
        trusted, b"PROXY TCP4 203.0.113.9 198.51.100.2 40000 143\r\n"
    )
    peer, _ = await made
    assert peer.host == "127.0.0.1"  # not spoofed
    assert await lost == b"PROXY TCP4 203.0.113.9 198.51.100.2 40000 143\r\n"


@pytest_twisted.ensureDeferred
async def test_wrapper_refuses_an_untrusted_peer_when_required():
    trusted = TrustedProxies.parse(["10.0.0.0/8"], required=True)
    made, _lost, received, rejected = await run_listener(trusted, b"A1 NOOP\r\n")
    assert received == b""
    assert not made.called
    assert rejected == ["peer is not a trusted proxy"]


@pytest_twisted.ensureDeferred
async def test_wrapper_closes_a_trusted_peer_that_sends_no_header():
    trusted = TrustedProxies.parse(["127.0.0.0/8"])
    made, _lost, received, rejected = await run_listener(trusted, b"A1 LOGIN joe secret\r\n")
    assert received == b""
    assert not made.called
    assert rejected == ["not a PROXY protocol header"]


@pytest_twisted.ensureDeferred
async def test_wrapper_drops_a_trusted_peer_that_never_completes_its_header():
    clock = task.Clock()
    made, lost, closed, wrapped = (
        defer.Deferred(),
        defer.Deferred(),
        defer.Deferred(),
        defer.Deferred(),
    )
    rejected = []

    class Watched(ProxyProtocolWrapper):
        def makeConnection(self, transport):
            super().makeConnection(transport)
            wrapped.callback(self)

    factory = ProxyProtocolFactory(
        protocol.Factory.forProtocol(lambda: Recorder(made, lost)),
        TrustedProxies.parse(["127.0.0.0/8"]),
        on_reject=lambda peer, why: rejected.append(why),
        clock=clock,
    )
    factory.protocol = Watched
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        ep = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await ep.connect(protocol.Factory.forProtocol(lambda: Sender(b"PROXY TCP4 1.2", closed)))
        await wrapped.addTimeout(10, reactor)
        clock.advance(29)
        assert not rejected
        clock.advance(1)
        assert await closed.addTimeout(10, reactor) == b""
        assert rejected == ["no complete PROXY header within 30 s"]
        assert not made.called
    finally:
        await port.stopListening()
