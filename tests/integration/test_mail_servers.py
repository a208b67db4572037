"""The real upstream servers behind the proxy, spoken to by real clients.

These tests prove the fixtures in tests/servers: that Dovecot and Postfix start from their
generated configs and accept exactly the logins the proxy will use upstream (own password,
master user via authzid, IMAP ID x-originating-ip, XCLIENT), over plaintext, STARTTLS and
implicit TLS verified against the test CA, and that mail reaches the maildirs.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.servers.common import ServerError, ensure_installed, free_port, short_tempdir
from tests.servers.dovecot import DEFAULT_USERS, MASTER_PASSWORD, MASTER_USER, Dovecot
from tests.servers.postfix import Postfix
from tests.support.ca import TestCA

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
ALICE = "alice"
ALICE_PASSWORD = DEFAULT_USERS[ALICE]

# Dovecot holds failed logins for a 0.5 s timer unless the passdb says `nodelay`; the
# fixture's config does, so a failure comes back well below that.
FAST_FAILURE_SECONDS = 0.4


def plain_response(authzid: str, authcid: str, password: str) -> bytes:
    """SASL PLAIN message, RFC 4616: authzid NUL authcid NUL passwd."""
    return f"{authzid}\0{authcid}\0{password}".encode()


def token() -> str:
    return uuid.uuid4().hex


# --- IMAP ---------------------------------------------------------------------------------


def test_imap_login_with_the_users_own_password(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        typ, _ = imap.login(ALICE, ALICE_PASSWORD)
        assert typ == "OK"
        typ, _data = imap.select("INBOX")
        assert typ == "OK"


def test_imap_login_with_a_wrong_password_fails_without_delay(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        began = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login(ALICE, "not-the-password")
        assert time.monotonic() - began < FAST_FAILURE_SECONDS
    # No auth penalty for 127.0.0.1 afterwards: the next good login is immediate too.
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        began = time.monotonic()
        assert imap.login(ALICE, ALICE_PASSWORD)[0] == "OK"
        assert time.monotonic() - began < FAST_FAILURE_SECONDS


def test_imap_authenticate_plain_with_authzid_logs_in_as_the_user_via_the_master(
    dovecot: Dovecot,
) -> None:
    mark = dovecot.log_mark()
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        typ, _ = imap.authenticate(
            "PLAIN", lambda _challenge: plain_response(ALICE, MASTER_USER, MASTER_PASSWORD)
        )
        assert typ == "OK"
        assert imap.select("INBOX")[0] == "OK"
    log = dovecot.wait_for_log("Login: user=<alice>", since=mark)
    assert "Master user logging in as alice" in log


def test_imap_login_user_star_master_logs_in_as_the_user(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        assert imap.login(dovecot.master_login("bob"), MASTER_PASSWORD)[0] == "OK"


def test_master_login_for_an_unknown_user_is_an_authorization_failure(dovecot: Dovecot) -> None:
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHORIZATIONFAILED"):
            imap.authenticate(
                "PLAIN", lambda _c: plain_response("nobody", MASTER_USER, MASTER_PASSWORD)
            )


def test_imap_id_x_originating_ip_from_loopback_becomes_the_logged_remote_ip(
    dovecot: Dovecot,
) -> None:
    mark = dovecot.log_mark()
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        typ, _ = imap.xatom("ID", '("x-originating-ip" "192.0.2.55" "x-originating-port" "4711")')
        assert typ == "OK"
        assert imap.login(ALICE, ALICE_PASSWORD)[0] == "OK"
    log = dovecot.wait_for_log("Login: user=<alice>", since=mark)
    assert "rip=192.0.2.55" in log


def test_user_added_while_running_can_log_in_at_once(dovecot: Dovecot) -> None:
    name, password = f"u{token()[:10]}", token()
    dovecot.add_user(name, password)
    try:
        with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
            assert imap.login(name, password)[0] == "OK"
    finally:
        dovecot.remove_user(name)
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(name, password)


def test_imap_starttls_verifies_against_the_test_ca(dovecot: Dovecot, test_ca: TestCA) -> None:
    with imaplib.IMAP4(HOST, dovecot.imap_port) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=test_ca.client_context())
        assert imap.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert imap.login(ALICE, ALICE_PASSWORD)[0] == "OK"


def test_imaps_implicit_tls_verifies_by_ip_and_by_name(dovecot: Dovecot, test_ca: TestCA) -> None:
    for host in (HOST, "localhost"):
        with imaplib.IMAP4_SSL(
            host, dovecot.imaps_port, ssl_context=test_ca.client_context()
        ) as imap:
            assert imap.login(ALICE, ALICE_PASSWORD)[0] == "OK"


def test_imaps_is_not_trusted_without_the_test_ca(dovecot: Dovecot) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(HOST, dovecot.imaps_port, ssl_context=ssl.create_default_context())


def test_curl_imaps_with_sasl_authzid_lists_the_inbox(dovecot: Dovecot, test_ca: TestCA) -> None:
    ensure_installed(["curl"])
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--max-time",
            "20",
            "--cacert",
            str(test_ca.ca),
            "--login-options",
            "AUTH=PLAIN",
            "--user",
            f"{MASTER_USER}:{MASTER_PASSWORD}",
            "--sasl-authzid",
            ALICE,
            f"imaps://{HOST}:{dovecot.imaps_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "INBOX" in result.stdout


# --- POP3 ---------------------------------------------------------------------------------


def test_pop3_user_pass_and_master_login(dovecot: Dovecot) -> None:
    pop = poplib.POP3(HOST, dovecot.pop3_port, timeout=10)
    try:
        pop.user(ALICE)
        assert pop.pass_(ALICE_PASSWORD).startswith(b"+OK")
        count, _size = pop.stat()
        assert count >= 0
    finally:
        pop.quit()
    pop = poplib.POP3(HOST, dovecot.pop3_port, timeout=10)
    try:
        pop.user(dovecot.master_login(ALICE))
        assert pop.pass_(MASTER_PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()


def test_pop3_xclient_addr_from_loopback_becomes_the_logged_remote_ip(dovecot: Dovecot) -> None:
    mark = dovecot.log_mark()
    pop = poplib.POP3(HOST, dovecot.pop3_port, timeout=10)
    try:
        assert pop._shortcmd("XCLIENT ADDR=192.0.2.66 PORT=4711").startswith(b"+OK")
        pop.user(ALICE)
        assert pop.pass_(ALICE_PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()
    log = dovecot.wait_for_log("pop3-login: Info: Login: user=<alice>", since=mark)
    assert "rip=192.0.2.66" in log


def test_pop3_stls_and_pop3s_verify_against_the_test_ca(dovecot: Dovecot, test_ca: TestCA) -> None:
    pop = poplib.POP3(HOST, dovecot.pop3_port, timeout=10)
    try:
        pop.stls(context=test_ca.client_context())
        pop.user(ALICE)
        assert pop.pass_(ALICE_PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()
    pop = poplib.POP3_SSL(HOST, dovecot.pop3s_port, timeout=10, context=test_ca.client_context())
    try:
        pop.user(ALICE)
        assert pop.pass_(ALICE_PASSWORD).startswith(b"+OK")
    finally:
        pop.quit()


# --- Postfix ------------------------------------------------------------------------------


def test_xclient_login_delivers_with_authenticated_sender_and_client_address(
    postfix: Postfix,
) -> None:
    subject = token()
    mark = postfix.log_mark()
    with smtplib.SMTP(HOST, postfix.smtp_port, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        assert "xclient" in smtp.esmtp_features
        code, reply = smtp.docmd("XCLIENT", "LOGIN=alice ADDR=192.0.2.7")
        assert code == 220, reply
        smtp.ehlo("client.test")
        smtp.sendmail(
            postfix.address(ALICE),
            [postfix.address(ALICE)],
            f"From: {postfix.address(ALICE)}\r\nSubject: {subject}\r\n\r\nhello\r\n",
        )
    message = postfix.wait_for_message(ALICE, subject)
    received = " ".join(" ".join(str(h).split()) for h in message.get_all("Received"))
    assert "(Authenticated sender: alice)" in received
    assert "[192.0.2.7]" in received
    log = postfix.wait_for_log("status=sent", since=mark)
    assert "client=unknown[192.0.2.7], sasl_method=XCLIENT, sasl_username=alice" in log


def test_submission_auth_plain_with_authzid_through_dovecot_sasl(
    postfix: Postfix, test_ca: TestCA
) -> None:
    subject = token()
    with smtplib.SMTP(HOST, postfix.submission_port, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        smtp.starttls(context=test_ca.client_context())
        smtp.ehlo("proxy.test")
        assert "PLAIN" in smtp.esmtp_features["auth"].split()
        response = base64.b64encode(plain_response("bob", MASTER_USER, MASTER_PASSWORD)).decode()
        code, reply = smtp.docmd("AUTH", f"PLAIN {response}")
        assert code == 235, reply
        smtp.sendmail(
            postfix.address("bob"),
            [postfix.address(ALICE)],
            f"From: {postfix.address('bob')}\r\nSubject: {subject}\r\n\r\nhi\r\n",
        )
    message = postfix.wait_for_message(ALICE, subject)
    assert "(Authenticated sender: bob)" in " ".join(str(h) for h in message.get_all("Received"))


def test_submission_refuses_a_wrong_password_and_unauthenticated_mail(postfix: Postfix) -> None:
    with smtplib.SMTP(HOST, postfix.submission_port, timeout=10) as smtp:
        smtp.ehlo("proxy.test")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
            smtp.login(ALICE, "not-the-password")
        assert failure.value.smtp_code == 535
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.sendmail(
                postfix.address(ALICE), [postfix.address(ALICE)], "Subject: x\r\n\r\nx\r\n"
            )


def test_submissions_implicit_tls_login_with_own_password(
    postfix: Postfix, test_ca: TestCA
) -> None:
    with smtplib.SMTP_SSL(
        HOST, postfix.submissions_port, timeout=10, context=test_ca.client_context()
    ) as smtp:
        code, _ = smtp.login(ALICE, ALICE_PASSWORD)
        assert code == 235


def test_swaks_xclient_delivers_to_the_maildir(postfix: Postfix, test_ca: TestCA) -> None:
    ensure_installed(["swaks"])
    subject = token()
    result = subprocess.run(
        [
            "swaks",
            "--server",
            HOST,
            "--port",
            str(postfix.smtp_port),
            "--from",
            postfix.address("demo"),
            "--to",
            postfix.address("printer1"),
            "--xclient-login",
            "demo",
            "--xclient-addr",
            "198.51.100.9",
            "--tls",
            "--tls-verify",
            "--tls-ca-path",
            str(test_ca.ca),
            "--header",
            f"Subject: {subject}",
            "--body",
            "scan attached",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    message = postfix.wait_for_message("printer1", subject)
    received = " ".join(str(h) for h in message.get_all("Received"))
    assert "(Authenticated sender: demo)" in received
    assert "[198.51.100.9]" in received


# --- the machinery itself -----------------------------------------------------------------


def test_a_private_dovecot_restarts_on_the_same_ports(test_ca: TestCA) -> None:
    with Dovecot(test_ca, users={"carol": "carol-pw"}) as server:
        ports = (server.imap_port, server.pop3_port)
        server.restart()
        assert (server.imap_port, server.pop3_port) == ports
        with imaplib.IMAP4(HOST, server.imap_port) as imap:
            assert imap.login("carol", "carol-pw")[0] == "OK"
    assert not server.running
    if not os.environ.get("APPPASS_KEEP_SERVERS"):
        assert not server.root.exists()


def test_a_server_that_cannot_bind_fails_with_its_log_tail(test_ca: TestCA) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, free_port()))  # bound, not listening: nothing answers there
        server = Dovecot(test_ca, root=short_tempdir("dcx-"))
        server.imap_port = squatter.getsockname()[1]
        try:
            with pytest.raises(ServerError, match="Address already in use"):
                server.start(timeout=10)
            assert not server.running
        finally:
            server.cleanup()


def test_issued_certificates_chain_to_the_test_ca(test_ca: TestCA) -> None:
    files = test_ca.issue(f"extra-{token()[:8]}", dns_names=["proxy.example.test"], ips=[HOST])
    server_context = test_ca.server_context(files)
    client_context = test_ca.client_context()
    a, b = socket.socketpair()
    with a, b, ThreadPoolExecutor(1) as pool:
        handshake = pool.submit(server_context.wrap_socket, a, server_side=True)
        client = client_context.wrap_socket(b, server_hostname="proxy.example.test")
        handshake.result(timeout=10)
        assert client.getpeercert()["subject"] == ((("commonName", "proxy.example.test"),),)
