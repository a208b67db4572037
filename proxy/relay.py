"""Splice two connected transports and relay bytes both ways, with back-pressure and half-close.

The relay knows nothing of mail protocols. A frontend that has finished its pre-auth phase (and
an upstream connection that has logged in) hands over both transports and whatever each side
had already buffered; from then on every byte from the client goes to the upstream and back.

Wiring: the frontend's protocol stays its transport's protocol and forwards its events to the
relay's `client` side (the upstream protocol does the same to `upstream`): `dataReceived` and
`connectionLost` in frontend.py and upstream.py, the half-close events through `Spliceable`;
`Frontend._splice` builds the Relay with both transports and their leftovers.

Why forwarding rather than swapping the relay in as the transport's protocol: under TLS the
object the socket delivers to is not the frontend. With implicit TLS (listenSSL) the socket's
protocol is Twisted's TLSMemoryBIOProtocol and the frontend is its `wrappedProtocol`; after
STARTTLS the tcp.Connection's `protocol` is replaced by a TLS wrapper whose `wrappedProtocol` is
the frontend; a PROXY-protocol wrapper adds one more layer. Swapping would mean reaching into
those private attributes, differently in each case. Forwarding works the same for all of them,
keeps the frontend the owner of its connection (idle timers, session registry, connectionLost),
and costs one Python call per received chunk.

Flow control: each transport gets a streaming producer registered (IConsumer.registerProducer).
When a transport's write buffer passes its limit, Twisted calls pauseProducing on that producer,
and the relay stops reading the *other* transport (pauseProducing on it); resumeProducing when
the buffer has drained. So per direction the proxy holds at most (see `BUFFER_BOUND`):

    * the target's Twisted write buffer: it pauses its producer when it holds more than
      FileDescriptor.bufferSize = 64 KiB; the reading side may still deliver the rest of the
      chunk it is in (one recv of at most tcp.Connection.bufferSize = 64 KiB, which a TLS
      reader decrypts into at most as many plaintext octets) -> at most 128 KiB, plus TLS record
      overhead (about 0.2 %: 22-29 octets per 16 KiB record) when the target speaks TLS;
    * for a TLS target, Twisted's small-write aggregation (BufferingTLSTransport) holds less
      than 64,000 plaintext octets until the next reactor turn;
    * TLS state in OpenSSL's memory BIO is flushed after each 16 KiB record (a handful of KiB).

tests/integration/test_relay.py checks the bound while 50 MB pass to a client that keeps
stalling (without the producers some 40 MB pile up). The kernel's socket buffers (autotuned up
to net.ipv4.tcp_wmem / tcp_rmem) come on top. The leftovers handed over at start are written at
once; the frontend's pre-auth limits bound them.

With a hook (below) a side's own bytes can produce replies back to that side, so a client that
sends commands without reading replies must not grow its buffer without bound: when a hooked
side's write buffer is full the relay pauses reading from that side as well as from its peer.

Ends: a read EOF on one side (IHalfCloseableProtocol.readConnectionLost) becomes a write
half-close (loseWriteConnection) on the other when that transport is plain TCP; a TLS transport
has no half-close (a TCP FIN under TLS would bypass close_notify and any unflushed records), so
it is closed instead (loseConnection: flush, close_notify, close). When a side's connection is
lost, cleanly or with an error, the other side flushes what it was given and closes: a peer that
was sent bytes before an error still gets them (an error closes both either way). `abort()`
(session revoked, idle timeout) drops both at once. `done` fires once, after both transports
are gone, with a RelayResult for the audit log.

Hooks: `client_hook(data) -> (to_upstream, to_client)` sees every chunk from the client,
leftovers included, and decides what reaches the upstream and what the proxy answers itself (the
SMTP relay refuses XCLIENT after login this way). `upstream_hook(data) -> (to_client,
to_upstream)` is the same for the other direction (to follow the upstream's replies, e.g. to
know whether DATA was accepted, and to slot the proxy's own replies in order). A hook keeps its
own state across chunks (a command can be split anywhere); it may call `relay.abort(reason)` to
end the session, and `relay.client.pause_reading(key)` / `resume_reading(key)` to hold a side's
input (SMTP: until the upstream answers DATA). An exception from a hook is a bug: the session is
aborted. Without a hook the per-chunk path is a length count and a write.

Splice: when both transports are bare TCP sockets (no TLS, no PROXY-protocol wrapper) and no
side has a hook, octets move by splice(2) (splice.py) from the first read of `splice_after`
octets or more (a bulk transfer; commands, short replies and IDLE notices cost less copied than
the handover, so most sessions of a polling client never splice). The relay stops reading both,
waits until Twisted has written what it held for them (`HANDOVER_TURNS`) and hands both
descriptors to a `Splicer`; the bound is then the pipe, `BUFFER_BOUND_SPLICE` per direction. On
end of stream, an error, `close_with`, `abort` or `pause_reading` it takes them back, writes
what the pipes held through the transports and goes on copying (a transport reading again meets
the same end of stream; an error goes to its connectionLost as Twisted's would).
`RelayResult.spliced` counts the octets spliced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITCPTransport, ITransport
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol, _AggregateSmallWrites
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy import splice as splicing

log = Logger()

# --- the bound, from Twisted's own constants (so that it follows Twisted if they change) ------

# A transport pauses its producer once its write buffer holds more than this
# (twisted.internet.abstract.FileDescriptor.bufferSize, 64 KiB).
TRANSPORT_WRITE_BUFFER = FileDescriptor.bufferSize
# What one read can still deliver after a pause: tcp.Connection reads bufferSize octets per
# doRead (64 KiB); a TLS reader decrypts that into at most as many plaintext octets.
READ_CHUNK = FileDescriptor.bufferSize
# BufferingTLSTransport aggregates small writes up to this many plaintext octets
# (twisted.protocols.tls._AggregateSmallWrites.MAX_BUFFER_SIZE, 64,000).
TLS_WRITE_AGGREGATION = _AggregateSmallWrites.MAX_BUFFER_SIZE
# TLS record overhead on top of 16 KiB records (TLS 1.2 AES-GCM: 5 + 8 + 16 = 29 octets);
# rounded up generously.
TLS_OVERHEAD_SLACK = 4096

# Most octets one direction of a relay holds in user space for a plain TCP target, and for a
# TLS target. Tests measure against these.
BUFFER_BOUND_TCP = TRANSPORT_WRITE_BUFFER + READ_CHUNK
BUFFER_BOUND_TLS = BUFFER_BOUND_TCP + TLS_WRITE_AGGREGATION + TLS_OVERHEAD_SLACK
BUFFER_BOUND = BUFFER_BOUND_TLS
# ... and for a spliced direction: the pipe (splicing.PIPE_CHUNK, the Linux default pipe size).
BUFFER_BOUND_SPLICE = splicing.PIPE_CHUNK

# Reactor turns the splice handover waits for Twisted to write what it holds for both sides
# (usually two: the login reply goes out on the next write event); a client that does not take
# even that stays on the copy path.
HANDOVER_TURNS = 10

# One read of this many octets starts splicing (splice_after): a message body, not a command or
# a short reply. A handover costs ~130 µs of CPU, 11% of a warm login (bench/run.py --only warm).
SPLICE_AFTER = 16 * 1024
_HANDOVER = "splice handover"  # pause key while it waits

# (bytes from this side) -> (bytes for the peer, bytes back to this side)
Hook = Callable[[bytes], "tuple[bytes, bytes]"]


class RelayTransport(Protocol):
    """What the relay uses of a transport. Twisted types a protocol's `transport` as ITransport,
    but every transport a relay is given (tcp.Connection, TLSMemoryBIOProtocol, a
    ProtocolWrapper in front of either) is also a push producer and a consumer and can abort."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def loseWriteConnection(self) -> None: ...  # only called when supports_half_close() says so
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class Spliceable:
    """Mixin for a Protocol that hands its half-close events to a relay side once spliced;
    before that, a peer that stops sending is gone (a pre-auth half-close ends the connection)."""

    relay: RelaySide | None = None  # a RelaySide once spliced
    transport: ITransport | None  # the Protocol's (twisted.internet.protocol.BaseProtocol)

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.readConnectionLost()
        else:
            assert self.transport is not None  # a read EOF comes only from a connected transport
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.writeConnectionLost()


@dataclass(frozen=True)
class RelayResult:
    """How a relayed session ended, for the audit log.

    bytes_up: octets written to the upstream (client data after any hook, leftovers included,
        plus upstream-hook replies).
    bytes_down: octets written to the client (upstream data, leftovers and client-hook replies).
    closed_by: "client", "upstream" or "proxy" -- whichever ended first.
    reason: short text ("end of stream", the error's message, or the abort reason).
    clean: True when the first end was an orderly close (EOF / ConnectionDone).
    spliced: octets of bytes_up + bytes_down moved by splice(2) (0: copied, e.g. TLS or a hook).
    """

    bytes_up: int
    bytes_down: int
    closed_by: str
    reason: str
    clean: bool
    spliced: int = 0


def supports_half_close(transport: object) -> bool:
    """Whether loseWriteConnection on this transport is a real half-close: plain TCP only.

    Under TLS (listenSSL's TLSMemoryBIOProtocol, or a tcp.Connection after startTLS, which then
    provides ISSLTransport) the call would reach the TCP socket beneath the TLS layer.
    """
    t: object = transport
    while True:
        if isinstance(t, TLSMemoryBIOProtocol) or ISSLTransport.providedBy(t):
            return False
        if isinstance(t, ProtocolWrapper) and t.transport is not None:
            t = t.transport
            continue
        return ITCPTransport.providedBy(t) and callable(getattr(t, "loseWriteConnection", None))


@implementer(IPushProducer)
class _WriteBufferWatch:
    """Registered on one side's transport: its write buffer's full/drained signals pause and
    resume reading on the sides that feed it."""

    def __init__(self, full: RelaySide, feeders: list[RelaySide]) -> None:
        self.full = full
        self.feeders = feeders
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.full.pauses += 1
            for side in self.feeders:
                side._pause(self)

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            for side in self.feeders:
                side._resume(self)

    def stopProducing(self) -> None:
        # The transport is gone; its connectionLost (forwarded to the relay) does the work.
        self.resumeProducing()


class RelaySide:
    """One end of a relay ("client" or "upstream"). The protocol of that end's transport calls
    these four methods; they have IProtocol's names so forwarding is one line each."""

    def __init__(self, relay: Relay, name: str, transport: ITransport) -> None:
        self.relay = relay
        self.name = name
        self.transport = cast(RelayTransport, transport)  # see RelayTransport
        self.peer: RelaySide = self  # set by Relay
        self.alive = True  # transport not yet lost
        self.eof = False  # nothing more will be read from this side
        self.write_closed = False  # we half-closed or closed its write side
        self.forwarded = 0  # octets from this side written to the peer
        self.replied = 0  # octets the hook answered this side with
        self.pauses = 0  # times this side's write buffer filled up (back-pressure events)
        self.hook: Hook | None = None
        self._watch: _WriteBufferWatch | None = None
        self._closing = False  # loseConnection or abortConnection already called
        self._paused_by: set[object] = set()

    # -- events from the transport's protocol ----------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._forward(data)

    def _forward(self, data: bytes) -> None:
        peer = self.peer
        if peer.alive and not peer.write_closed:
            self.forwarded += len(data)
            peer.transport.write(data)

    def _forward_until_bulk(self, data: bytes) -> None:
        """The copy path while a splice-able session has not yet read `splice_after` at once."""
        self._forward(data)
        if len(data) >= self.relay.splice_after:
            self.relay._begin_handover()

    def _forward_hooked(self, data: bytes) -> None:
        hook = self.hook
        assert hook is not None  # Relay installs this method only on a side with a hook
        try:
            to_peer, to_self = hook(data)
        except Exception:
            log.failure("relay {side} hook failed; aborting the session", side=self.name)
            self.relay.abort(f"{self.name} hook failed")
            return
        self.deliver(to_peer, to_self)

    def deliver(self, to_peer: bytes, to_self: bytes) -> None:
        """Write what this side's hook decided, outside a read too (an answer the hook's owner
        got later, such as the store's for SMTP's daily cap): its answer to this side first."""
        if to_self and self.alive and not self.write_closed:
            self.replied += len(to_self)
            self.transport.write(to_self)
        if to_peer:
            self._forward(to_peer)

    def readConnectionLost(self) -> None:
        self.relay._side_eof(self)

    def writeConnectionLost(self) -> None:
        self.write_closed = True

    def connectionLost(self, reason: Failure) -> None:
        self.relay._side_lost(self, reason)

    # -- reading control -------------------------------------------------------------------

    @property
    def reading_paused(self) -> bool:
        return bool(self._paused_by)

    def pause_reading(self, key: object) -> None:
        """Stop reading this side until `resume_reading(key)`; keys nest with back-pressure."""
        self.relay._unsplice()
        self._pause(key)

    def resume_reading(self, key: object) -> None:
        self._resume(key)

    def _pause(self, why: object) -> None:
        if not self._paused_by and self.alive and not self.eof:
            self.transport.pauseProducing()
        self._paused_by.add(why)

    def _resume(self, why: object) -> None:
        if why not in self._paused_by:
            return
        self._paused_by.discard(why)
        if not self._paused_by and self.alive and not self.eof:
            self.transport.resumeProducing()

    def _release_watch(self) -> None:
        """Unregister the producer from this side's transport before closing it (a registered,
        paused producer keeps FileDescriptor and TLS from ever closing), and un-pause the
        sides it was holding back."""
        watch, self._watch = self._watch, None
        if watch is None:
            return
        watch.resumeProducing()
        if self.alive:
            self.transport.unregisterProducer()

    def _close_write(self) -> None:
        if self.write_closed or not self.alive:
            return
        self.write_closed = True
        self._release_watch()
        if supports_half_close(self.transport):
            self.transport.loseWriteConnection()
        else:
            self._closing = True
            self.transport.loseConnection()

    def _close(self) -> None:
        if not self.alive or self._closing:
            return
        self._closing = True
        self.write_closed = True
        self._release_watch()
        self.transport.loseConnection()


class Relay:
    """Relay bytes between an authenticated client and its upstream until either side ends.

    client_pending: bytes the client sent that the frontend read but did not consume (sent to
        the upstream first, through the hook if any).
    upstream_pending: bytes the upstream sent after its login reply (sent to the client first).
    client_ended / upstream_ended: that side already sent its EOF (readConnectionLost) before
        the handover -- a client that pipelined its commands and half-closed; the relay
        delivers the pending bytes, then passes the EOF on.
    client_hook / upstream_hook: optional filters, see the module docstring.
    """

    def __init__(
        self,
        client: ITransport,
        upstream: ITransport,
        *,
        client_pending: bytes = b"",
        upstream_pending: bytes = b"",
        client_ended: bool = False,
        upstream_ended: bool = False,
        client_hook: Hook | None = None,
        upstream_hook: Hook | None = None,
        splice: bool = True,
        splice_after: int = SPLICE_AFTER,
    ) -> None:
        self.client = RelaySide(self, "client", client)
        self.upstream = RelaySide(self, "upstream", upstream)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        for side, hook in ((self.client, client_hook), (self.upstream, upstream_hook)):
            side.hook = hook
            # Bound per instance: with no hook, nothing but the count and the write per chunk.
            forward = side._forward if hook is None else side._forward_hooked
            side.dataReceived = forward  # type: ignore[method-assign]  # bound per instance
        self._client_pending = client_pending
        self._upstream_pending = upstream_pending
        self._ended_before = {"client": client_ended, "upstream": upstream_ended}
        self._first_end: tuple[str, str, bool] | None = None
        self._started = False
        self._may_splice = splice and client_hook is None and upstream_hook is None
        self.splice_after = splice_after  # 0: splice from the start
        self._handover: DelayedCall | None = None
        self._turns = HANDOVER_TURNS
        self.splicer: splicing.Splicer | None = None
        self.spliced = 0  # octets moved by splice(2) so far (RelayResult.spliced)
        self.done: Deferred[RelayResult] = Deferred()

    @property
    def bytes_up(self) -> int:
        live = self.splicer.channels[0].moved if self.splicer is not None else 0
        return self.client.forwarded + self.upstream.replied + live

    @property
    def bytes_down(self) -> int:
        live = self.splicer.channels[1].moved if self.splicer is not None else 0
        return self.upstream.forwarded + self.client.replied + live

    def start(self) -> Deferred[RelayResult]:
        """Take over both transports; returns `done`."""
        if self._started:
            raise RuntimeError("relay already started")
        self._started = True
        for side in (self.client, self.upstream):
            if not getattr(side.transport, "connected", True):
                # A frontend bug, but never leave `done` hanging: end the session now.
                self._side_lost(side, Failure(ConnectionDone("closed before the relay started")))
                return self.done
        for side in (self.client, self.upstream):
            feeders = [side.peer] + ([side] if side.hook is not None else [])
            side._watch = _WriteBufferWatch(side, feeders)
            side.transport.registerProducer(side._watch, True)
        # The frontend may have paused reading while it waited for the Authenticator.
        for side in (self.client, self.upstream):
            if not self._ended_before[side.name] and not side.reading_paused:
                side.transport.resumeProducing()
        pending_up, self._client_pending = self._client_pending, b""
        pending_down, self._upstream_pending = self._upstream_pending, b""
        if pending_down:
            self.upstream.dataReceived(pending_down)
        if pending_up:
            self.client.dataReceived(pending_up)
        for side in (self.upstream, self.client):
            if self._ended_before[side.name]:
                side.readConnectionLost()
        if (
            self._may_splice
            and not any(self._ended_before.values())
            and splicing.available()
            and all(splicing.plain_tcp(side.transport) for side in (self.client, self.upstream))
        ):
            if self.splice_after <= 0:
                self._begin_handover()
            else:
                for side in (self.client, self.upstream):
                    side.dataReceived = side._forward_until_bulk  # type: ignore[method-assign]
        return self.done

    def abort(self, reason: str) -> None:
        """Drop both connections now (session revoked, idle timeout, internal error)."""
        self._note_end("proxy", reason, clean=False)
        self._unsplice(drop=True)
        for side in (self.client, self.upstream):
            if side.alive:
                side._closing = side.write_closed = True
                side._release_watch()
                side.transport.abortConnection()

    def close_with(self, reason: str, farewell: bytes) -> None:
        """End the session politely: stop relaying, write `farewell` to the client (IMAP's
        `* BYE`, SMTP's `421`), then close both sides after what was written."""
        self._note_end("proxy", reason, clean=True)
        self._unsplice()
        for side in (self.client, self.upstream):
            side.pause_reading("closing")
        if farewell and self.client.alive and not self.client.write_closed:
            self.client.transport.write(farewell)
        for side in (self.client, self.upstream):
            side._close()

    # -- splice ----------------------------------------------------------------------------

    def _reactor(self) -> Any:
        return cast(Any, self.client.transport).reactor  # a tcp.Connection's (plain_tcp)

    def _begin_handover(self) -> None:
        """Stop reading both sides to splice once Twisted has written what it holds for them;
        not once a side has ended (the copy path finishes that session)."""
        self._disarm()
        for side in (self.client, self.upstream):
            if side.eof or side.write_closed or side._closing or not side.alive:
                return
        for side in (self.client, self.upstream):
            side._pause(_HANDOVER)
        self._handover = self._reactor().callLater(0, self._hand_over)

    def _disarm(self) -> None:
        for side in (self.client, self.upstream):
            if side.dataReceived == side._forward_until_bulk:
                side.dataReceived = side._forward  # type: ignore[method-assign]

    def _hand_over(self) -> None:
        """Start splicing once Twisted holds nothing more to write for either side."""
        self._handover = None
        reactor = self._reactor()
        writers = reactor.getWriters()
        sides = (self.client, self.upstream)
        if any(s.transport in writers or s._paused_by != {_HANDOVER} for s in sides):
            self._turns -= 1
            if self._turns > 0:
                self._handover = reactor.callLater(0, self._hand_over)
            else:
                for side in sides:
                    side._resume(_HANDOVER)  # a client that does not read: copy
            return
        fds = cast(tuple[int, int], tuple(cast(Any, s.transport).fileno() for s in sides))
        self.splicer = splicing.Splicer(reactor, fds, self._splice_ended)
        for side in sides:
            side._paused_by.clear()  # the transports stay paused: the splicer reads now
        self.splicer.start()

    def _splice_ended(self, index: int, problem: OSError | None) -> None:
        side = (self.client, self.upstream)[index]
        if problem is None:
            self._unsplice()  # the transport, reading again, meets the end of stream itself
        elif isinstance(problem, splicing.Unavailable):
            if problem.refused:
                splicing.refused(problem)
            self._unsplice()
        else:
            self._unsplice(dead=side)
            cast(Any, side.transport).connectionLost(
                Failure(ConnectionLost(problem.strerror or str(problem)))
            )

    def _unsplice(self, dead: RelaySide | None = None, drop: bool = False) -> None:
        """Back to the copy path: what the pipes held goes out through the transports (to a
        live peer, unless dropped), and the transports read again; never to splice again."""
        self._disarm()
        if self._handover is not None:
            self._handover.cancel()
            self._handover = None
            for side in (self.client, self.upstream):
                side._resume(_HANDOVER)
        splicer, self.splicer = self.splicer, None
        if splicer is None:
            return
        held = splicer.stop()
        for side, channel, data in zip(
            (self.client, self.upstream), splicer.channels, held, strict=True
        ):
            side.forwarded += channel.moved
            self.spliced += channel.moved
            if data and not drop and side.peer is not dead:
                side._forward(data)
        if drop:
            return
        for side in (self.client, self.upstream):
            if side is not dead and side.alive and not side.eof and not side.reading_paused:
                side.transport.resumeProducing()

    # -- internals -------------------------------------------------------------------------

    def _note_end(self, who: str, reason: str, clean: bool) -> None:
        if self._first_end is None:
            self._first_end = (who, reason, clean)

    def _side_eof(self, side: RelaySide) -> None:
        self._unsplice()
        if side.eof:
            return
        side.eof = True
        side._paused_by.clear()
        self._note_end(side.name, "end of stream", clean=True)
        peer = side.peer
        if peer.eof:
            # Both directions are finished: close both (each flushes first).
            side._close()
            peer._close()
        else:
            peer._close_write()

    def _side_lost(self, side: RelaySide, reason: Failure) -> None:
        self._unsplice(dead=side)
        if not side.alive:
            return
        clean = reason.check(ConnectionDone) is not None
        self._note_end(side.name, "end of stream" if clean else reason.getErrorMessage(), clean)
        side.alive = False
        side.eof = True
        side.write_closed = True
        side._paused_by.clear()
        watch, side._watch = side._watch, None
        if watch is not None:
            watch.resumeProducing()  # Twisted already dropped it; un-pause what it held back
        peer = side.peer
        if peer.alive:
            peer._close()
        else:
            self._finish()

    def _finish(self) -> None:
        if self.done.called:
            return
        who, reason, clean = self._first_end or ("proxy", "unknown", False)
        result = RelayResult(self.bytes_up, self.bytes_down, who, reason, clean, self.spliced)
        self.done.callback(result)
