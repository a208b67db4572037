"""Connecting to an upstream mail server and talking to it line by line until the relay starts.

Each protocol's login dialogue (proxy/imap/upstream.py, …) is a coroutine over an
UpstreamConnection: `await conn.read_line()`, `conn.send(...)`, `await conn.start_tls()`.
After the login the connection's leftover bytes go to the client and the relay takes over.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer, error, tcp
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    ITLSTransport,
)
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.commands import Hello
from proxy.config import Upstream
from proxy.linebuffer import LineBuffer, TooLong
from proxy.protocols import TlsMode
from proxy.relay import Spliceable
from proxy.tls import upstream_tls

# Longest upstream line we read before the relay starts (greeting, CAPABILITY, EHLO replies).
# Dovecot's CAPABILITY line is under 1 KiB; SMTP reply lines are at most 512 octets (RFC 5321).
MAX_UPSTREAM_LINE = 16384


class UpstreamError(Exception):
    """The upstream is down, slow, refused us or spoke nonsense: a temporary failure."""


@dataclass(frozen=True)
class LoginRequest:
    """Whom a protocol's upstream login logs in, and what it tells the upstream about the client."""

    identity: str  # the account's upstream identity (never the user's password)
    client_ip: str
    client_port: int
    session: str  # the session's id, so that upstream logs can be matched with ours
    hello: Hello | None = None  # SMTP: the client's EHLO/HELO, repeated upstream


@dataclass(frozen=True)
class LoginResult:
    """What the upstream said about the logged-in session."""

    capabilities: str = ""  # IMAP: the upstream's capabilities after login
    extensions: tuple[str, ...] = ()  # SMTP: the EHLO keywords of the logged-in session

    @property
    def chunking(self) -> bool:
        """SMTP: BDAT carries a chunk (RFC 3030), so the command watch must skip it."""
        return any(e.split()[0].upper() == "CHUNKING" for e in self.extensions if e.split())


@implementer(IHalfCloseableProtocol)
class UpstreamConnection(Spliceable, Protocol):
    """The upstream side of a session: a line reader for the login dialogue, then relay input."""

    def __init__(self, settings: Upstream, reactor: IReactorTime) -> None:
        self.settings = settings
        self._reactor = reactor
        self._lines = LineBuffer(MAX_UPSTREAM_LINE)
        self._waiting: defer.Deferred[None] | None = None
        self._lost: Exception | None = None
        self.tls = settings.tls is TlsMode.IMPLICIT
        self.made: defer.Deferred[UpstreamConnection] | None = None  # fired when connected

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self.made is not None:
            made, self.made = self.made, None
            made.callback(self)

    @property
    def _server(self) -> ITLSTransport:
        """The upstream's transport (TCP, or TLS from the start): writes, aborts, starts TLS."""
        return cast(ITLSTransport, self.transport)

    # -- Twisted events --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.dataReceived(data)
            return
        self._lines.feed(data)
        self._wake()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay is not None:
            self.relay.connectionLost(reason)
            return
        self._lost = UpstreamError(f"connection closed by upstream ({reason.getErrorMessage()})")
        self._wake()

    # -- dialogue helpers ------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)

    def send(self, data: bytes) -> None:
        write_now(self._server, data)

    async def read_line(self) -> bytes:
        """The next line from the upstream; UpstreamError on close or timeout."""
        while True:
            line = self._lines.next_line()
            if isinstance(line, TooLong):
                raise UpstreamError("upstream sent an over-long line")
            if line is not None:
                return line
            if self._lost is not None:
                raise self._lost
            self._waiting = d = defer.Deferred[None]()
            timer = self._reactor.callLater(
                self.settings.timeout.total_seconds(), self._time_out, d
            )
            try:
                await d
            finally:
                if timer.active():
                    timer.cancel()

    def _time_out(self, d: defer.Deferred[None]) -> None:
        if self._waiting is d:
            self._waiting = None
            d.errback(
                UpstreamError(
                    f"no answer from upstream within {self.settings.timeout.total_seconds():g}s"
                )
            )
            self._server.abortConnection()

    async def start_tls(self) -> None:
        """STARTTLS: the upstream said OK; anything it sent after that is discarded (a MITM could
        have injected it), then the handshake runs with certificate verification."""
        self._lines.clear()
        self._server.startTLS(client_tls(self.settings))
        self.tls = True

    def take_leftover(self) -> bytes:
        return self._lines.clear()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()


def no_delay(transport: Any) -> None:
    """Send each write at once (TCP_NODELAY), as Dovecot and Postfix do on their sockets. A
    login is a few small replies in turn; with Nagle's algorithm a reply written while an
    earlier segment is unacknowledged (the TLS session tickets after a STARTTLS handshake) waits
    for the peer's delayed ACK, about 40 ms per login. TLS and PROXY-protocol wrappers pass the
    call to their TCP transport; in-memory test transports have no such call."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def write_now(transport: Any, data: bytes) -> None:
    """Write to a plain TCP transport with nothing waiting to go at once, with one send(): a
    Twisted write waits for the reactor's next turn, which costs two epoll updates and a write
    event per reply. What the socket does not take, a TLS or wrapped transport (PROXY protocol,
    tests' in-memory ones), and a transport closing or with data queued write as usual."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):  # otherwise the connection is lost: write() finds out
            data = data[sent:]
    if data:
        transport.write(data)


# One TLS client creator (its OpenSSL context, the trust store loaded into it) per upstream,
# shared by its connections: made for each connection it cost 0.8 ms of CPU with a ca_file and
# 5.4 ms with the system store (every CA certificate parsed), against 0.2-0.3 ms for a
# connection from a shared one. Keyed by what it is made from; the ca_file's identity (inode,
# size, mtime) is part of it, so a replaced file is read at the next connection. The system
# store is read again on reload (`forget_tls`).
_TLS_CREATORS: dict[tuple, tuple[tuple, IOpenSSLClientConnectionCreator]] = {}


def client_tls(settings: Upstream) -> IOpenSSLClientConnectionCreator:
    name = settings.server_name or settings.host
    ca_file = str(settings.ca_file) if settings.ca_file else None
    key = (name, ca_file, settings.verify)
    try:
        stamp: tuple = _file_stamp(ca_file) if ca_file and settings.verify else ()
    except OSError:
        stamp = ("unreadable",)  # upstream_tls says why, as before
    known = _TLS_CREATORS.get(key)
    if known is not None and known[0] == stamp:
        return known[1]
    creator = upstream_tls(name, ca_file=ca_file, verify=settings.verify)
    _TLS_CREATORS[key] = (stamp, creator)
    return creator


def forget_tls() -> None:
    """Make each upstream's TLS context again at its next connection (SIGHUP: a renewed system
    trust store)."""
    _TLS_CREATORS.clear()


def _file_stamp(path: str) -> tuple:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _Connecting(ClientFactory):
    """One upstream connection made with the reactor's connectTCP: no endpoint wrapper between
    the socket and the UpstreamConnection, so each upstream read of the session is one call
    fewer, and a connect is a few objects fewer. Fires `made` on connectionMade."""

    noisy = False  # no "Starting factory" log event per connection

    def __init__(self, settings: Upstream, reactor: Any) -> None:
        self.settings, self.reactor = settings, reactor
        self.made: defer.Deferred[UpstreamConnection] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        proto = UpstreamConnection(self.settings, self.reactor)
        proto.factory = self
        proto.made = self.made
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.made.called:
            self.made.errback(reason)


async def connect(settings: Upstream, reactor: Any) -> UpstreamConnection:
    """A TCP (or implicit TLS) connection to the upstream; UpstreamError if that fails."""
    timeout = settings.connect_timeout.total_seconds()
    try:
        if isIPAddress(settings.host) or isIPv6Address(settings.host):
            # An address: no resolver round trip through a thread, no endpoint.
            connecting = _Connecting(settings, reactor)
            factory: IProtocolFactory = connecting
            if settings.tls is TlsMode.IMPLICIT:
                factory = TLSMemoryBIOFactory(client_tls(settings), True, factory)
            reactor.connectTCP(settings.host, settings.port, factory, timeout=timeout)
            return await connecting.made
        factory = Factory.forProtocol(lambda: UpstreamConnection(settings, reactor))
        if settings.tls is TlsMode.IMPLICIT:
            factory = TLSMemoryBIOFactory(client_tls(settings), True, factory)
        endpoint = HostnameEndpoint(reactor, settings.host, settings.port, timeout=timeout)
        proto = await endpoint.connect(factory)
    except (error.ConnectError, error.DNSLookupError, error.TimeoutError, OSError) as exc:
        raise UpstreamError(
            f"cannot connect to {settings.host}:{settings.port}: {exc.__class__.__name__}"
        ) from None
    return cast(UpstreamConnection, getattr(proto, "wrappedProtocol", proto))
