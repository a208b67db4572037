"""IMAP proxy edges that need their own proxy: the time to log in, upstream TLS that does not
verify, and the per-address limiter seen by a real client."""

from __future__ import annotations

import socket
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.common import remove_tree, short_tempdir
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.support.ca import TestCA

pytestmark = pytest.mark.integration

PLAIN = {"name": "plain", "protocol": "imap", "tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}


def upstream(dovecot, **kw):
    return {
        "imap": {
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "tls": "none",
            "master_user": MASTER_USER,
            "master_password": MASTER_PASSWORD,
            **kw,
        }
    }


def read_until_closed(port: int, send: bytes = b"", timeout: float = 20) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        if send:
            s.sendall(send)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_silent_client_is_logged_out_after_the_login_timeout(dovecot, tmp_path):
    harness = await start_proxy(
        tmp_path, listeners=[dict(PLAIN)], upstream=upstream(dovecot), auth={"login_timeout": "1s"}
    )
    try:
        data, seconds = await threads.deferToThread(read_until_closed, harness.port("plain"))
    finally:
        await harness.stop()
    assert data.startswith(b"* OK [CAPABILITY")
    assert b"* BYE" in data
    assert seconds >= 1.0


@pytest_twisted.ensureDeferred
async def test_upstream_tls_that_does_not_verify_is_unavailable(dovecot, tmp_path):
    other_dir = short_tempdir("ca-")
    try:
        other_ca = TestCA.create(other_dir)
        harness = await start_proxy(
            tmp_path,
            listeners=[dict(PLAIN)],
            upstream=upstream(
                dovecot, port=dovecot.imaps_port, tls="implicit", ca_file=str(other_ca.ca)
            ),
        )
        try:
            _, code = harness.issue("alice")
            data, _ = await threads.deferToThread(
                read_until_closed,
                harness.port("plain"),
                f'a LOGIN alice "{code}"\r\nb LOGOUT\r\n'.encode(),
            )
            failures = harness.audit_events("upstream")
        finally:
            await harness.stop()
    finally:
        remove_tree(other_dir)
    assert b"a NO [UNAVAILABLE]" in data
    assert failures and failures[-1]["result"] == "fail"


@pytest_twisted.ensureDeferred
async def test_many_failures_from_one_address_are_refused_unseen(dovecot, tmp_path):
    harness = await start_proxy(
        tmp_path,
        listeners=[dict(PLAIN)],
        upstream=upstream(dovecot),
        auth={"ip_failures_per_minute": 2},
    )
    try:
        _, code = harness.issue("alice")
        script = b"".join(f'{t} LOGIN alice "AAAA-BBBB-CCCC-DDD{t}"\r\n'.encode() for t in "ab")
        script += f'c LOGIN alice "{code}"\r\n'.encode()
        data, _ = await threads.deferToThread(read_until_closed, harness.port("plain"), script)
        refusals = [e.get("refusal") for e in harness.audit_events("auth")]
    finally:
        await harness.stop()
    assert data.count(b"NO [AUTHENTICATIONFAILED]") == 2
    assert b"c NO [UNAVAILABLE]" in data
    assert refusals == ["credentials", "credentials", "limit"]
