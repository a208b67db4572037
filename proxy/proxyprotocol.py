"""HAProxy PROXY protocol (v1 text, v2 binary) for listeners behind a load balancer.

Two pieces, after haproxy's doc/proxy-protocol.txt:

* `ProxyHeaderParser`, a sans-IO parser: `receive_data(bytes)` returns None until it can decide,
  then either a `ProxyHeader` (the client's address as the load balancer saw it, or none for
  LOCAL/UNKNOWN: use the real peer; plus the bytes that followed the header) or a `ProxyError`.
  It never looks past the header: everything after it is handed back untouched in `remaining`.
* `TrustedProxies`, the listener policy: which peers must send a header. The spec forbids
  guessing whether a header is present (§2 and §5: "MUST not try to guess"), so the choice is
  made from the real peer address alone, before any byte is read:

    - peer inside a trusted CIDR   -> `Expect.HEADER`: a header is mandatory; a missing or
                                      malformed one closes the connection (§2.1: "must ... cause
                                      the receiver to abort the connection").
    - peer outside, required=False -> `Expect.DIRECT`: a direct client; its bytes are the mail
                                      protocol, never parsed as PROXY, so it cannot spoof.
    - peer outside, required=True  -> `Expect.REFUSE`: the listener only serves the load
                                      balancer; close the connection before saying anything.

  `ProxyProtocolFactory` is the thin Twisted adapter: it wraps a listener's factory (outside any
  TLS layer, since the header precedes the TLS handshake on implicit-TLS ports), holds the
  wrapped protocol's `connectionMade` back until the header is complete (§2: the receiver "MUST
  NOT start processing the connection before it receives a complete and valid PROXY protocol
  header" -- the greeting would otherwise race the header), and makes `transport.getPeer()` /
  `getHost()` return the addresses from the header.

Example::

    parser = ProxyHeaderParser()
    result = parser.receive_data(b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 993\\r\\nA1 NOOP\\r\\n")
    # ProxyHeader(version=1, protocol='TCP4', source=Endpoint('192.0.2.7', 51234),
    #             destination=Endpoint('198.51.100.1', 993), remaining=b"A1 NOOP\\r\\n", length=45)

    trusted = TrustedProxies.parse(["10.0.0.0/8", "2001:db8::/32"], required=False)
    reactor.listenTCP(143, ProxyProtocolFactory(imap_factory, trusted))
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, NamedTuple, cast

from twisted.internet import address
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol, ITCPTransport, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvides, providedBy

# --- limits -----------------------------------------------------------------------------------

# v1 line, CRLF included: proxy-protocol.txt §2.1 worst case
# "PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n" is 107 chars; "If the CRLF
# sequence is not found in the first 107 characters, the receiver should declare the line
# invalid." nginx: NGX_PROXY_PROTOCOL_V1_MAX_HEADER 107.
V1_MAX_HEADER = 107

# v2 header, the 16 fixed octets included. The length field allows 16 + 65535, but nobody needs
# that: the spec (§2) designs both formats to fit one 536-octet segment without TLVs, its sample
# receiver (§9) reads only 16 + 216; TLVs (ALPN, authority, unique id <= 128, SSL info, AWS/Azure
# endpoint ids) add a few hundred octets at most. nginx reads at most
# NGX_PROXY_PROTOCOL_MAX_HEADER = 4096 octets; a longer header is refused at once.
V2_MAX_HEADER = 4096

# Time a trusted peer has to deliver its header before the connection is dropped: 30 s, nginx's
# proxy_protocol_timeout default; the spec asks for at least 3 s (one TCP retransmit, §2).
HEADER_TIMEOUT = 30.0

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # §2.2, 12 octets
V2_FIXED = 16  # signature, version/command, family/protocol, 2-octet length

_V2_COMMAND_LOCAL = 0x0
_V2_COMMAND_PROXY = 0x1
_V2_TCP4 = 0x11  # AF_INET + STREAM
_V2_TCP6 = 0x21  # AF_INET6 + STREAM
_V2_ADDRESS_LENGTH = {_V2_TCP4: 12, _V2_TCP6: 36}

_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")  # §2.1: decimal, no heading zeroes


# --- results ----------------------------------------------------------------------------------


class Endpoint(NamedTuple):
    host: str  # textual IPv4 or IPv6 address (no brackets, no zone)
    port: int


@dataclass(frozen=True)
class ProxyHeader:
    """A complete, valid header.

    `protocol` is "TCP4" or "TCP6" when the header carries the client's addresses; otherwise
    "LOCAL" (v2 LOCAL: the load balancer's own connection, e.g. a health check), "UNKNOWN" (v1)
    or "UNSPEC" (v2 PROXY with a family this proxy does not relay: UNSPEC, UDP, AF_UNIX; the
    spec lets the receiver fall back to the real endpoints). Then `source` and `destination`
    are None: use the real peer and host.
    """

    version: int
    protocol: str
    source: Endpoint | None
    destination: Endpoint | None
    remaining: bytes  # the bytes that followed the header: the start of the client's stream
    length: int  # octets the header took

    @property
    def local(self) -> bool:
        """True when the connection's real endpoints are to be used."""
        return self.source is None


@dataclass(frozen=True)
class ProxyError:
    """The input is not a valid PROXY header; the connection must be closed (§2.1)."""

    reason: str


Result = ProxyHeader | ProxyError


# --- the parser -------------------------------------------------------------------------------


class ProxyHeaderParser:
    """Sans-IO parser for one PROXY header (v1 or v2) at the start of a connection.

    Feed it every byte received until it returns something other than None. It buffers at most
    `V2_MAX_HEADER` octets of an incomplete header; once it returns a result it is done, and
    feeding it again is a bug (RuntimeError).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._done = False

    def receive_data(self, data: bytes) -> Result | None:
        if self._done:
            raise RuntimeError("ProxyHeaderParser already returned its result")
        self._buf += data
        result = self._parse()
        if result is not None:
            self._done = True
            self._buf = bytearray()
        return result

    def _parse(self) -> Result | None:
        buf = self._buf
        if not buf:
            return None
        if buf[0] == V2_SIGNATURE[0]:
            return self._parse_v2(buf)
        if buf[0] == V1_PREFIX[0]:
            return self._parse_v1(buf)
        return ProxyError("not a PROXY protocol header")

    # v1 -------------------------------------------------------------------------------------

    def _parse_v1(self, buf: bytearray) -> Result | None:
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            return ProxyError("not a PROXY protocol header")
        window = bytes(buf[:V1_MAX_HEADER])
        lf = window.find(b"\n")
        cr = window.find(b"\r")
        if cr >= 0 and cr + 1 < len(window) and window[cr + 1] != 0x0A:
            return ProxyError("v1: CR not followed by LF")
        if lf < 0:
            if len(buf) >= V1_MAX_HEADER:
                return ProxyError(f"v1: no CRLF within {V1_MAX_HEADER} octets")
            return None
        if lf == 0 or window[lf - 1] != 0x0D:
            return ProxyError("v1: line ends in a bare LF")
        line = window[: lf - 1]
        remaining = bytes(buf[lf + 1 :])
        return _decode_v1(line, lf + 1, remaining)

    # v2 -------------------------------------------------------------------------------------

    def _parse_v2(self, buf: bytearray) -> Result | None:
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] != V2_SIGNATURE[:n]:
            return ProxyError("not a PROXY protocol header")
        if len(buf) < V2_FIXED:
            # Check version/command and family as soon as they arrive.
            return _check_v2_fixed(buf) if len(buf) > len(V2_SIGNATURE) else None
        problem = _check_v2_fixed(buf)
        if problem is not None:
            return problem
        (length,) = struct.unpack_from("!H", buf, 14)
        total = V2_FIXED + length
        if total > V2_MAX_HEADER:
            return ProxyError(f"v2: header of {total} octets exceeds {V2_MAX_HEADER}")
        if len(buf) < total:
            return None
        command = buf[12] & 0x0F
        family = buf[13]
        block = bytes(buf[V2_FIXED:total])
        remaining = bytes(buf[total:])
        if command == _V2_COMMAND_LOCAL:
            # §2.2: "must use the real connection endpoints and discard the protocol block
            # including the family which is ignored".
            return ProxyHeader(2, "LOCAL", None, None, remaining, total)
        need = _V2_ADDRESS_LENGTH.get(family)
        if need is None:
            return ProxyHeader(2, "UNSPEC", None, None, remaining, total)
        if length < need:
            return ProxyError(f"v2: address block of {length} octets, family needs {need}")
        src: ipaddress.IPv4Address | ipaddress.IPv6Address
        dst: ipaddress.IPv4Address | ipaddress.IPv6Address
        if family == _V2_TCP4:
            src, dst = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
            sport, dport = struct.unpack_from("!HH", block, 8)
            proto = "TCP4"
        else:
            src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
            sport, dport = struct.unpack_from("!HH", block, 32)
            proto = "TCP6"
        # TLVs after the address block are skipped: nothing here needs them.
        return ProxyHeader(
            2, proto, Endpoint(str(src), sport), Endpoint(str(dst), dport), remaining, total
        )


def _check_v2_fixed(buf: bytearray) -> ProxyError | None:
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        return ProxyError(f"v2: version {ver_cmd >> 4}, only 2 exists")
    if ver_cmd & 0x0F not in (_V2_COMMAND_LOCAL, _V2_COMMAND_PROXY):
        return ProxyError(f"v2: unknown command {ver_cmd & 0x0F}")
    if len(buf) > 13:
        family, proto = buf[13] >> 4, buf[13] & 0x0F
        if family > 3 or proto > 2:
            return ProxyError(f"v2: invalid address family/protocol 0x{buf[13]:02x}")
    return None


def _decode_v1(line: bytes, length: int, remaining: bytes) -> Result:
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # §2.1: "the receiver must ignore anything presented before the CRLF is found".
        return ProxyHeader(1, "UNKNOWN", None, None, remaining, length)
    parts = line.split(b" ")
    proto = parts[1] if len(parts) > 1 else b""
    if proto == b"TCP4":
        family: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif proto == b"TCP6":
        family = ipaddress.IPv6Address
    else:
        return ProxyError("v1: protocol must be TCP4, TCP6 or UNKNOWN")
    if len(parts) != 6:
        return ProxyError("v1: expected PROXY TCP4|TCP6 <src> <dst> <sport> <dport>")
    src, dst, sport, dport = parts[2:]
    addrs = []
    for raw in (src, dst):
        addr = _v1_address(raw, family)
        if addr is None:
            return ProxyError(f"v1: bad {proto.decode()} address")
        addrs.append(addr)
    ports = []
    for raw in (sport, dport):
        if not _PORT.fullmatch(raw) or int(raw) > 65535:
            return ProxyError("v1: bad port")
        ports.append(int(raw))
    return ProxyHeader(
        1,
        proto.decode(),
        Endpoint(addrs[0], ports[0]),
        Endpoint(addrs[1], ports[1]),
        remaining,
        length,
    )


def _v1_address(raw: bytes, family: type) -> str | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if not text or "%" in text or not text.isprintable():
        return None  # no IPv6 zone ids; the spec's format has none
    try:
        # ipaddress refuses heading zeroes in IPv4 octets, as §2.1 requires.
        return str(family(text))
    except ValueError:
        return None


# --- listener policy --------------------------------------------------------------------------


class Expect(enum.Enum):
    HEADER = "header"  # trusted peer: a PROXY header is mandatory
    DIRECT = "direct"  # untrusted peer on an open listener: no header is read
    REFUSE = "refuse"  # untrusted peer on a listener that requires the load balancer


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TrustedProxies:
    """Which peers may (and then must) send a PROXY header on a listener."""

    networks: tuple[Network, ...]
    required: bool = False

    @classmethod
    def parse(cls, cidrs: Iterable[str], required: bool = False) -> TrustedProxies:
        """Build from CIDR strings ("10.0.0.0/8", "2001:db8::1"); ValueError names a bad one."""
        nets = []
        for cidr in cidrs:
            try:
                nets.append(ipaddress.ip_network(cidr, strict=True))
            except ValueError as e:
                raise ValueError(f"not a network in CIDR form: {cidr!r} ({e})") from None
        return cls(tuple(nets), required)

    def trusts(self, peer_host: str) -> bool:
        try:
            ip = ipaddress.ip_address(peer_host.split("%", 1)[0])
        except ValueError:
            return False  # a UNIX socket or something else without an IP: never trusted
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d.
            candidates.append(ip.ipv4_mapped)
        return any(
            c in net for c in candidates for net in self.networks if c.version == net.version
        )

    def expect(self, peer_host: str) -> Expect:
        if self.trusts(peer_host):
            return Expect.HEADER
        return Expect.REFUSE if self.required else Expect.DIRECT


# --- Twisted adapter --------------------------------------------------------------------------


def _twisted_address(endpoint: Endpoint, like: object) -> address.IPv4Address | address.IPv6Address:
    # The real peer's address: Twisted's IPv4Address/IPv6Address allow only "TCP" and "UDP".
    kind: Literal["TCP", "UDP"] = getattr(like, "type", "TCP")
    if ":" in endpoint.host:
        return address.IPv6Address(kind, endpoint.host, endpoint.port)
    return address.IPv4Address(kind, endpoint.host, endpoint.port)


class ProxyProtocolWrapper(ProtocolWrapper):
    """Reads the PROXY header (if the peer is trusted) before the wrapped protocol starts.

    `header` is the parsed ProxyHeader, or None for a direct connection. Half-close is passed on
    only when the wrapped protocol's class declares IHalfCloseableProtocol (a TLS layer never
    does: there a read EOF is a full close, as without this wrapper).
    """

    header: ProxyHeader | None = None
    _parser: ProxyHeaderParser | None = None
    _started = False
    _timer = None

    def makeConnection(self, transport):
        # As ProtocolWrapper.makeConnection, but the wrapped protocol starts only after the header.
        directlyProvides(self, providedBy(transport))
        if IHalfCloseableProtocol.implementedBy(type(self.wrappedProtocol)):
            alsoProvides(self, IHalfCloseableProtocol)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        expect = self.factory.trusted.expect(transport.getPeer().host)
        if expect is Expect.REFUSE:
            self.factory.rejected(transport.getPeer(), "peer is not a trusted proxy")
            transport.abortConnection()
            return
        if expect is Expect.DIRECT:
            self._start(b"")
            return
        self._parser = ProxyHeaderParser()
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        self._fail(f"no complete PROXY header within {self.factory.timeout:g} s")

    def _fail(self, reason: str) -> None:
        self._parser = None
        # Twisted types `transport` as ITransport | None; while the header is awaited it is the
        # listener's connected TCP transport (this wrapper is outermost).
        transport = cast(ITCPTransport, self.transport)
        self.factory.rejected(transport.getPeer(), reason)
        transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self, data: bytes) -> None:
        self._cancel_timer()
        self._started = True
        self._parser = None
        # The wrapper is the wrapped protocol's transport: makeConnection made it provide the
        # real transport's interfaces (directlyProvides), which mypy cannot see.
        self.wrappedProtocol.makeConnection(cast(ITransport, self))
        if data and self.connected:
            self.wrappedProtocol.dataReceived(data)

    def dataReceived(self, data):
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            return  # refused or failed: ignore anything still arriving
        result = self._parser.receive_data(data)
        if result is None:
            return
        if isinstance(result, ProxyError):
            self._cancel_timer()
            self._fail(result.reason)
            return
        self.header = result
        self._start(result.remaining)

    def getPeer(self) -> IAddress:
        real = cast(ITCPTransport, self.transport).getPeer()
        if self.header is not None and self.header.source is not None:
            return _twisted_address(self.header.source, real)
        return real

    def getHost(self) -> IAddress:
        real = cast(ITCPTransport, self.transport).getHost()
        if self.header is not None and self.header.destination is not None:
            return _twisted_address(self.header.destination, real)
        return real

    def readConnectionLost(self) -> None:
        if self._started:
            # Only called when the wrapped protocol is half-closeable (makeConnection).
            cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()
        else:
            cast(ITCPTransport, self.transport).loseConnection()  # EOF before a whole header

    def writeConnectionLost(self) -> None:
        if self._started:
            cast(IHalfCloseableProtocol, self.wrappedProtocol).writeConnectionLost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self.connected = 0
        self.factory.unregisterProtocol(self)
        if self._started:
            self.wrappedProtocol.connectionLost(reason)
        # Let go of the session's protocol now; nothing reads it after the connection is gone.
        self.wrappedProtocol = None  # type: ignore[assignment]


class ProxyProtocolFactory(WrappingFactory):
    """Wrap a listener's factory so that trusted peers' PROXY headers are honoured.

    Put it outermost: `listenTCP(port, ProxyProtocolFactory(TLSMemoryBIOFactory(ctx, False,
    frontend_factory), trusted))` for implicit TLS. `on_reject(peer, reason)` is called for each
    refused or malformed connection (for the audit log), and for a trusted peer that sends no
    complete header within `timeout` seconds; the connection is then aborted.
    """

    protocol = ProxyProtocolWrapper

    def __init__(
        self,
        wrappedFactory,  # noqa: N803 (WrappingFactory's name)
        trusted: TrustedProxies,
        on_reject=None,
        timeout: float = HEADER_TIMEOUT,
        clock=None,
    ):
        super().__init__(wrappedFactory)
        self.trusted = trusted
        self._on_reject = on_reject
        self.timeout = timeout
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock

    def rejected(self, peer, reason: str) -> None:
        if self._on_reject is not None:
            self._on_reject(peer, reason)
