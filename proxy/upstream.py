"""Connecting to an upstream mail server and talking to it line by line until the relay starts.

Each protocol's login dialogue (proxy/imap/upstream.py, …) is a coroutine over an
UpstreamConnection: `await conn.read_line()`, `conn.send(...)`, `await conn.start_tls()`.
After the login the connection's leftover bytes go to the client and the relay takes over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IOpenSSLClientConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
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
        self._server.write(data)

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


def client_tls(settings: Upstream) -> IOpenSSLClientConnectionCreator:
    return upstream_tls(
        settings.server_name or settings.host,
        ca_file=str(settings.ca_file) if settings.ca_file else None,
        verify=settings.verify,
    )


async def connect(settings: Upstream, reactor: Any) -> UpstreamConnection:
    """A TCP (or implicit TLS) connection to the upstream; UpstreamError if that fails."""
    factory: IProtocolFactory = Factory.forProtocol(lambda: UpstreamConnection(settings, reactor))
    if settings.tls is TlsMode.IMPLICIT:
        factory = TLSMemoryBIOFactory(client_tls(settings), True, factory)
    timeout = settings.connect_timeout.total_seconds()
    endpoint: IStreamClientEndpoint
    if isIPAddress(settings.host):  # no resolver round trip through a thread for an address
        endpoint = TCP4ClientEndpoint(reactor, settings.host, settings.port, timeout=timeout)
    elif isIPv6Address(settings.host):
        endpoint = TCP6ClientEndpoint(reactor, settings.host, settings.port, timeout=timeout)
    else:
        endpoint = HostnameEndpoint(reactor, settings.host, settings.port, timeout=timeout)
    try:
        proto = await endpoint.connect(factory)
    except (error.ConnectError, error.DNSLookupError, error.TimeoutError, OSError) as exc:
        raise UpstreamError(
            f"cannot connect to {settings.host}:{settings.port}: {exc.__class__.__name__}"
        ) from None
    return cast(UpstreamConnection, getattr(proto, "wrappedProtocol", proto))
