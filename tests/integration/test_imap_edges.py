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


@pytest_twisted.ensureDeferred
async def test_a_one_shot_code_is_not_spent_by_a_login_the_upstream_refused(dovecot, tmp_path):
    wrong_master = upstream(dovecot)
    wrong_master["imap"]["master_password"] = "not the master password"
    harness = await start_proxy(tmp_path, listeners=[dict(PLAIN)], upstream=wrong_master)
    try:
        code_id, code = harness.issue("alice", max_uses=1)
        data, _ = await threads.deferToThread(
            read_until_closed,
            harness.port("plain"),
            f'a LOGIN alice "{code}"\r\nb LOGOUT\r\n'.encode(),
        )
        record = harness.store.get(code_id)
    finally:
        await harness.stop()
    assert b"a NO [UNAVAILABLE]" in data
    assert record.use_count == 0 and record.last_used_at is None


@pytest_twisted.ensureDeferred
async def test_a_one_shot_code_logs_in_once_and_is_counted_once(dovecot, tmp_path):
    harness = await start_proxy(tmp_path, listeners=[dict(PLAIN)], upstream=upstream(dovecot))
    try:
        code_id, code = harness.issue("alice", max_uses=1)
        login = f'a LOGIN alice "{code}"\r\nb LOGOUT\r\n'.encode()
        first, _ = await threads.deferToThread(read_until_closed, harness.port("plain"), login)
        second, _ = await threads.deferToThread(read_until_closed, harness.port("plain"), login)
        record = harness.store.get(code_id)
    finally:
        await harness.stop()
    assert b"a OK [CAPABILITY" in first
    assert b"a NO [EXPIRED]" in second
    assert record.use_count == 1 and record.last_used_protocol == "imap"


@pytest_twisted.ensureDeferred
async def test_connections_past_the_cap_get_bye_and_are_closed(dovecot, tmp_path):
    harness = await start_proxy(
        tmp_path,
        listeners=[dict(PLAIN)],
        upstream=upstream(dovecot),
        limits={"max_preauth_per_address": 2},
    )

    def two_held_then_a_third() -> bytes:
        held = []
        try:
            for _ in range(2):
                held.append(socket.create_connection(("127.0.0.1", harness.port("plain")), 10))
                assert held[-1].recv(4096).startswith(b"* OK")
            return read_until_closed(harness.port("plain"))[0]
        finally:
            for s in held:
                s.close()

    try:
        data = await threads.deferToThread(two_held_then_a_third)
        events = harness.audit_events("connection_refused")
    finally:
        await harness.stop()
    assert data == b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"
    assert events and "limits.max_preauth_per_address" in events[0]["reason"]


@pytest_twisted.ensureDeferred
async def test_a_listener_can_list_its_own_capabilities_instead_of_the_upstreams(dovecot, tmp_path):
    own = {**PLAIN, "name": "own", "capabilities": ["IDLE", "NAMESPACE"]}
    harness = await start_proxy(tmp_path, listeners=[dict(PLAIN), own], upstream=upstream(dovecot))
    try:
        learned, _ = await threads.deferToThread(
            read_until_closed, harness.port("plain"), b"a LOGOUT\r\n"
        )
        listed, _ = await threads.deferToThread(
            read_until_closed, harness.port("own"), b"a LOGOUT\r\n"
        )
    finally:
        await harness.stop()
    assert b"ENABLE" in learned.split(b"\r\n")[0]  # Dovecot's, learned at start
    assert listed.split(b"\r\n")[0] == (
        b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID IDLE NAMESPACE AUTH=PLAIN AUTH=LOGIN]"
        b" apppass ready."
    )
