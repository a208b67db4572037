"""proxy/upstream.py against a real Dovecot: the connection to an address is the TCP transport's
own protocol (no endpoint wrapper in the way of every upstream read), over plain TCP and
implicit TLS, writes go out at once, a connection logs nothing (no "Starting factory" event
per login), and the next TLS connection resumes the session where the server allows it
(Postfix)."""

from __future__ import annotations

import dataclasses

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.tcp import Client
from twisted.logger import globalLogPublisher

from proxy.config import Upstream
from proxy.protocols import MailProtocol, TlsMode
from proxy.upstream import UpstreamError, connect, forget_tls
from tests.servers.common import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def log_events():
    """Twisted log events emitted while the test runs."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def factory_events(events: list[dict]) -> list[str]:
    return [e["log_format"] for e in events if "factory" in e.get("log_format", "")]


def imap(dovecot, **kw) -> Upstream:
    return Upstream(MailProtocol.IMAP, "127.0.0.1", dovecot.imap_port, tls=TlsMode.NONE, **kw)


@pytest_twisted.ensureDeferred
async def test_a_plain_connection_is_the_transports_own_protocol(dovecot, log_events):
    conn = await connect(imap(dovecot), reactor)
    try:
        assert isinstance(conn.transport, Client)
        assert conn.transport.protocol is conn  # no wrapper between them
        assert (await conn.read_line()).startswith(b"* OK")
        conn.send(b"a NOOP\r\n")
        assert not conn.transport.dataBuffer and not conn.transport._tempDataBuffer  # sent
        while not (line := await conn.read_line()).startswith(b"a "):
            pass
        assert line.startswith(b"a OK")
    finally:
        conn.close()
    assert factory_events(log_events) == []


@pytest_twisted.ensureDeferred
async def test_an_implicit_tls_connection_reads_through_tls(dovecot, test_ca, log_events):
    settings = dataclasses.replace(
        imap(dovecot), port=dovecot.imaps_port, tls=TlsMode.IMPLICIT, ca_file=test_ca.ca
    )
    conn = await connect(settings, reactor)
    try:
        assert (await conn.read_line()).startswith(b"* OK")
        assert conn.tls
    finally:
        conn.close()
    assert factory_events(log_events) == []


@pytest_twisted.ensureDeferred
async def test_the_next_starttls_connection_to_postfix_resumes_the_session(postfix, test_ca):
    settings = Upstream(
        MailProtocol.SMTP,
        "127.0.0.1",
        postfix.smtp_port,
        tls=TlsMode.STARTTLS,
        ca_file=test_ca.ca,
    )
    forget_tls()  # no session from an earlier test
    resumed = []
    for _ in range(3):
        conn = await connect(settings, reactor)
        try:
            assert (await conn.read_line()).startswith(b"220 ")
            conn.send(b"EHLO apppass.test\r\n")
            while not (await conn.read_line()).startswith(b"250 "):
                pass
            conn.send(b"STARTTLS\r\n")
            assert (await conn.read_line()).startswith(b"220 ")
            await conn.start_tls()
            conn.send(b"EHLO apppass.test\r\n")
            while not (await conn.read_line()).startswith(b"250 "):  # the tickets come first
                pass
            resumed.append(conn.transport.getHandle().session_reused())
        finally:
            conn.close()
    # No certificate chain sent or verified again. (Dovecot 2.3 with its defaults sends tickets
    # but never resumes a session: there every handshake is a full one.)
    assert resumed == [False, True, True]


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_an_upstream_error(dovecot):
    closed = dataclasses.replace(imap(dovecot), port=free_port())
    with pytest.raises(UpstreamError, match=r"cannot connect to 127\.0\.0\.1"):
        await connect(closed, reactor)
