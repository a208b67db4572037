"""splice.Channel on real descriptors: Unix socket pairs and a kernel pipe (no IP sockets), and
the Splicer's event loop on a real epoll reactor that is stepped, never run. The relay's use of
it over TCP is tests/integration/test_relay_splice.py."""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.epollreactor import EPollReactor

from proxy import splice


@pytest.fixture
def pairs():
    """(src_peer, src) and (dst, dst_peer): the channel reads src and writes dst."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    for s in (a, b, c, d):
        s.setblocking(False)
    yield (a, b), (c, d)
    for s in (a, b, c, d):
        s.close()


def test_octets_move_through_the_pipe_and_the_pipe_closes_when_idle(pairs):
    (sender, src), (dst, receiver) = pairs
    channel = splice.Channel(src.fileno(), dst.fileno())
    sender.sendall(b"a1 NOOP\r\n")
    assert channel.fill() == 9 and channel.held == 9
    assert channel.flush() == 9 and (channel.held, channel.moved) == (0, 9)
    assert receiver.recv(100) == b"a1 NOOP\r\n"
    assert channel.pipe is None  # src had no more: no pipe held while idle
    assert channel.fill() is None  # nothing to read


def test_a_stalled_reader_holds_at_most_one_pipe_chunk(pairs):
    (sender, src), (dst, receiver) = pairs
    channel = splice.Channel(src.fileno(), dst.fileno())
    data = os.urandom(8 * 2**20)
    sent = moved_in = 0
    for _ in range(10_000):  # until the pipe has no room: the relay then stops reading src
        try:
            sent += sender.send(data[sent:])
        except BlockingIOError:
            pass
        n = channel.fill()
        if n is None and channel.held:
            break
        moved_in += n or 0
        channel.flush()  # dst's buffers fill up: nobody reads `receiver`
    assert channel.fill() is None
    assert 0 < channel.held <= splice.PIPE_CHUNK
    # What the pipe held comes back as bytes (the relay writes it through the transport).
    received = b""
    while True:
        try:
            received += receiver.recv(2**20)
        except BlockingIOError:
            break
    held = channel.held
    rest = channel.take()
    assert len(rest) == held and channel.pipe is None and channel.held == 0
    assert received + rest == data[: len(received) + len(rest)]
    assert channel.moved == len(received)


def test_end_of_stream_is_zero_and_a_dead_destination_raises(pairs):
    (sender, src), (dst, receiver) = pairs
    channel = splice.Channel(src.fileno(), dst.fileno())
    sender.sendall(b"x")
    sender.shutdown(socket.SHUT_WR)
    assert channel.fill() == 1
    assert channel.fill() == 0
    receiver.close()
    with pytest.raises(OSError):
        channel.flush()  # EPIPE: the relay takes it as the destination's connection lost
    channel.close()


def test_only_bare_tcp_transports_are_spliced():
    assert not splice.plain_tcp(object())
    assert not splice.plain_tcp(None)


# --- the Splicer on a real (uninstalled, never run) epoll reactor: one doIteration is one event ---


@pytest.fixture
def epoll():
    reactor = EPollReactor()
    yield reactor
    reactor.removeAll()
    reactor.waker.connectionLost(None)
    reactor._poller.close()


def big_buffers(*socks: socket.socket) -> None:
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)


def received(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(2**20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def no_end(index, problem):
    raise AssertionError(f"socket {index} ended: {problem!r}")


def test_one_readable_event_moves_several_pipe_chunks(pairs, epoll):
    (sender, src), (dst, receiver) = pairs
    big_buffers(sender, src, dst, receiver)
    data = os.urandom(4 * splice.PIPE_CHUNK)
    sender.sendall(data)
    splicer = splice.Splicer(epoll, (src.fileno(), dst.fileno()), no_end)
    splicer.start()
    epoll.doIteration(0)  # one readable event on src
    assert received(receiver) == data  # all of it, not one pipe chunk
    assert splicer.reading == [True, True] and splicer.writing == [False, False]
    splicer.stop()


def test_one_event_moves_at_most_a_burst(pairs, epoll, monkeypatch):
    monkeypatch.setattr(splice, "BURST", 2)
    (sender, src), (dst, receiver) = pairs
    big_buffers(sender, src, dst, receiver)
    data = os.urandom(4 * splice.PIPE_CHUNK)
    sender.sendall(data)
    splicer = splice.Splicer(epoll, (src.fileno(), dst.fileno()), no_end)
    splicer.start()
    epoll.doIteration(0)
    first = received(receiver)
    assert 0 < len(first) <= 2 * splice.PIPE_CHUNK  # the others get their turn
    got = first
    for _ in range(100):  # level-triggered: src is still readable, the next events go on
        if len(got) == len(data):
            break
        epoll.doIteration(0)
        got += received(receiver)
    assert got == data
    splicer.stop()


def test_a_stalled_reader_stops_the_reading_of_its_peer_within_the_loop(pairs, epoll):
    (sender, src), (dst, receiver) = pairs
    big_buffers(sender, src)
    for s in (dst, receiver):  # the destination's buffers fill up soon: nobody reads receiver
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    data = os.urandom(2 * 2**20)
    sent = sender.send(data)
    assert sent > 4 * splice.PIPE_CHUNK
    splicer = splice.Splicer(epoll, (src.fileno(), dst.fileno()), no_end)
    channel = splicer.channels[0]
    splicer.start()
    for _ in range(100):
        epoll.doIteration(0)
        if not splicer.reading[0]:
            break
    # src is no longer read: its octets wait in the pipe (at most one chunk) and in the kernel's
    # socket buffers, none in user space; dst is watched for room.
    assert not splicer.reading[0] and splicer.writing[1] and splicer.stalls[0] == 1
    assert 0 < channel.held <= splice.PIPE_CHUNK
    held = channel.held
    for _ in range(10):  # nothing moves while the reader stalls
        epoll.doIteration(0)
    assert (channel.held, splicer.reading[0], splicer.stalls[0]) == (held, False, 1)
    # The reader reads again: everything arrives, in order.
    got = b""
    for _ in range(10_000):
        got += received(receiver)
        if len(got) == sent:
            break
        epoll.doIteration(0)
    assert got == data[:sent]
    assert splicer.reading == [True, True] and not any(splicer.writing)
    splicer.stop()


def test_a_spliced_pipe_is_kept_between_events_and_closed_once_idle(pairs, epoll, monkeypatch):
    monkeypatch.setattr(splice, "IDLE_PIPE", 0)  # each runUntilCurrent is one idle check
    (sender, src), (dst, receiver) = pairs
    splicer = splice.Splicer(epoll, (src.fileno(), dst.fileno()), no_end)
    channel = splicer.channels[0]
    splicer.start()
    sender.sendall(b"a1 NOOP\r\n")
    epoll.doIteration(0)
    assert received(receiver) == b"a1 NOOP\r\n"
    pipe = channel.pipe
    assert pipe is not None  # src had no more, but the next octets reuse the pipe
    epoll.runUntilCurrent()  # a check: octets moved since the last one
    sender.sendall(b"a2 NOOP\r\n")
    epoll.doIteration(0)
    assert received(receiver) == b"a2 NOOP\r\n" and channel.pipe == pipe
    epoll.runUntilCurrent()  # moved again since: kept
    assert channel.pipe == pipe
    epoll.runUntilCurrent()  # nothing moved since the last check: closed, and no more checks
    assert channel.pipe is None and splicer.channels[1].pipe is None
    assert not epoll.getDelayedCalls()
    sender.sendall(b"a3 NOOP\r\n")  # a busy session again: a new pipe, a new check
    epoll.doIteration(0)
    assert received(receiver) == b"a3 NOOP\r\n" and channel.pipe is not None
    assert len(epoll.getDelayedCalls()) == 1
    assert splicer.stop() == (b"", b"")
    assert channel.pipe is None and not epoll.getDelayedCalls()
