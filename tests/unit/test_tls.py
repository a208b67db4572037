"""TLS contexts: listener handshakes by protocol version, certificate reload, upstream
verification, and the errors a person sees for bad files. Certificates are generated per test
session with `cryptography`; clients are Python's ssl module (in a thread) and Twisted."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.interfaces import IHandshakeListener
from zope.interface import implementer

from proxy.tls import (
    CIPHERS_INTERMEDIATE,
    LEGACY_SECURITY_LEVEL,
    ServerTLS,
    TLSConfigError,
    build_server_context,
    upstream_tls,
)

# --- a small PKI --------------------------------------------------------------------------------


@dataclass
class Issued:
    cert: x509.Certificate
    key: object
    cert_file: Path
    key_file: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, *pems: bytes) -> Path:
    path.write_bytes(b"".join(pems))
    return path


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_ca(directory: Path, name: str = "apppass test CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    slug = name.replace(" ", "-")
    return Issued(
        cert, key, _write(directory / f"{slug}.pem", _cert_pem(cert)),
        _write(directory / f"{slug}.key", _key_pem(key)),
    )


def issue(
    directory: Path,
    ca: Issued,
    names=("localhost",),
    ips=("127.0.0.1",),
    stem: str = "server",
    rsa_key: bool = True,
) -> Issued:
    """A server certificate signed by `ca`; cert_file is the chain (leaf, then CA)."""
    key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0] if names else "server"))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return Issued(
        cert, key,
        _write(directory / f"{stem}.pem", _cert_pem(cert), _cert_pem(ca.cert)),
        _write(directory / f"{stem}.key", _key_pem(key)),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return {"dir": d, "ca": ca, "server": issue(d, ca), "other_ca": make_ca(d, "another CA")}


# --- a TLS listener and clients -----------------------------------------------------------------


class Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(b"* OK ready\r\n")


def listen(server_tls: ServerTLS):
    return reactor.listenSSL(0, protocol.Factory.forProtocol(Greeter), server_tls, interface="127.0.0.1")


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
async def test_modern_client_handshakes_at_the_default_minimum(pki):
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file))
    assert tls.min_tls == "1.2"
    version, der = await handshake_with_ssl_module(tls, pki["ca"].cert_file)
    assert version in ("TLSv1.2", "TLSv1.3")
    assert x509.load_der_x509_certificate(der) == pki["server"].cert


@pytest_twisted.ensureDeferred
async def test_tls12_client_handshakes_at_min_12(pki):
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls="1.2")
    version, _ = await handshake_with_ssl_module(tls, pki["ca"].cert_file, ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2"


@pytest_twisted.ensureDeferred
async def test_tls12_client_is_refused_at_min_13(pki):
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls="1.3")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, pki["ca"].cert_file, ssl.TLSVersion.TLSv1_2)
    version, _ = await handshake_with_ssl_module(tls, pki["ca"].cert_file)
    assert version == "TLSv1.3"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls10_client_is_refused_at_min_12(pki):
    assert client_can_speak(ssl.TLSVersion.TLSv1), "the test client\'s OpenSSL must offer this TLS version"
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls="1.2")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, pki["ca"].cert_file, ssl.TLSVersion.TLSv1, legacy=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("min_tls, version, name", [
    ("1.0", ssl.TLSVersion.TLSv1, "TLSv1"),
    ("1.0", ssl.TLSVersion.TLSv1_1, "TLSv1.1"),
    ("1.1", ssl.TLSVersion.TLSv1_1, "TLSv1.1"),
])
@pytest_twisted.ensureDeferred
async def test_legacy_client_is_accepted_when_the_listener_allows_it(pki, min_tls, version, name):
    assert client_can_speak(version), "the test client\'s OpenSSL must offer this TLS version"
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls=min_tls)
    got, _ = await handshake_with_ssl_module(tls, pki["ca"].cert_file, version, legacy=True)
    assert got == name


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls10_client_is_refused_at_min_11(pki):
    assert client_can_speak(ssl.TLSVersion.TLSv1), "the test client\'s OpenSSL must offer this TLS version"
    tls = ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls="1.1")
    with pytest.raises(ssl.SSLError):
        await handshake_with_ssl_module(tls, pki["ca"].cert_file, ssl.TLSVersion.TLSv1, legacy=True)


def test_security_level_drops_only_for_legacy_listeners(pki):
    from OpenSSL import SSL

    def cipher_names(min_tls):
        ctx = build_server_context(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls)
        return set(SSL.Connection(ctx).get_cipher_list())

    modern = cipher_names("1.2")
    legacy = cipher_names("1.0")
    assert "ECDHE-RSA-AES128-SHA" not in modern  # no CBC-SHA1 suites at 1.2
    assert "ECDHE-RSA-AES128-SHA" in legacy
    assert not any("CBC3" in c or "RC4" in c or "NULL" in c for c in legacy)
    assert LEGACY_SECURITY_LEVEL not in CIPHERS_INTERMEDIATE


# --- listener: reload ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reload_serves_a_renewed_certificate_to_new_connections(pki, tmp_path):
    first = issue(tmp_path, pki["ca"], stem="live")
    tls = ServerTLS(str(first.cert_file), str(first.key_file))
    port = listen(tls)
    try:
        p = port.getHost().port
        _, der = await threads.deferToThread(ssl_client, p, pki["ca"].cert_file)
        assert x509.load_der_x509_certificate(der) == first.cert

        renewed = issue(tmp_path, pki["ca"], stem="live", rsa_key=False)  # same paths, new files
        assert tls.certificate == first.cert  # nothing changes until reload
        tls.reload()
        assert tls.certificate == renewed.cert
        assert tls.expires_at == renewed.cert.not_valid_after_utc
        _, der = await threads.deferToThread(ssl_client, p, pki["ca"].cert_file)
        assert x509.load_der_x509_certificate(der) == renewed.cert
    finally:
        await port.stopListening()


def test_failed_reload_keeps_the_old_certificate_and_says_why(pki, tmp_path):
    live = issue(tmp_path, pki["ca"], stem="live")
    tls = ServerTLS(str(live.cert_file), str(live.key_file))
    live.key_file.write_text("half-written file")
    with pytest.raises(TLSConfigError) as e:
        tls.reload()
    assert str(live.key_file) in str(e.value)
    assert tls.certificate == live.cert


# --- listener: errors a person sees -------------------------------------------------------------


def test_missing_certificate_file_is_named(pki, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError) as e:
        ServerTLS(str(missing), str(pki["server"].key_file))
    assert e.value.subject == str(missing)
    assert "cannot read certificate file: No such file or directory" in str(e.value)


def test_file_without_a_certificate_is_named(pki, tmp_path):
    junk = _write(tmp_path / "junk.pem", b"hello\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate") as e:
        ServerTLS(str(junk), str(pki["server"].key_file))
    assert e.value.subject == str(junk)


def test_damaged_certificate_is_named(pki, tmp_path):
    pem = _cert_pem(pki["server"].cert).replace(b"M", b"!", 3)
    bad = _write(tmp_path / "bad.pem", pem)
    with pytest.raises(TLSConfigError, match="damaged PEM certificate") as e:
        ServerTLS(str(bad), str(pki["server"].key_file))
    assert e.value.subject == str(bad)


def test_key_that_does_not_match_is_named(pki, tmp_path):
    other = issue(tmp_path, pki["ca"], stem="other")
    with pytest.raises(TLSConfigError, match="does not match the certificate") as e:
        ServerTLS(str(pki["server"].cert_file), str(other.key_file))
    assert e.value.subject == str(other.key_file)


def test_chain_in_the_wrong_order_gets_a_hint(pki, tmp_path):
    s = pki["server"]
    wrong = _write(tmp_path / "wrong.pem", _cert_pem(pki["ca"].cert), _cert_pem(s.cert))
    with pytest.raises(TLSConfigError, match="must come first"):
        ServerTLS(str(wrong), str(s.key_file))


def test_encrypted_key_is_explained(pki, tmp_path):
    enc = pki["server"].key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    key_file = _write(tmp_path / "enc.key", enc)
    with pytest.raises(TLSConfigError, match="encrypted") as e:
        ServerTLS(str(pki["server"].cert_file), str(key_file))
    assert e.value.subject == str(key_file)


def test_key_file_with_only_a_certificate_is_named(pki):
    s = pki["server"]
    with pytest.raises(TLSConfigError, match="no PEM private key") as e:
        ServerTLS(str(s.cert_file), str(s.cert_file))
    assert e.value.subject == str(s.cert_file)


def test_combined_pem_with_certificate_and_key_works(pki, tmp_path):
    s = pki["server"]
    both = _write(tmp_path / "both.pem", _cert_pem(s.cert), _key_pem(s.key))
    assert ServerTLS(str(both), str(both)).certificate == s.cert


@pytest.mark.parametrize("bad", ["1.4", "TLSv1.2", "", "1"])
def test_unknown_min_tls_is_refused(pki, bad):
    with pytest.raises(TLSConfigError, match="is not one of 1.0, 1.1, 1.2, 1.3") as e:
        ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file), min_tls=bad)
    assert e.value.subject == "min_tls"


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
            "127.0.0.1", port.getHost().port,
            protocol.ClientFactory.forProtocol(lambda: HandshakeProbe(result)), creator,
        )
        return await result.addTimeout(10, reactor)
    finally:
        await port.stopListening()


@pytest.fixture
def server_tls(pki):
    return ServerTLS(str(pki["server"].cert_file), str(pki["server"].key_file))


@pytest_twisted.ensureDeferred
async def test_upstream_verifies_chain_and_hostname(pki, server_tls):
    cert = await connect_upstream(server_tls, upstream_tls("localhost", ca_file=str(pki["ca"].cert_file)))
    assert cert.to_cryptography() == pki["server"].cert


@pytest_twisted.ensureDeferred
async def test_upstream_verifies_an_ip_address_against_ip_sans(pki, server_tls):
    cert = await connect_upstream(server_tls, upstream_tls("127.0.0.1", ca_file=str(pki["ca"].cert_file)))
    assert cert.to_cryptography() == pki["server"].cert


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_ca_fails(pki, server_tls):
    with pytest.raises(Exception, match="certificate verify failed"):
        await connect_upstream(server_tls, upstream_tls("localhost", ca_file=str(pki["other_ca"].cert_file)))


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_hostname_fails(pki, server_tls):
    from service_identity import VerificationError

    with pytest.raises(VerificationError):
        await connect_upstream(server_tls, upstream_tls("imap.example.org", ca_file=str(pki["ca"].cert_file)))


@pytest_twisted.ensureDeferred
async def test_upstream_with_a_wrong_ip_fails(pki, server_tls):
    from service_identity import VerificationError

    with pytest.raises(VerificationError):
        await connect_upstream(server_tls, upstream_tls("127.0.0.2", ca_file=str(pki["ca"].cert_file)))


@pytest_twisted.ensureDeferred
async def test_upstream_system_store_does_not_trust_a_private_ca(pki, server_tls):
    with pytest.raises(Exception, match="certificate verify failed"):
        await connect_upstream(server_tls, upstream_tls("localhost"))


@pytest_twisted.ensureDeferred
async def test_upstream_verify_false_accepts_any_certificate_for_any_name(pki, server_tls):
    cert = await connect_upstream(
        server_tls, upstream_tls("imap.example.org", ca_file=str(pki["other_ca"].cert_file), verify=False)
    )
    assert cert.to_cryptography() == pki["server"].cert


def test_upstream_ca_file_errors_are_named(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(TLSConfigError, match="cannot read CA certificate file") as e:
        upstream_tls("localhost", ca_file=str(missing))
    assert e.value.subject == str(missing)
    junk = _write(tmp_path / "junk.pem", b"not a cert")
    with pytest.raises(TLSConfigError, match="no PEM CA certificate"):
        upstream_tls("localhost", ca_file=str(junk))


def test_upstream_min_tls_below_12_is_refused():
    with pytest.raises(TLSConfigError, match="only 1.2 or 1.3"):
        upstream_tls("localhost", min_tls="1.0")
