"""What operators scrape, from a real proxy in front of a real Dovecot: /metrics, /healthz and
/readyz on a web listener that serves them."""

from __future__ import annotations

import imaplib
import json
import urllib.error
import urllib.request

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.common import free_port
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.integration

PLAIN = {"name": "plain", "protocol": "imap", "tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def ops_proxy(tmp_path, imap_port: int):
    ops_port = free_port()
    harness = await start_proxy(
        tmp_path,
        listeners=[dict(PLAIN)],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": imap_port,
                "tls": "none",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
        web={
            "listeners": [
                {"bind": f"127.0.0.1:{ops_port}", "tls": "none", "serve": ["metrics", "health"]}
            ]
        },
    )
    return harness, f"http://127.0.0.1:{ops_port}"


@pytest_twisted.ensureDeferred
async def test_metrics_count_logins_and_sessions_and_name_no_one(dovecot, tmp_path):
    harness, base = await ops_proxy(tmp_path, dovecot.imap_port)
    try:
        _, code = harness.issue("alice")

        def log_in_and_scrape():
            imap = imaplib.IMAP4("127.0.0.1", harness.port("plain"))
            imap.login("alice", code)
            during = get(f"{base}/metrics")
            imap.logout()
            try:
                imaplib.IMAP4("127.0.0.1", harness.port("plain")).login("alice", "wrong")
            except imaplib.IMAP4.error:
                pass
            return during

        status, content_type, body = await threads.deferToThread(log_in_and_scrape)
        after = (await threads.deferToThread(get, f"{base}/metrics"))[2].decode()
    finally:
        await harness.stop()
    text = body.decode()
    assert status == 200 and content_type.startswith("text/plain")
    assert 'apppass_logins_total{listener="plain",outcome="grant",protocol="imap"} 1.0' in text
    assert 'apppass_sessions{protocol="imap"} 1.0' in text
    assert 'apppass_login_phase_seconds_count{phase="argon2"}' in text
    assert 'apppass_queue_running{queue="apppass-argon2"}' in text
    assert 'outcome="credentials",protocol="imap"} 1.0' in after
    assert "alice" not in after and code not in after and "127.0.0.1" not in after


@pytest_twisted.ensureDeferred
async def test_readyz_says_what_is_down_and_healthz_only_that_the_process_answers(
    dovecot, tmp_path
):
    harness, base = await ops_proxy(tmp_path, free_port())  # nothing listens upstream
    try:
        health = await threads.deferToThread(get, f"{base}/healthz")
        ready = await threads.deferToThread(get, f"{base}/readyz")
    finally:
        await harness.stop()
    assert health[0] == 200
    assert ready[0] == 503
    checks = json.loads(ready[2])["checks"]
    assert checks["store"] == "ok" and checks["directory"] == "ok"
    assert checks["upstream_imap"].startswith("failed: cannot connect to 127.0.0.1:")


@pytest_twisted.ensureDeferred
async def test_readyz_is_ready_when_everything_answers(dovecot, tmp_path):
    harness, base = await ops_proxy(tmp_path, dovecot.imap_port)
    try:
        status, _, body = await threads.deferToThread(get, f"{base}/readyz")
        portal = await threads.deferToThread(get, f"{base}/")
    finally:
        await harness.stop()
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert portal[0] == 404  # this listener serves only metrics and health
