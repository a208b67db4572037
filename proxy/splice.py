"""Relay two plaintext TCP sockets with splice(2): octets go socket -> pipe -> socket inside the
kernel and never pass through Python (Linux; Python's os.splice, 3.10 and later).

relay.py decides when this applies (both sides plain TCP, no hook) and hands the two sockets'
descriptors over once Twisted has written what it held for them; from then on this module owns
both descriptors in the reactor (the transports neither read nor write) until the relay takes
them back (`Splicer.stop`) on any event it handles itself: end of stream, an error, close_with,
abort. What is still in the pipes then comes back as bytes, and the copy path goes on.

One direction is a `Channel`: one pipe, `held` octets in it. Flow control is the pipe: a side is
read (spliced into its channel's pipe) only while that pipe has room, and the pipe drains only
as fast as the other socket takes octets, so a stalled reader stops the reading of its peer
with at most `PIPE_CHUNK` octets held per direction, in the kernel (the copy path holds up to
twice that in Python). The pipe exists only while octets move, so an idle session holds no pipe
(two more descriptors and the kernel's per-user pipe quota, pipe(7), are spent only on busy
sessions): a lone Channel closes its pipe as soon as its source had no more to give and the
pipe is empty; a Splicer's channels keep an empty pipe until a timer finds it unused for
`IDLE_PIPE`, since a server that writes a few KiB at a time empties it between most events, and
making it again each time cost a pipe2 and two closes per event.

Events: the reactor's per-event cost (epoll_wait, its dispatch, a Python call chain) was most of
the user-space CPU when each event moved one pipe chunk (the kernel's TCP work, the rest, is
the same for any relay). So one readable event fills and flushes in a loop while both sockets
make progress, up to `BURST` chunks, and stops early when the source has no more, the
destination takes no more, or the pipe is full; only then are the registrations settled
(reading the source while its pipe has room, writing the destination while the pipe holds
octets). A direction stopped by a full pipe is read again only once its pipe is empty, so a
slow reader does not toggle its peer's registration on every partial write.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFDSet,
    IReactorTime,
    IReadWriteDescriptor,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

# Most octets one direction holds in its pipe, and the most one splice moves: the Linux default
# pipe capacity (16 pages, pipe(7)), which is also what one Twisted read takes
# (tcp.Connection.bufferSize). A pipe the kernel made smaller (a user over
# /proc/sys/fs/pipe-user-pages-soft gets 2 pages) holds less; splice then moves less at a time.
PIPE_CHUNK = 64 * 1024

# Most pipe chunks one event moves before the reactor serves other descriptors (1 MiB): a busy
# session pays one reactor turn per MiB rather than per chunk, and still cannot starve the
# others; nginx bounds one sendfile call the same way (sendfile_max_chunk, 2m by default).
BURST = 16

# How long a Splicer keeps an empty pipe after its channel last moved octets (checked on a timer,
# so closed one to two of these later): long against the gaps inside one reply, where closing
# and making the pipe again cost a pipe2 and two closes per reactor event (a server that writes
# 8 KiB at a time, as Dovecot does, empties it between events); short against an idle session.
IDLE_PIPE = 1.0

_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# splice's answers that mean "not on these descriptors" (an old kernel, a sandbox without it:
# gVisor, some seccomp profiles), not a connection error; and running out of descriptors for
# a pipe. Either way the session goes on through the copy path.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP})
_NO_PIPE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})

log = Logger()


class Unavailable(Exception):
    """splice cannot be used here; the relay copies instead. `refused`: the kernel refuses
    splice itself (_UNSUPPORTED), not just a pipe now (_NO_PIPE)."""

    def __init__(self, why: str, refused: bool) -> None:
        super().__init__(why)
        self.refused = refused


_supported = hasattr(os, "splice") and hasattr(os, "pipe2")


def available() -> bool:
    """Whether this process may splice: Linux with os.splice, and no earlier answer that the
    kernel refuses it (after one, the process stops trying)."""
    return _supported


def refused(why: Unavailable) -> None:
    """The kernel refused splice on sockets: copy from now on, for every session."""
    global _supported
    if _supported:
        log.warn("splice(2) refused ({why}): relaying by copy from now on", why=why)
    _supported = False


def plain_tcp(transport: object) -> bool:
    """Whether a relay's transport is a bare TCP socket: no TLS (listenSSL's TLSMemoryBIOProtocol,
    or startTLS, which makes the tcp.Connection an ISSLTransport) and no wrapper (a PROXY-protocol
    ProtocolWrapper): the only case where the octets on the socket are the session's."""
    return (
        isinstance(transport, tcp.Connection)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
        and bool(transport.connected)
        and not transport.disconnecting
    )


class Channel:
    """One direction: octets from socket `src` through a pipe into socket `dst`."""

    def __init__(self, src: int, dst: int, linger: bool = False) -> None:
        self.src, self.dst = src, dst
        self.linger = linger  # keep an empty pipe: its owner closes it once idle (Splicer)
        self.pipe: tuple[int, int] | None = None  # (read end, write end) while octets move
        self.held = 0  # octets in the pipe
        self.moved = 0  # octets written to dst
        self.drained = False  # the last fill took all src had (a short splice)

    def fill(self) -> int | None:
        """Splice what `src` has into the pipe: the count, 0 at end of stream, None when the
        pipe has no room or `src` had nothing after all. OSError: src's connection failed."""
        room = PIPE_CHUNK - self.held
        if room <= 0:
            return None
        if self.pipe is None:
            try:
                self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno in _NO_PIPE:
                    raise Unavailable(exc.strerror or "", refused=False) from None
                raise
        try:
            n = os.splice(self.src, self.pipe[1], room, flags=_FLAGS)
        except BlockingIOError:
            if not self.held:  # src had nothing after all
                self.drained = True
                if not self.linger:
                    self.close()
            return None  # or the pipe is full (the kernel gave it fewer slots than room)
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise Unavailable(exc.strerror or "", refused=True) from None
            raise
        self.held += n
        self.drained = n < room
        return n

    def flush(self) -> int:
        """Splice what the pipe holds into `dst`: the count (0 when dst takes nothing now).
        OSError: dst's connection failed (EPIPE, ECONNRESET)."""
        if not self.held or self.pipe is None:
            return 0
        try:
            n = os.splice(self.pipe[0], self.dst, self.held, flags=_FLAGS)
        except BlockingIOError:
            return 0
        self.held -= n
        self.moved += n
        if not self.held and self.drained and not self.linger:
            self.close()  # idle: no pipe held until the next octets
        return n

    def take(self) -> bytes:
        """What the pipe still holds (at most PIPE_CHUNK octets), and close it."""
        data = b""
        if self.pipe is not None:
            while self.held > len(data):
                try:
                    chunk = os.read(self.pipe[0], self.held - len(data))
                except BlockingIOError:
                    break
                if not chunk:
                    break
                data += chunk
        self.held = 0
        self.close()
        return data

    def close(self) -> None:
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])


# How a splice ends: None at end of stream, the OSError of a failed connection, or Unavailable.
Ended = Callable[[int, "OSError | None"], None]


class _Reactor(IReactorFDSet, IReactorTime):
    """What a Splicer uses of the reactor (a posix reactor provides both)."""


@implementer(IReadWriteDescriptor)
class _End:
    """One socket of the pair in the reactor: readable -> fill its outgoing channel, writable ->
    flush its incoming one. Its fileno never changes (the reactor compares it after each call)."""

    def __init__(self, splicer: Splicer, index: int, fd: int) -> None:
        self.splicer, self.index, self.fd = splicer, index, fd

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "splice"

    def doRead(self) -> None:
        self.splicer._readable(self.index)

    def doWrite(self) -> None:
        self.splicer._writable(self.index)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw a hang-up with nothing to read, or is shutting down: hand back, and
        # the transport, reading again, meets the same end.
        self.splicer._ended(self.index, None)


class Splicer:
    """Splice sockets `fds[0]` and `fds[1]` both ways until `stop`. channels[i] carries what
    fds[i] sends. `ended(i, problem)` reports the first end seen on socket i; the owner then
    calls `stop` (this class never closes a socket)."""

    def __init__(self, reactor: _Reactor, fds: tuple[int, int], ended: Ended) -> None:
        self.reactor = reactor
        self.channels = (Channel(fds[0], fds[1], True), Channel(fds[1], fds[0], True))
        self._ends = (_End(self, 0, fds[0]), _End(self, 1, fds[1]))
        self._on_end = ended
        self.reading = [False, False]
        self.writing = [False, False]
        self.stalls = [0, 0]  # times channel i's pipe filled up and socket i stopped being read
        self.active = False
        self._idle_check: IDelayedCall | None = None
        self._moved_at_check = [-1, -1]

    def start(self) -> None:
        self.active = True
        for i in (0, 1):
            self._read(i, True)

    def stop(self) -> tuple[bytes, bytes]:
        """Give both descriptors back (no longer in the reactor) and return what each channel
        still held: octets fds[0] sent that fds[1] did not get yet, and the other way."""
        if not self.active:
            return b"", b""
        self.active = False
        if self._idle_check is not None:
            self._idle_check.cancel()
            self._idle_check = None
        for i in (0, 1):
            self._read(i, False)
            self._write(i, False)
        return self.channels[0].take(), self.channels[1].take()

    # -- the reactor's events ----------------------------------------------------------------

    def _readable(self, i: int) -> None:
        if self.active:
            self._pump(i)

    def _writable(self, j: int) -> None:
        if not self.active:
            return
        channel = self.channels[1 - j]
        try:
            channel.flush()
        except OSError as exc:
            self._ended(j, exc)
            return
        if not channel.held:  # drained: read its source again (a stalled one resumes only now)
            self._pump(1 - j)

    def _pump(self, i: int) -> None:
        """Move what socket i has to its peer, fill -> flush while both make progress, at most
        `BURST` pipe chunks; then read i only while the pipe has room, and wait for the peer to
        be writable while the pipe holds octets."""
        channel = self.channels[i]
        full = False
        for _ in range(BURST):
            try:
                n = channel.fill()
            except OSError as exc:  # Unavailable included
                self._ended(i, exc)
                return
            if n == 0:
                self._ended(i, None)
                return
            if n is None:  # i had no more, or the pipe has no room (the kernel's fewer slots)
                full = channel.held > 0
                break
            try:
                channel.flush()
            except OSError as exc:
                self._ended(1 - i, exc)
                return
            if channel.held:  # the peer takes no more now
                full = channel.held >= PIPE_CHUNK
                break
        if full and self.reading[i]:
            self.stalls[i] += 1
        self._read(i, not full)
        self._write(1 - i, channel.held > 0)
        if self._idle_check is None and channel.pipe is not None:
            self._idle_check = self.reactor.callLater(IDLE_PIPE, self._close_idle_pipes)

    def _close_idle_pipes(self) -> None:
        """Close the pipe of a channel that moved nothing since the last check and holds
        nothing; look again later while a pipe is open."""
        self._idle_check = None
        if not self.active:
            return
        for k, channel in enumerate(self.channels):
            idle = channel.moved == self._moved_at_check[k]
            if idle and channel.pipe is not None and not channel.held:
                channel.close()
            self._moved_at_check[k] = channel.moved
        if any(channel.pipe is not None for channel in self.channels):
            self._idle_check = self.reactor.callLater(IDLE_PIPE, self._close_idle_pipes)

    def _ended(self, i: int, problem: OSError | None) -> None:
        if self.active:
            self._on_end(i, problem)

    # -- registration ------------------------------------------------------------------------

    def _read(self, i: int, on: bool) -> None:
        if self.reading[i] != on:
            self.reading[i] = on
            (self.reactor.addReader if on else self.reactor.removeReader)(self._ends[i])

    def _write(self, i: int, on: bool) -> None:
        if self.writing[i] != on:
            self.writing[i] = on
            (self.reactor.addWriter if on else self.reactor.removeWriter)(self._ends[i])
