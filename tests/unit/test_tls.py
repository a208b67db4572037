"""TLS contexts without a connection: the errors a person sees for bad certificate and key files,
a reload that fails, which ciphers a legacy listener adds, and upstream settings refused.
Handshakes over loopback: tests/integration/test_tls_handshakes.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.tls import (
    CIPHERS_INTERMEDIATE,
    LEGACY_SECURITY_LEVEL,
    ServerTLS,
    TLSConfigError,
    build_server_context,
    upstream_tls,
)
from tests.support.ca import CertFiles, TestCA


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(ca: TestCA) -> CertFiles:
    return ca.issue("server", rsa_key=True)


def _write(path: Path, *pems: bytes) -> Path:
    path.write_bytes(b"".join(pems))
    return path


# --- listener: ciphers --------------------------------------------------------------------------


def test_security_level_drops_only_for_legacy_listeners(server):
    def cipher_names(min_tls):
        ctx = build_server_context(str(server.cert), str(server.key), min_tls)
        return {c["name"] for c in ctx.get_ciphers()}

    modern = cipher_names("1.2")
    legacy = cipher_names("1.0")
    assert "ECDHE-RSA-AES128-SHA" not in modern  # no CBC-SHA1 suites at 1.2
    assert "ECDHE-RSA-AES128-SHA" in legacy
    assert not any("CBC3" in c or "RC4" in c or "NULL" in c for c in legacy)
    assert LEGACY_SECURITY_LEVEL not in CIPHERS_INTERMEDIATE


# --- listener: reload ---------------------------------------------------------------------------


def test_failed_reload_keeps_the_old_certificate_and_says_why(ca):
    live = ca.issue("half-written")
    tls = ServerTLS(str(live.cert), str(live.key))
    live.key.write_text("half-written file")
    with pytest.raises(TLSConfigError) as e:
        tls.reload()
    assert str(live.key) in str(e.value)
    assert tls.certificate == live.certificate()


# --- listener: errors a person sees -------------------------------------------------------------


def test_missing_certificate_file_is_named(server, tmp_path):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError) as e:
        ServerTLS(str(missing), str(server.key))
    assert e.value.subject == str(missing)
    assert "cannot read certificate file: No such file or directory" in str(e.value)


def test_file_without_a_certificate_is_named(server, tmp_path):
    junk = _write(tmp_path / "junk.pem", b"hello\n")
    with pytest.raises(TLSConfigError, match="no PEM certificate") as e:
        ServerTLS(str(junk), str(server.key))
    assert e.value.subject == str(junk)


def test_damaged_certificate_is_named(server, tmp_path):
    pem = server.cert.read_bytes().replace(b"M", b"!", 3)
    bad = _write(tmp_path / "bad.pem", pem)
    with pytest.raises(TLSConfigError, match="damaged PEM certificate") as e:
        ServerTLS(str(bad), str(server.key))
    assert e.value.subject == str(bad)


def test_key_that_does_not_match_is_named(ca, server):
    other = ca.issue("other")
    with pytest.raises(TLSConfigError, match="does not match the certificate") as e:
        ServerTLS(str(server.cert), str(other.key))
    assert e.value.subject == str(other.key)


def test_chain_in_the_wrong_order_gets_a_hint(ca, server, tmp_path):
    wrong = _write(tmp_path / "wrong.pem", ca.ca.read_bytes(), server.cert.read_bytes())
    with pytest.raises(TLSConfigError, match="must come first"):
        ServerTLS(str(wrong), str(server.key))


def test_encrypted_key_is_explained(server, tmp_path):
    key = serialization.load_pem_private_key(server.key.read_bytes(), None)
    enc = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    key_file = _write(tmp_path / "enc.key", enc)
    with pytest.raises(TLSConfigError, match="encrypted") as e:
        ServerTLS(str(server.cert), str(key_file))
    assert e.value.subject == str(key_file)


def test_key_file_with_only_a_certificate_is_named(server):
    with pytest.raises(TLSConfigError, match="no PEM private key") as e:
        ServerTLS(str(server.cert), str(server.cert))
    assert e.value.subject == str(server.cert)


def test_combined_pem_with_certificate_and_key_works(server, tmp_path):
    both = _write(tmp_path / "both.pem", server.cert.read_bytes(), server.key.read_bytes())
    assert ServerTLS(str(both), str(both)).certificate == server.certificate()


@pytest.mark.parametrize("bad", ["1.4", "TLSv1.2", "", "1"])
def test_unknown_min_tls_is_refused(server, bad):
    with pytest.raises(TLSConfigError, match=re.escape("is not one of 1.0, 1.1, 1.2, 1.3")) as e:
        ServerTLS(str(server.cert), str(server.key), min_tls=bad)
    assert e.value.subject == "min_tls"


# --- upstream (client) side ---------------------------------------------------------------------


def test_upstream_ca_file_errors_are_named(tmp_path):
    missing = tmp_path / "ca.pem"
    with pytest.raises(TLSConfigError, match="cannot read CA certificate file") as e:
        upstream_tls("localhost", ca_file=str(missing))
    assert e.value.subject == str(missing)
    junk = _write(tmp_path / "junk.pem", b"not a cert")
    with pytest.raises(TLSConfigError, match="no PEM CA certificate"):
        upstream_tls("localhost", ca_file=str(junk))


def test_upstream_min_tls_below_12_is_refused():
    with pytest.raises(TLSConfigError, match=re.escape("only 1.2 or 1.3")):
        upstream_tls("localhost", min_tls="1.0")
