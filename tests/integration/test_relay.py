"""The relay over real loopback TCP (and TLS on the client side): bytes intact both ways,
bounded buffering under a slow reader, half-close, errors, counts, leftovers and the client hook.

Layout of every test: client peer --TCP/TLS--> [front | relay | up] --TCP--> upstream peer.
`front` and `up` stand in for a frontend and an upstream protocol: they buffer until the relay
is started, then forward their transport's events to it, as proxy/relay.py's docstring shows.
"""

from __future__ import annotations

import random

import pytest
import pytest_twisted
from twisted.internet import reactor

from proxy.relay import (
    BUFFER_BOUND_TCP,
    BUFFER_BOUND_TLS,
    RelayResult,
    supports_half_close,
)
from proxy.tls import ServerTLS, upstream_tls
from tests.support.relayharness import (
    Env,
    Flow,
    ObservedProducer,
    Peer,
    SlowReader,
    Source,
    wait,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(test_ca):
    return {
        "server": ServerTLS(str(test_ca.cert), str(test_ca.key)),
        "client": upstream_tls("localhost", ca_file=str(test_ca.ca)),
    }


def tls_args(pki, tls: bool) -> dict:
    return {"server_tls": pki["server"], "client_tls": pki["client"]} if tls else {}


# --- bytes both ways ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tls", "splice"), [(False, False), (False, True), (True, True)], ids=["copy", "tcp", "tls"]
)
@pytest_twisted.ensureDeferred
async def test_large_random_payloads_arrive_intact_both_ways_and_are_counted(pki, tls, splice):
    rng = random.Random(1)
    up_data, down_data = rng.randbytes(6 * 2**20 + 17), rng.randbytes(5 * 2**20 + 3)
    greeting = b"* OK upstream ready\r\n"
    # The client starts when the greeting reaches it (so its bytes flow through the relay);
    # the upstream starts on the client's first bytes. Under TLS the client cannot half-close:
    # it sends, then waits for the upstream's end.
    client = Peer(payload=up_data, send_on_first_data=True, half_close=not tls)
    upstream = Peer(
        greeting=greeting,
        payload=down_data,
        send_on_first_data=True,
        half_close=True,
        close_on_eof=True,
    )
    env = await Env.create(client, upstream, **tls_args(pki, tls))
    try:
        await wait(env.up.buffered_at_least(len(greeting)))
        done = env.start(splice=splice)
        assert bytes(await wait(client.eof)) == greeting + down_data
        if tls:
            client.transport.loseConnection()
        result = await done
        assert (
            await wait(upstream.eof) == up_data
        )  # the relay is done; the peer may read a bit later
        assert result.bytes_up == len(up_data)
        assert result.bytes_down == len(greeting) + len(down_data)
        assert result.clean
        assert (result.spliced > 0) == (splice and not tls)  # plaintext both sides only
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_leftovers_from_the_handover_go_first_and_are_counted():
    greeting = b"* OK upstream ready\r\n"
    client = Peer(greeting=b"A1 early\r\n", payload=b"A2 later\r\n", send_on_first_data=True)
    upstream = Peer(greeting=greeting, half_close=False)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.buffered_at_least(len(b"A1 early\r\n")))
        await wait(env.up.buffered_at_least(len(greeting)))
        done = env.start()
        assert await wait(upstream.eof) == b"A1 early\r\nA2 later\r\n"
        await wait(upstream.lost)
        result = await done
        assert bytes(client.received) == greeting
        assert (result.bytes_up, result.bytes_down) == (20, len(greeting))
    finally:
        await env.stop()


# --- flow control -------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls-client"])
@pytest_twisted.ensureDeferred
async def test_slow_reader_keeps_relay_buffers_bounded_while_upstream_sends_50_mb(pki, tls):
    total = 50 * 10**6
    flow = Flow()
    flow.client, flow.source = SlowReader(flow), Source(total, flow)
    env = await Env.create(flow.client, flow.source, **tls_args(pki, tls))
    try:
        await wait(env.front.buffered_at_least(len(b"GO\r\n")))
        front_transport = env.front.transport
        register = front_transport.registerProducer
        front_transport.registerProducer = lambda p, s: register(ObservedProducer(p, flow), s)
        flow.transport = front_transport
        env.up.after_forward = flow.sample  # right after each upstream chunk was written
        done = env.start(splice=False)  # the copy path's bound; test_relay_splice.py: splice's
        flow.relay_side = env.relay.upstream
        result: RelayResult = await done
        await wait(flow.client.lost)

        assert flow.client.count == total
        assert flow.client.digest.digest() == flow.source.digest.digest()
        assert result.bytes_down == total and result.closed_by == "upstream" and result.clean
        # The relay never held more than Twisted's buffers allow...
        bound = BUFFER_BOUND_TLS if tls else BUFFER_BOUND_TCP
        print(
            f"\n[{'tls' if tls else 'tcp'}] max relay write buffer {flow.max_buffered} octets "
            f"(bound {bound}); {flow.samples} samples, {flow.stalls} stalls, "
            f"{env.relay.client.pauses} relay pauses"
        )
        assert 0 < flow.max_buffered <= bound
        # ...because back-pressure really happened, repeatedly, all the way to the source.
        assert flow.client.pauses >= 5
        assert env.relay.client.pauses >= 5
        assert flow.stalls >= 5
    finally:
        await env.stop()


# --- half-close ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_half_close_reaches_the_upstream_which_can_still_answer():
    client = Peer(payload=b"QUIT\r\n", half_close=True, close_on_eof=True)
    upstream = Peer(on_eof_send=b"221 2.0.0 bye\r\n", close_on_eof=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        assert supports_half_close(env.front.transport)
        done = env.start()
        assert await wait(upstream.eof) == b"QUIT\r\n"
        assert upstream.got_eof  # a read EOF, not a lost connection: it may still write
        assert await wait(client.eof) == b"221 2.0.0 bye\r\n"
        assert client.got_eof
        result = await done
        assert result.closed_by == "client" and result.clean
        assert (result.bytes_up, result.bytes_down) == (6, 15)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_client_eof_before_the_handover_is_passed_on_after_the_leftovers():
    client = Peer(payload=b"A1 NOOP\r\nA2 LOGOUT\r\n", half_close=True, close_on_eof=True)
    upstream = Peer(half_close=False, on_eof_send=b"* BYE\r\n", close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.ended_early)
        done = env.start()
        assert await wait(upstream.eof) == b"A1 NOOP\r\nA2 LOGOUT\r\n" and upstream.got_eof
        assert await wait(client.eof) == b"* BYE\r\n"
        result = await done
        assert (result.closed_by, result.bytes_up, result.bytes_down) == ("client", 20, 7)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_half_close_reaches_the_client():
    client = Peer(payload=b"a LOGOUT\r\n", half_close=False, on_eof_send=b"late\r\n")
    upstream = Peer(payload=b"* BYE\r\n", send_on_first_data=True, half_close=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        assert await wait(client.eof) == b"* BYE\r\n" and client.got_eof
        assert await wait(upstream.eof) == b"a LOGOUT\r\nlate\r\n"
        result = await done
        assert result.closed_by == "upstream" and result.clean
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_eof_closes_a_tls_client_after_delivering_everything(pki):
    data = random.Random(3).randbytes(3 * 2**20)
    client = Peer(payload=b"GO", half_close=False, close_on_eof=False)
    upstream = Peer(payload=data, send_on_first_data=True, half_close=True, close_on_eof=False)
    env = await Env.create(client, upstream, **tls_args(pki, True))
    try:
        assert not supports_half_close(env.front.transport)  # TLS: no TCP half-close under it
        done = env.start()
        await wait(client.lost)
        assert bytes(client.received) == data
        result = await done
        assert result.closed_by == "upstream" and result.bytes_down == len(data)
    finally:
        await env.stop()


# --- errors and aborts --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_error_closes_the_client():
    client = Peer(payload=b"A1 FETCH 1:* BODY[]\r\n", half_close=False, close_on_eof=False)
    upstream = Peer(abort_on_first_data=True, half_close=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await wait(client.eof)  # the client sees its connection end
        result = await done
        assert result.closed_by == "upstream" and not result.clean
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_client_error_closes_the_upstream():
    client = Peer(abort_on_first_data=True, half_close=False)
    upstream = Peer(greeting=b"* OK\r\n", half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        await wait(upstream.lost)
        result = await done
        assert result.closed_by == "client" and not result.clean
        assert result.bytes_down == len(b"* OK\r\n")
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_abort_drops_both_sides_with_the_reason():
    client = Peer(half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start()
        env.relay.abort("code revoked")
        await wait(client.lost)
        await wait(upstream.lost)
        result = await done
        assert (result.closed_by, result.reason, result.clean) == ("proxy", "code revoked", False)
    finally:
        await env.stop()


# --- the client hook ----------------------------------------------------------------------------


class RefuseXclient:
    """What the SMTP relay does after login: drop XCLIENT commands, answer them itself."""

    def __init__(self):
        self.partial = b""

    def __call__(self, data: bytes) -> tuple[bytes, bytes]:
        self.partial += data
        forward, reply = b"", b""
        while b"\n" in self.partial:
            line, self.partial = self.partial.split(b"\n", 1)
            if line.upper().startswith(b"XCLIENT"):
                reply += b"550 5.7.0 XCLIENT not allowed\r\n"
            else:
                forward += line + b"\n"
        return forward, reply


@pytest_twisted.ensureDeferred
async def test_hook_drops_what_it_refuses_and_replies_to_the_client():
    sent = b"MAIL FROM:<a@example.org>\r\nXCLIENT ADDR=10.0.0.1\r\nRCPT TO:<b@exa"
    client = Peer(payload=sent, half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        await wait(env.front.buffered_at_least(10))  # part of it arrives as a leftover
        done = env.start(hook=RefuseXclient())
        client.transport.write(b"mple.org>\r\nxclient NAME=spoof\r\nQUIT\r\n")
        client.transport.loseWriteConnection()
        assert (
            await wait(upstream.eof)
            == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n"
        )
        await wait(client.eof)
        assert bytes(client.received) == b"550 5.7.0 XCLIENT not allowed\r\n" * 2
        result = await done
        assert result.bytes_up == len(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nQUIT\r\n"
        )
        assert result.bytes_down == 2 * len(b"550 5.7.0 XCLIENT not allowed\r\n")
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_hook_that_raises_aborts_the_session():
    def broken(data):
        raise ValueError("bug")

    client = Peer(payload=b"NOOP\r\n", half_close=False, close_on_eof=False)
    upstream = Peer(half_close=False, close_on_eof=False)
    env = await Env.create(client, upstream)
    try:
        done = env.start(hook=broken)
        await wait(client.lost)
        await wait(upstream.lost)
        result = await done
        assert (result.closed_by, result.reason) == ("proxy", "client hook failed")
        assert result.bytes_up == 0
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_upstream_hook_can_answer_the_upstream_and_filter_what_the_client_gets():
    partial = b""

    def answer_pings(data: bytes) -> tuple[bytes, bytes]:
        nonlocal partial
        partial += data
        to_client, to_upstream = b"", b""
        while b"\n" in partial:
            line, partial = partial.split(b"\n", 1)
            if line == b"PING\r":
                to_upstream += b"PONG\r\n"
            else:
                to_client += line + b"\n"
        return to_client, to_upstream

    client = Peer(payload=b"go\r\n", half_close=False, close_on_eof=True)
    upstream = Peer(
        payload=b"* OK hi\r\nPING\r\n", send_on_first_data=True, half_close=True, close_on_eof=False
    )
    env = await Env.create(client, upstream)
    try:
        done = env.start(upstream_hook=answer_pings)
        assert await wait(client.eof) == b"* OK hi\r\n"
        assert await wait(upstream.eof) == b"go\r\nPONG\r\n"
        result = await done
        assert (result.bytes_up, result.bytes_down) == (4 + 6, 9)
    finally:
        await env.stop()


@pytest_twisted.ensureDeferred
async def test_pause_reading_holds_a_side_until_resumed_even_under_back_pressure():
    client = Peer(half_close=False, close_on_eof=True)
    upstream = Peer(half_close=False, close_on_eof=True)
    env = await Env.create(client, upstream)
    try:
        done = env.start(splice=False)  # with splice, pause_reading first goes back to copying
        side = env.relay.client
        assert env.front.transport in reactor.getReaders()
        side.pause_reading("waiting for 354")
        assert side.reading_paused and env.front.transport not in reactor.getReaders()
        side.pause_reading("write buffer")  # keys nest
        side.resume_reading("waiting for 354")
        assert side.reading_paused and env.front.transport not in reactor.getReaders()
        side.resume_reading("write buffer")
        assert not side.reading_paused and env.front.transport in reactor.getReaders()
        client.transport.loseWriteConnection()
        await wait(upstream.eof)
        await done
    finally:
        await env.stop()
