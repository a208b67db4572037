"""One TLS client creator per upstream (proxy/upstream.py client_tls): its OpenSSL context and
trust store are made once and shared by the upstream's connections, made again when the
ca_file is replaced on disk or on reload. Handshakes: tests/integration/test_tls_handshakes.py."""

from __future__ import annotations

import os
import shutil

import pytest

from proxy.config import Upstream
from proxy.protocols import MailProtocol
from proxy.upstream import client_tls, forget_tls
from tests.support.ca import TestCA


@pytest.fixture
def ca(tmp_path) -> TestCA:
    forget_tls()
    yield TestCA.create(tmp_path / "pki")
    forget_tls()


def upstream(**fields) -> Upstream:
    return Upstream(MailProtocol.IMAP, "imap.internal.example", 143, **fields)


def test_connections_to_one_upstream_share_one_creator(ca):
    settings = upstream(ca_file=ca.ca)
    first = client_tls(settings)
    assert client_tls(settings) is first
    assert client_tls(upstream(ca_file=ca.ca)) is first  # equal settings, e.g. after a reload
    assert client_tls(upstream(ca_file=ca.ca, server_name="other.example")) is not first
    unverified = client_tls(upstream(verify=False))
    assert client_tls(upstream(verify=False)) is unverified is not first


def test_a_replaced_ca_file_is_read_at_the_next_connection(ca, tmp_path):
    trusted = tmp_path / "trusted.pem"
    shutil.copy(ca.ca, trusted)
    first = client_tls(upstream(ca_file=trusted))
    other = TestCA.create(tmp_path / "other")
    replacement = tmp_path / "new.pem"
    replacement.write_bytes(ca.ca.read_bytes() + other.ca.read_bytes())
    os.replace(replacement, trusted)  # as a deployment tool swaps the file
    second = client_tls(upstream(ca_file=trusted))
    assert second is not first
    assert client_tls(upstream(ca_file=trusted)) is second


def test_reload_makes_every_upstreams_creator_again(ca):
    first = client_tls(upstream(ca_file=ca.ca))
    forget_tls()
    assert client_tls(upstream(ca_file=ca.ca)) is not first
