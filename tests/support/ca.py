"""The one certificate authority of the tests: a throwaway CA and server certificates it signs.

Unit tests load its files (tests/unit/test_tls.py); integration tests hand them to the proxy's
listeners and to the real servers (the session fixture `test_ca` in tests/servers/fixtures.py);
the benchmark uses it too (bench/stack.py).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# RSA server keys: 2048 bits, the CA/Browser Forum Baseline Requirements' minimum (and quick to
# make).
RSA_KEY_BITS = 2048


@dataclass(frozen=True)
class CertFiles:
    """A server certificate (PEM) and its private key (PEM, unencrypted)."""

    cert: Path
    key: Path

    def certificate(self) -> x509.Certificate:
        """The first certificate in the cert file: the server's own."""
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


@dataclass(frozen=True)
class TestCA:
    """A throwaway CA (ca.pem) with a server certificate (cert.pem, key.pem) for 127.0.0.1 and
    localhost. issue() makes more server certificates from the same CA."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    directory: Path
    ca: Path
    ca_key: Path
    cert: Path
    key: Path

    SERVER_DNS = ("localhost", "mx.example.test", "mail.example.test")
    SERVER_IPS = ("127.0.0.1",)

    @classmethod
    def create(cls, directory: Path) -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apppass test CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        ca_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
        ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(
            ca_key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        files = _issue(
            cert, key, directory / "cert.pem", directory / "key.pem", cls.SERVER_DNS, cls.SERVER_IPS
        )
        return cls(directory, ca_path, ca_key_path, files.cert, files.key)

    def issue(
        self,
        stem: str,
        dns_names: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
        rsa_key: bool = False,
    ) -> CertFiles:
        """A further server certificate signed by this CA: STEM.pem and STEM.key (an EC P-256
        key, or RSA with rsa_key). Issuing the same stem again replaces both files."""
        ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), None)
        return _issue(
            ca_cert,
            ca_key,
            self.directory / f"{stem}.pem",
            self.directory / f"{stem}.key",
            dns_names,
            ips,
            rsa_key,
        )

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks host names."""
        return ssl.create_default_context(cafile=str(self.ca))

    def server_context(self, files: CertFiles | None = None) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        files = files or CertFiles(self.cert, self.key)
        ctx.load_cert_chain(str(files.cert), str(files.key))
        return ctx


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _issue(
    ca_cert,
    ca_key,
    cert_path: Path,
    key_path: Path,
    dns_names: Sequence[str],
    ips: Sequence[str],
    rsa_key: bool = False,
) -> CertFiles:
    now = datetime.datetime.now(datetime.UTC)
    key = (
        rsa.generate_private_key(65537, RSA_KEY_BITS)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    # No names at all: a certificate with only a subject CN, which clients must not accept.
    common_name = dns_names[0] if dns_names else ips[0] if ips else "localhost"
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return CertFiles(cert_path, key_path)
