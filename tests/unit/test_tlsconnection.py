"""StdlibConnection answers Twisted's TLSMemoryBIOProtocol as a pyOpenSSL Connection would: in
memory, against a client made with the ssl module, every outcome Twisted tells apart (more bytes
needed, data, the client's close_notify, an EOF without one, a TLS failure, our own shutdown).
Whole sessions over loopback: tests/integration/test_tls_handshakes.py and the protocol tests."""

from __future__ import annotations

import ssl

import pytest
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.protocols.tls import _representsEOF

from proxy.tls import ServerTLS
from proxy.tlsconnection import StdlibConnection, check_certificate
from tests.support.ca import TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("pki"))


class Client:
    """A TLS client in memory (the ssl module), wired to one StdlibConnection."""

    def __init__(self, ca: TestCA, server: StdlibConnection, **context) -> None:
        ctx = ca.client_context()
        for name, value in context.items():
            setattr(ctx, name, value)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.server = server

    def to_server(self) -> None:
        data = self.outgoing.read()
        if data:
            self.server.bio_write(data)

    def from_server(self) -> None:
        while True:
            try:
                self.incoming.write(self.server.bio_read(2**15))
            except WantReadError:
                return

    def handshake(self) -> None:
        for _ in range(5):
            try:
                self.tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            self.to_server()
            try:
                self.server.do_handshake()
            except WantReadError:
                pass
            self.from_server()
            if done:
                return
        raise AssertionError("no handshake in five round trips")


def connect(ca: TestCA, min_tls: str = "1.2", **client) -> tuple[StdlibConnection, Client]:
    conn = ServerTLS(str(ca.cert), str(ca.key), min_tls).serverConnectionForTLS(None)
    conn.set_accept_state()
    conn.set_app_data(object())
    c = Client(ca, conn, **client)
    c.handshake()
    return conn, c


def test_nothing_to_send_or_read_is_want_read(ca):
    conn = StdlibConnection(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(WantReadError):
        conn.bio_read(100)
    server, _ = connect(ca)
    with pytest.raises(WantReadError):
        server.recv(100)


def test_data_both_ways_after_the_handshake(ca):
    server, client = connect(ca)
    assert server.get_protocol_version_name() == "TLSv1.3"
    assert server.get_cipher_name()
    assert server.get_peer_certificate() is None
    assert server.get_alpn_proto_negotiated() == b""
    client.tls.write(b"a LOGIN x y\r\n")
    client.to_server()
    assert server.recv(2**15) == b"a LOGIN x y\r\n"
    assert server.send(b"a OK\r\n") == 6
    client.from_server()
    assert client.tls.read(100) == b"a OK\r\n"


def test_tls12_when_the_client_goes_no_higher(ca):
    server, _ = connect(ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert server.get_protocol_version_name() == "TLSv1.2"


def test_the_clients_close_notify_is_zero_return(ca):
    server, client = connect(ca)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()  # sends close_notify, then waits for ours
    client.to_server()
    with pytest.raises(ZeroReturnError):
        server.recv(2**15)
    assert server.shutdown() is True  # both sides have now said goodbye
    client.from_server()
    client.tls.unwrap()


def test_our_shutdown_waits_for_the_clients(ca):
    server, client = connect(ca)
    assert server.shutdown() is False
    client.from_server()
    assert client.tls.read(100) == b""  # the ssl module's way of saying close_notify came
    client.tls.unwrap()  # the client answers with its own
    client.to_server()
    with pytest.raises(ZeroReturnError):
        server.recv(2**15)
    assert server.shutdown() is True


def test_eof_without_close_notify_reads_as_a_lost_connection(ca):
    server, _ = connect(ca)
    server.bio_shutdown()
    with pytest.raises(Error) as caught:
        server.recv(2**15)
    assert _representsEOF(caught.value)  # Twisted: ConnectionLost, not a TLS failure


def test_a_client_speaking_plain_text_gets_a_tls_error_in_openssls_words(ca):
    conn = ServerTLS(str(ca.cert), str(ca.key)).serverConnectionForTLS(None)
    conn.bio_write(b"a LOGIN alice secret\r\n")
    with pytest.raises(Error) as caught:
        conn.do_handshake()
    [(_, _, reason)] = caught.value.args[0]
    assert reason == reason.lower() and "_" not in reason
    assert not _representsEOF(caught.value)


def test_an_old_client_below_the_minimum_is_refused(ca):
    server = ServerTLS(str(ca.cert), str(ca.key), "1.3").serverConnectionForTLS(None)
    client = Client(ca, server, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.do_handshake()
    client.to_server()
    with pytest.raises(Error) as caught:
        server.do_handshake()
    assert caught.value.args[0][0][2] == "unsupported protocol"


def test_a_certificate_that_cannot_be_read_or_is_missing_is_a_problem_not_an_error():
    never = []
    assert "sent no certificate" in str(check_certificate(None, never.append))
    assert "cannot read" in str(check_certificate(b"\x30\x03junk", never.append))
    assert never == []  # the name check is not asked about what could not be read
