"""Stale devices through apppass to the real Dovecot and Postfix: a printer that keeps trying a
code that stopped working is told so in its protocol's words, is counted on the code, and does
not lock out the devices beside it, though the proxy allows only three failures a minute from
an address. A wrong secret still counts."""

from __future__ import annotations

import imaplib
import poplib
import smtplib

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.integration


def listener(protocol: str) -> dict:
    return {
        "name": protocol,
        "protocol": protocol,
        "tls": "none",
        "plaintext_auth_from": ["127.0.0.0/8"],
    }


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy(dovecot, postfix, tmp_path_factory):
    master = {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD, "tls": "none"}
    harness = await start_proxy(
        tmp_path_factory.mktemp("stale"),
        listeners=[listener("imap"), listener("pop3"), listener("smtp")],
        upstream={
            "imap": {"host": "127.0.0.1", "port": dovecot.imap_port, **master},
            "pop3": {"host": "127.0.0.1", "port": dovecot.pop3_port, **master},
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.smtp_port,
                "tls": "none",
                "login": "xclient",
            },
        },
        auth={"ip_failures_per_minute": 3},
    )
    yield harness
    await harness.stop()


def imap(port: int, code: str) -> str:
    with imaplib.IMAP4("127.0.0.1", port) as client:
        try:
            return client.login("printer1", code)[0]
        except imaplib.IMAP4.error as exc:
            return str(exc)


def pop3(port: int, code: str) -> str:
    client = poplib.POP3("127.0.0.1", port, timeout=15)
    try:
        client.user("printer1")
        return client.pass_(code).decode()
    except poplib.error_proto as exc:
        return exc.args[0].decode()
    finally:
        client.close()


def smtp(port: int, code: str) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=15) as client:
        client.ehlo("printer.example.test")
        client.user, client.password = "printer1", code
        try:  # one AUTH PLAIN (login() would try LOGIN after a refused PLAIN)
            return str(client.auth("PLAIN", client.auth_plain)[0])
        except smtplib.SMTPAuthenticationError as exc:
            return f"{exc.smtp_code} {exc.smtp_error.decode()}"


TRY = {"imap": imap, "pop3": pop3, "smtp": smtp}
STALE_REPLY = {
    "imap": "[EXPIRED]",
    "pop3": "-ERR [AUTH]",
    "smtp": "535 5.7.8",
}


@pytest.mark.parametrize("protocol", ["imap", "pop3", "smtp"])
@pytest_twisted.ensureDeferred
async def test_a_device_retrying_a_revoked_code_is_told_counted_and_locks_no_one_out(
    proxy, protocol
):
    old_id, old = proxy.issue("printer1", label=f"old {protocol}", scopes=(protocol,))
    _, new = proxy.issue("printer1", label=f"new {protocol}", scopes=(protocol,))
    proxy.store.revoke(old_id)
    port, attempt = proxy.port(protocol), TRY[protocol]

    def run():
        stale = [attempt(port, old) for _ in range(6)]  # twice the address's limit
        return stale, attempt(port, new)

    stale, fresh = await threads.deferToThread(run)
    assert all(STALE_REPLY[protocol] in reply for reply in stale), stale
    assert fresh.startswith(("OK", "+OK", "235")), fresh
    record = proxy.store.get(old_id)
    assert (record.stale_count, record.stale_last_ip, record.failed_count) == (6, "127.0.0.1", 0)
    assert record.still_retrying().endswith("from 127.0.0.1")
    denials = [
        e for e in proxy.audit_events("auth") if e.get("code") == old_id and e["result"] == "deny"
    ]
    assert len(denials) == 6 and all(e["stale"] for e in denials)


@pytest_twisted.ensureDeferred
async def test_a_wrong_secret_under_a_known_selector_still_counts_toward_the_limit(proxy):
    old_id, old = proxy.issue("printer1", label="guessed", scopes=("imap",))
    proxy.store.revoke(old_id)
    wrong = old[:5] + ("A" if old[5] != "A" else "B") + old[6:]
    port = proxy.port("imap")

    def run():
        return [imap(port, wrong) for _ in range(4)]

    replies = await threads.deferToThread(run)
    assert all("[AUTHENTICATIONFAILED]" in r for r in replies[:3]), replies
    assert "[UNAVAILABLE]" in replies[3]  # the address is now limited
    assert proxy.store.get(old_id).failed_count == 3
    proxy.service.authenticator.limiter.success("127.0.0.1", "test")  # let the next tests in
