"""TLS handshakes over loopback: listener handshakes by protocol version, a reloaded certificate
served to new connections, and upstream verification of chain, host name and IP address.
Certificates come from the session's test CA; clients are Python's ssl module (in a thread) and
Twisted. Contexts without a connection: tests/unit/test_tls.py."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from proxy.tls import LEGACY_SECURITY_LEVEL, ServerTLS, upstream_tls
from tests.support.ca import CertFiles, TestCA

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(test_ca: TestCA) -> CertFiles:
    """An RSA certificate for localhost and 127.0.0.1, in a file with its chain (leaf, then CA)."""
    files = test_ca.issue("tls-handshakes", rsa_key=True)
    files.cert.write_bytes(files.cert.read_bytes() + test_ca.ca.read_bytes())
    return files


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("other-ca"))


# --- a TLS listener and clients -----------------------------------------------------------------


class Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"* OK ready\r\n")


def listen(server_tls: ServerTLS):
    return reactor.listenSSL(
        0, protocol.Factory.forProtocol(Greeter), server_tls, interface="127.0.0.1"
    )


def ssl_client(port: int, ca_file: Path, version: ssl.TLSVersion | None = None, legacy=False):
    """Blocking ssl-module client (run in a thread): returns (TLS version, peer cert DER)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if legacy:
        ctx.set_ciphers("DEFAULT:" + LEGACY_SECURITY_LEVEL)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.recv(100) == b"* OK ready\r\n"
            return s.version(), s.getpeercert(binary_form=True)


async def handshake_with_ssl_module(server_tls, ca_file, version=None, legacy=False):
    port = listen(server_tls)
    try:
        return await threads.deferToThread(
            ssl_client, port.getHost().port, ca_file, version, legacy
        )
    finally:
        await port.stopListening()


def client_can_speak(version: ssl.TLSVersion) -> bool:
    """Whether the ssl module's OpenSSL here will offer this version at all (its build or the
    system's openssl.cnf may forbid it): try to produce a ClientHello into a memory BIO."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:" + LEGACY_SECURITY_LEVEL)
        ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO()).do_handshake()
    except ssl.SSLWantReadError:
        return True  # the ClientHello went out; it now waits for the server
    except (ValueError, ssl.SSLError):
        return False
    return False


# --- listener: versions -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_modern_client_handshakes_at_the_default_minimum(test_ca, server):
    tls = ServerTLS(str(server.cert), str(server.key))
    assert tls.min_tls == "1.2"
    version, der = await handshake_with_ssl_module(tls, test_ca.ca)
    assert version in ("TLSv1.2", "TLSv1.3")
    assert x509.load_der_x509_certificate(der) == server.certificate()


@pytest_twisted.ensureDeferred
async def test_tls12_client_handshakes_at_min_12(test_ca, server):
    tls = ServerTLS(str(server.cert), str(server.key), min_tls="1.2")
    version, _ = await handshake_with_ssl_module(tls, test_ca.ca, ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2"


@pytest_twisted.ensureDeferred
async def test_tls12_client_is_refused_at_min_13(test_ca, server):
    tls = ServerTLS(str(server.cert), str(server.key), min_tls="1.3")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, test_ca.ca, ssl.TLSVersion.TLSv1_2)
    version, _ = await handshake_with_ssl_module(tls, test_ca.ca)
    assert version == "TLSv1.3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls10_client_is_refused_at_min_12(test_ca, server):
    assert client_can_speak(ssl.TLSVersion.TLSv1), (
        "the test client's OpenSSL must offer this TLS version"
    )
    tls = ServerTLS(str(server.cert), str(server.key), min_tls="1.2")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, test_ca.ca, ssl.TLSVersion.TLSv1, legacy=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize(
    "min_tls, version, name",
    [
        ("1.0", ssl.TLSVersion.TLSv1, "TLSv1"),
        ("1.0", ssl.TLSVersion.TLSv1_1, "TLSv1.1"),
        ("1.1", ssl.TLSVersion.TLSv1_1, "TLSv1.1"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_legacy_client_is_accepted_when_the_listener_allows_it(
    test_ca, server, min_tls, version, name
):
    assert client_can_speak(version), "the test client's OpenSSL must offer this TLS version"
    tls = ServerTLS(str(server.cert), str(server.key), min_tls=min_tls)
    got, _ = await handshake_with_ssl_module(tls, test_ca.ca, version, legacy=True)
    assert got == name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls10_client_is_refused_at_min_11(test_ca, server):
    assert client_can_speak(ssl.TLSVersion.TLSv1), (
        "the test client's OpenSSL must offer this TLS version"
    )
    tls = ServerTLS(str(server.cert), str(server.key), min_tls="1.1")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, test_ca.ca, ssl.TLSVersion.TLSv1, legacy=True)


# --- listener: reload ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reload_serves_a_renewed_certificate_to_new_connections(test_ca):
    first = test_ca.issue("tls-reload", rsa_key=True)
    first_cert = first.certificate()
    tls = ServerTLS(str(first.cert), str(first.key))
    port = listen(tls)
    try:
        p = port.getHost().port
        _, der = await threads.deferToThread(ssl_client, p, test_ca.ca)
        assert x509.load_der_x509_certificate(der) == first_cert

        renewed = test_ca.issue("tls-reload")  # same paths, new files (an EC key this time)
        renewed_cert = renewed.certificate()
        assert tls.certificate == first_cert  # nothing changes until reload
        tls.reload()
        assert tls.certificate == renewed_cert
        assert tls.expires_at == renewed_cert.not_valid_after_utc
        _, der = await threads.deferToThread(ssl_client, p, test_ca.ca)
        assert x509.load_der_x509_certificate(der) == renewed_cert
    finally:
        await port.stopListening()


# --- upstream (client) side ---------------------------------------------------------------------


@implementer(IHandshakeListener)
class HandshakeProbe(protocol.Protocol):
    def __init__(self, result: defer.Deferred):
        self.result = result
        self.done = False

    def handshakeCompleted(self):
        self.done = True
        self.result.callback(self.transport.getPeerCertificate())
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.done:
            self.result.errback(reason)


async def connect_upstream(server_tls: ServerTLS, creator):
    port = listen(server_tls)
    try:
        result = defer.Deferred()
        reactor.connectSSL(
            "127.0.0.1",
            port.getHost().port,
            protocol.ClientFactory.forProtocol(lambda: HandshakeProbe(result)),
            creator,
        )
        return await result.addTimeout(10, reactor)
    finally:
        await port.stopListening()


@pytest.fixture
def server_tls(server):
    return ServerTLS(str(server.cert), str(server.key))


@pytest_twisted.ensureDeferred
async def test_upstream_verifies_chain_and_hostname(test_ca, server, server_tls):
    cert = await connect_upstream(server_tls, upstream_tls("localhost", ca_file=str(test_ca.ca)))
    assert cert.to_cryptography() == server.certificate()


@pytest_twisted.ensureDeferred
async def test_upstream_verifies_an_ip_address_against_ip_sans(test_ca, server, server_tls):
    cert = await connect_upstream(server_tls, upstream_tls("127.0.0.1", ca_file=str(test_ca.ca)))
    assert cert.to_cryptography() == server.certificate()


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_ca_fails(other_ca, server_tls):
    with pytest.raises(Exception, match="certificate verify failed"):
        await connect_upstream(server_tls, upstream_tls("localhost", ca_file=str(other_ca.ca)))


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_hostname_fails(test_ca, server_tls):
    from service_identity import VerificationError

    with pytest.raises(VerificationError):
        await connect_upstream(
            server_tls, upstream_tls("imap.example.org", ca_file=str(test_ca.ca))
        )


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_ip_fails(test_ca, server_tls):
    from service_identity import VerificationError

    with pytest.raises(VerificationError):
        await connect_upstream(server_tls, upstream_tls("127.0.0.2", ca_file=str(test_ca.ca)))


@pytest_twisted.ensureDeferred
async def test_upstream_system_store_does_not_trust_a_private_ca(server_tls):
    with pytest.raises(Exception, match="certificate verify failed"):
        await connect_upstream(server_tls, upstream_tls("localhost"))


@pytest_twisted.ensureDeferred
async def test_upstream_verify_false_accepts_any_certificate_for_any_name(
    other_ca, server, server_tls
):
    cert = await connect_upstream(
        server_tls, upstream_tls("imap.example.org", ca_file=str(other_ca.ca), verify=False)
    )
    assert cert.to_cryptography() == server.certificate()


@implementer(IHandshakeListener)
class GreetingProbe(protocol.Protocol):
    """Reads the listener's greeting (which also brings the TLS 1.3 tickets), then says whether
    the handshake resumed a session, and with which certificate."""

    def __init__(self, result: defer.Deferred):
        self.result = result

    def handshakeCompleted(self):
        pass

    def dataReceived(self, data):
        if not self.result.called:
            handle = self.transport.getHandle()
            self.result.callback((handle.session_reused(), self.transport.getPeerCertificate()))
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.result.called:
            self.result.errback(reason)


async def greeted(port: int, creator):
    result = defer.Deferred()
    reactor.connectSSL(
        "127.0.0.1",
        port,
        protocol.ClientFactory.forProtocol(lambda: GreetingProbe(result)),
        creator,
    )
    return await result.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_upstream_connections_resume_the_latest_session_and_still_check_its_name(
    test_ca, server, server_tls
):
    from service_identity import VerificationError

    from proxy.tls import UpstreamTLS

    port = listen(server_tls)
    try:
        creator = upstream_tls("localhost", ca_file=str(test_ca.ca))
        reused, cert = await greeted(port.getHost().port, creator)
        assert not reused and cert.to_cryptography() == server.certificate()
        for _ in range(2):
            reused, cert = await greeted(port.getHost().port, creator)
            assert reused and cert.to_cryptography() == server.certificate()
        # The same context and session, for a name the certificate does not carry: refused
        # although nothing about the chain is checked again.
        other = UpstreamTLS("imap.example.org", creator._context, verify=True)
        other._session = creator._session
        with pytest.raises(VerificationError):
            await greeted(port.getHost().port, other)
    finally:
        await port.stopListening()
