"""splice.Channel on real descriptors: Unix socket pairs and a kernel pipe (no IP sockets, no
reactor). The relay's use of it over TCP is tests/integration/test_relay_splice.py."""

from __future__ import annotations

import os
import socket

import pytest

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
