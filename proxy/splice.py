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
twice that in Python). The pipe exists only while octets move: a channel whose source had no
more to give and whose pipe is empty closes it, so an idle session holds no pipe (two more
descriptors and the kernel's per-user pipe quota, pipe(7), are spent only on busy sessions).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadWriteDescriptor, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

# Most octets one direction holds in its pipe, and the most one splice moves: the Linux default
# pipe capacity (16 pages, pipe(7)), which is also what one Twisted read takes
# (tcp.Connection.bufferSize). A pipe the kernel made smaller (a user over
# /proc/sys/fs/pipe-user-pages-soft gets 2 pages) holds less; splice then moves less at a time.
PIPE_CHUNK = 64 * 1024

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

    def __init__(self, src: int, dst: int) -> None:
        self.src, self.dst = src, dst
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
        if not self.held and self.drained:
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

    def __init__(self, reactor: IReactorFDSet, fds: tuple[int, int], ended: Ended) -> None:
        self.reactor = reactor
        self.channels = (Channel(fds[0], fds[1]), Channel(fds[1], fds[0]))
        self._ends = (_End(self, 0, fds[0]), _End(self, 1, fds[1]))
        self._on_end = ended
        self.reading = [False, False]
        self.writing = [False, False]
        self.stalls = [0, 0]  # times channel i's pipe filled up and socket i stopped being read
        self.active = False

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
        for i in (0, 1):
            self._read(i, False)
            self._write(i, False)
        return self.channels[0].take(), self.channels[1].take()

    # -- the reactor's events ----------------------------------------------------------------

    def _readable(self, i: int) -> None:
        if not self.active:
            return
        channel = self.channels[i]
        try:
            n = channel.fill()
        except OSError as exc:  # Unavailable included
            self._ended(i, exc)
            return
        if n is None:
            if channel.held:  # the pipe is full: wait for the other end to take some
                self.stalls[i] += 1
                self._read(i, False)
            return
        if n == 0:
            self._ended(i, None)
            return
        self._writable(1 - i)  # at once: the other socket usually takes it without a wait

    def _writable(self, j: int) -> None:
        if not self.active:
            return
        channel = self.channels[1 - j]
        try:
            n = channel.flush()
        except OSError as exc:
            self._ended(j, exc)
            return
        self._write(j, channel.held > 0)
        if n and not self.reading[1 - j]:
            self._read(1 - j, True)  # the pipe has room again

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
