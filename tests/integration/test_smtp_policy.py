"""A code's sending policy through apppass to a real Postfix delivering into Dovecot: the
printer of the README may send as scanner@example.test to example.test only, ten messages a
day; the eleventh, a wrong sender and a wrong domain are refused without ending the session,
and what was sent arrives in the recipients' mailboxes. A policy changed meanwhile ends the live
session and holds from the next login."""

from __future__ import annotations

import smtplib
import threading
import uuid
from datetime import UTC, datetime

import pytest
import pytest_twisted
from twisted.internet import threads

from proxy.codes.sending import SendingPolicy
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import day_of
from tests.integration.harness import start_proxy
from tests.servers.common import wait_until
from tests.support.process import PROMPTLY

pytestmark = pytest.mark.integration

SCANNER = "scanner@example.test"


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy(postfix, test_ca, tmp_path_factory):
    harness = await start_proxy(
        tmp_path_factory.mktemp("smtp-policy"),
        listeners=[
            {
                "name": "plain",
                "protocol": "smtp",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.smtp_port,
                "tls": "starttls",
                "ca_file": str(test_ca.ca),
                "login": "xclient",
            }
        },
    )
    yield harness
    await harness.stop()


def printer_code(proxy, label: str, per_day: int) -> tuple[int, str]:
    return proxy.issue(
        "printer1",
        label=label,
        scopes=("smtp",),
        sending=SendingPolicy((SCANNER,), ("example.test",), per_day),
    )


def scan(token: str) -> bytes:
    return (
        f"From: {SCANNER}\r\nTo: alice@example.test\r\nSubject: scan {token}\r\n\r\n"
        f"scanned page {token}\r\n"
    ).encode()


def session(port: int, code: str) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=15)
    smtp.ehlo("printer.example.test")
    smtp.login("printer1", code)
    return smtp


def try_send(smtp: smtplib.SMTP, sender: str, to: str, token: str) -> str:
    """One message in an open session: "sent", or the refusal's code and text."""
    try:
        smtp.sendmail(sender, [to], scan(token))
    except smtplib.SMTPSenderRefused as exc:
        return f"{exc.smtp_code} {exc.smtp_error.decode()}"
    except smtplib.SMTPRecipientsRefused as exc:
        ((code, text),) = exc.recipients.values()
        return f"{code} {text.decode()}"
    return "sent"


@pytest_twisted.ensureDeferred
async def test_a_printer_sends_ten_scans_a_day_as_scanner_to_example_test_only(proxy, dovecot):
    code_id, code = printer_code(proxy, "scanner 2nd floor", 10)
    port = proxy.port("plain")
    tokens = [str(uuid.uuid4()) for _ in range(12)]

    def run():
        outcomes = []
        with session(port, code) as smtp:
            outcomes.append(try_send(smtp, "boss@example.test", "alice@example.test", tokens[0]))
            outcomes.append(try_send(smtp, SCANNER, "someone@example.org", tokens[1]))
            outcomes += [try_send(smtp, SCANNER, "alice@example.test", t) for t in tokens[2:8]]
            assert smtp.noop()[0] == 250  # refusals never ended the session
        with session(port, code) as smtp:  # the count is the code's, across sessions
            outcomes += [try_send(smtp, SCANNER, "bob@example.test", t) for t in tokens[8:12]]
            outcomes.append(try_send(smtp, SCANNER, "alice@example.test", "eleventh"))
            assert smtp.noop()[0] == 250
        return outcomes

    outcomes = await threads.deferToThread(run)
    assert outcomes[0] == "550 5.7.1 Error: sender address not allowed for this app password"
    assert outcomes[1] == "550 5.7.1 Error: recipient address not allowed for this app password"
    assert outcomes[2:12] == ["sent"] * 10
    assert outcomes[12] == "452 4.7.0 Error: daily message limit of this app password reached"

    for token, user in [(t, "alice") for t in tokens[2:8]] + [(t, "bob") for t in tokens[8:12]]:
        delivered = await threads.deferToThread(dovecot.wait_for_message, user, token)
        assert delivered["Return-Path"] == f"<{SCANNER}>"
    for user in ("alice", "bob"):
        text = "".join(m.as_string() for m in dovecot.messages(user))
        assert tokens[0] not in text and tokens[1] not in text and "eleventh" not in text

    store = proxy.store
    assert store.sent_on([code_id], day_of(datetime.now(UTC))) == {code_id: 10}
    # Refusals are counted on the code when the session ends at the latest.
    record = await threads.deferToThread(
        wait_until, lambda: (r := store.get(code_id)).send_refused_count == 3 and r, 10.0, "counts"
    )
    assert record.last_send_refused_at is not None
    refused = [c for e in proxy.audit_events("refused") for c in e["commands"]]
    assert {
        "MAIL FROM (sender not allowed)",
        "RCPT TO (recipient not allowed)",
        "RCPT TO (daily message limit)",
    } <= set(refused)


@pytest_twisted.ensureDeferred
async def test_printers_racing_for_the_last_messages_of_the_day_send_exactly_the_cap(
    proxy, dovecot
):
    _, code = printer_code(proxy, "scanner 3rd floor", 5)
    port = proxy.port("plain")
    barrier = threading.Barrier(12)

    def one(outcomes: list[str]) -> None:
        with session(port, code) as smtp:
            barrier.wait()
            outcomes.append(try_send(smtp, SCANNER, "alice@example.test", str(uuid.uuid4())))

    def run() -> list[str]:
        outcomes: list[str] = []
        workers = [threading.Thread(target=one, args=(outcomes,)) for _ in range(12)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return outcomes

    outcomes = await threads.deferToThread(run)
    assert outcomes.count("sent") == 5
    assert outcomes.count("452 4.7.0 Error: daily message limit of this app password reached") == 7


@pytest_twisted.ensureDeferred
async def test_a_new_sending_policy_ends_the_live_session_and_holds_at_the_next_login(proxy):
    code_id, code = printer_code(proxy, "scanner 4th floor", 10)
    port = proxy.port("plain")
    smtp = await threads.deferToThread(session, port, code)
    try:
        # As `apppass codes sending` does, from another process: only example.org from now on.
        cli = SqliteCodeStore(proxy.settings.store.target, migrate=False)
        assert cli.set_sending(code_id, SendingPolicy((SCANNER,), ("example.org",), 10))
        cli.close()
        smtp.sock.settimeout(PROMPTLY)  # the change log is read every second
        goodbye = await threads.deferToThread(smtp.sock.recv, 512)
    finally:
        smtp.close()
    assert goodbye.startswith(b"421 4.7.0 ")
    ended = [e for e in proxy.audit_events("session_ended") if e.get("code") == code_id]
    assert [e["reason"] for e in ended] == [f"app password {code_id} sending policy changed"]

    def again() -> str:
        with session(port, code) as smtp:
            return try_send(smtp, SCANNER, "alice@example.test", "after the change")

    refused = await threads.deferToThread(again)
    assert refused == "550 5.7.1 Error: recipient address not allowed for this app password"
