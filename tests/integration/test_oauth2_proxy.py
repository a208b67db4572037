"""Upstream logins with OAuth2 tokens (XOAUTH2, OAUTHBEARER) through apppass, against a Dovecot
and a Postfix that validate tokens by introspection at a real token service (playing Entra ID
and Google; tests/servers/tokenservice.py).

A device still logs in to apppass with its app password; apppass then logs in upstream with a
token for the account, fetched from the token endpoint (https, verified with the test CA),
cached, refreshed, and dropped when the upstream refuses it. Whatever goes wrong with tokens is
a temporary refusal for the device, never a hang, and its code's use is not counted.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import logging
import poplib
import smtplib
import time
import uuid
from pathlib import Path

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import threads

from tests.integration.harness import start_proxy

pytestmark = pytest.mark.integration

SECRET = "Entra-Client-Secret-7"


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs)


def listeners() -> list[dict]:
    plain = {"tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}
    return [
        {"name": "imap", "protocol": "imap", **plain},
        {"name": "pop3", "protocol": "pop3", **plain},
        {"name": "smtp", "protocol": "smtp", **plain},
    ]


def upstreams(dovecot, postfix, test_ca, login: str, oauth2) -> dict:
    common = {"host": "127.0.0.1", "tls": "starttls", "ca_file": str(test_ca.ca)}
    return {
        "imap": {**common, "port": dovecot.imap_port, "login": login, "oauth2": oauth2},
        "pop3": {**common, "port": dovecot.pop3_port, "login": login, "oauth2": oauth2},
        "smtp": {**common, "port": postfix.submission_port, "login": login, "oauth2": oauth2},
    }


def client_credentials(token_service, test_ca, folder: Path, client_id: str, **extra) -> dict:
    """Entra-like settings with a client secret, registered at the token service."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "client-secret").write_text(SECRET + "\n")
    token_service.add_client(client_id, secret=SECRET)
    return {
        "grant": "client_credentials",
        "token_url": token_service.token_url,
        "client_id": client_id,
        "client_secret_file": str(folder / "client-secret"),
        "scope": "https://outlook.office365.com/.default",
        "ca_file": str(test_ca.ca),
        "timeout": "2s",
        "retries": 1,
        **extra,
    }


async def oauth_proxy(folder, oauth_dovecot, oauth_postfix, test_ca, settings, login="xoauth2"):
    return await start_proxy(
        folder,
        listeners=listeners(),
        upstream=upstreams(oauth_dovecot, oauth_postfix, test_ca, login, "m365"),
        oauth2={"m365": settings},
    )


def imap_login(port: int, login: str, code: str) -> str:
    """Log in and select INBOX; the tagged reply's text, or the refusal's."""
    imap = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    try:
        imap.login(login, code)
        status, _ = imap.select("INBOX")
        return status
    except imaplib.IMAP4.error as exc:
        return f"NO {exc}"
    finally:
        with contextlib.suppress(Exception):
            imap.logout()


def pop3_login(port: int, login: str, code: str) -> str:
    pop = poplib.POP3("127.0.0.1", port, timeout=30)
    try:
        pop.user(login)
        pop.pass_(code)
        count, _ = pop.stat()
        pop.quit()
        return f"+OK {count}"
    except poplib.error_proto as exc:
        return exc.args[0].decode()


def smtp_send(port: int, login: str, code: str, to: str, token: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("printer.example.test")
        smtp.login(login, code)
        smtp.sendmail(
            f"{login}@example.test",
            [to],
            f"From: {login}@example.test\r\nTo: {to}\r\nSubject: {token}\r\n\r\nscan {token}\r\n",
        )


class OpLog(logging.Handler):
    """The operational log's lines (logger "apppass"), whatever else configured logging."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> OpLog:
        logging.getLogger("apppass").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("apppass").removeHandler(self)


async def until(what: str, attempt, deadline: float = 30.0):
    """Call attempt() (in a thread) until it returns something truthy; that value."""
    end = time.monotonic() + deadline
    while True:
        result = await in_thread(attempt)
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")


def uses(proxy, code_id: int) -> int:
    return proxy.store.get(code_id).use_count


@pytest_twisted.ensureDeferred
async def test_one_application_token_logs_in_imap_pop3_and_smtp(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """Client credentials with a secret: IMAP, POP3 and SMTP through apppass with `login:
    xoauth2`, one token for every user and protocol, mail delivered to the recipient."""
    settings = client_credentials(token_service, test_ca, tmp_path, "app-secret")
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    try:
        _, alice = proxy.issue("alice", scopes=("imap", "pop3", "smtp"))
        _, printer = proxy.issue("printer1", scopes=("imap",))
        assert await in_thread(imap_login, proxy.port("imap"), "alice", alice) == "OK"
        assert await in_thread(imap_login, proxy.port("imap"), "printer1", printer) == "OK"
        assert (await in_thread(pop3_login, proxy.port("pop3"), "alice", alice)).startswith("+OK")
        token = str(uuid.uuid4())
        await in_thread(smtp_send, proxy.port("smtp"), "alice", alice, "bob@example.test", token)
        message = await in_thread(oauth_postfix.wait_for_message, "bob", token)
        assert message["Subject"] == token
        requests = token_service.requests("app-secret")
        assert len(requests) == 1 and requests[0].error is None, requests
        # The upstreams saw the users, logged in by token; the secret was never written down.
        log = oauth_dovecot.log_text()
        assert "user=<alice>, method=XOAUTH2" in log and "user=<printer1>, method=XOAUTH2" in log
        assert SECRET not in proxy.audit_text()
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_certificate_credential_and_oauthbearer(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """Client credentials with a private-key JWT (Entra's certificate credential), upstream
    login OAUTHBEARER (RFC 7628) on IMAP and SMTP."""
    cert = test_ca.issue("entra-app", dns_names=("apppass",), ips=(), rsa_key=True)
    token_service.add_client("app-cert", certificate=cert.cert)
    settings = {
        "grant": "client_credentials",
        "token_url": token_service.token_url,
        "client_id": "app-cert",
        "private_key_file": str(cert.key),
        "certificate_file": str(cert.cert),
        "scope": "https://outlook.office365.com/.default",
        "ca_file": str(test_ca.ca),
    }
    proxy = await oauth_proxy(
        tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings, login="oauthbearer"
    )
    try:
        _, code = proxy.issue("alice", scopes=("imap", "smtp"))
        assert await in_thread(imap_login, proxy.port("imap"), "alice", code) == "OK"
        token = str(uuid.uuid4())
        await in_thread(smtp_send, proxy.port("smtp"), "alice", code, "alice@example.test", token)
        await in_thread(oauth_postfix.wait_for_message, "alice", token)
        requests = token_service.requests("app-cert")
        assert [r.error for r in requests] == [None], requests
        assert "user=<alice>, method=OAUTHBEARER" in oauth_dovecot.log_text()
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_service_account_gets_one_token_per_user(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """Google's domain-wide delegation: a signed JWT with sub = the user for each user's token;
    Dovecot checks each token names the user who logs in."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = f"apppass-{uuid.uuid4().hex[:8]}@project.iam.gserviceaccount.com"
    token_service.add_service_account(email, key.public_key())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    (tmp_path / "sa.json").write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": email,
                "private_key_id": "k1",
                "private_key": pem,
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    settings = {
        "grant": "service_account",
        "key_file": str(tmp_path / "sa.json"),
        "token_url": token_service.token_url,  # the key's token_uri, but ours
        "scope": "https://mail.google.com/",
        "ca_file": str(test_ca.ca),
    }
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    try:
        _, alice = proxy.issue("alice", scopes=("imap", "smtp"))
        _, printer = proxy.issue("printer1", scopes=("imap",))
        assert await in_thread(imap_login, proxy.port("imap"), "alice", alice) == "OK"
        assert await in_thread(imap_login, proxy.port("imap"), "printer1", printer) == "OK"
        assert await in_thread(imap_login, proxy.port("imap"), "alice", alice) == "OK"
        token = str(uuid.uuid4())
        await in_thread(smtp_send, proxy.port("smtp"), "alice", alice, "bob@example.test", token)
        await in_thread(oauth_postfix.wait_for_message, "bob", token)
        requests = token_service.requests(email)
        assert sorted(r.user for r in requests) == ["alice", "printer1"], requests
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_the_upstream_refuses_is_dropped_and_a_fresh_one_fetched(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """A token that expired early (introspection says inactive): that login is a temporary
    refusal (the code is fine, its use not counted), the token is dropped, and the next
    login fetches a fresh one, on every protocol."""
    settings = client_credentials(token_service, test_ca, tmp_path, "app-expiry")
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    try:
        code_id, code = proxy.issue("alice", scopes=("imap", "pop3"))
        assert await in_thread(imap_login, proxy.port("imap"), "alice", code) == "OK"
        assert uses(proxy, code_id) == 1
        token_service.expire_tokens()
        refused = await in_thread(imap_login, proxy.port("imap"), "alice", code)
        assert "[UNAVAILABLE]" in refused, refused
        assert uses(proxy, code_id) == 1
        assert await in_thread(imap_login, proxy.port("imap"), "alice", code) == "OK"
        assert len(token_service.requests("app-expiry")) == 2
        token_service.expire_tokens()
        assert "[SYS/TEMP]" in await in_thread(pop3_login, proxy.port("pop3"), "alice", code)
        assert (await in_thread(pop3_login, proxy.port("pop3"), "alice", code)).startswith("+OK")
        assert len(token_service.requests("app-expiry")) == 3
        assert uses(proxy, code_id) == 3
    finally:
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_token_is_renewed_before_it_expires(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """Short-lived tokens: logins keep working across expiries, each renewal one request."""
    settings = client_credentials(token_service, test_ca, tmp_path, "app-renew")
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    token_service.lifetime = 2
    try:
        _, code = proxy.issue("alice", scopes=("imap",))

        def renewed() -> bool:
            assert imap_login(proxy.port("imap"), "alice", code) == "OK"
            return len(token_service.requests("app-renew")) >= 3

        await until("two renewals of a 2 s token", renewed)
    finally:
        token_service.lifetime = 3600
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_the_token_endpoint_down_gives_temporary_refusals_then_recovers(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    settings = client_credentials(token_service, test_ca, tmp_path, "app-down")
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    token_service.down()
    try:
        with OpLog() as oplog:
            code_id, code = proxy.issue("alice", scopes=("imap", "smtp"))
            began = time.monotonic()
            refused = await in_thread(imap_login, proxy.port("imap"), "alice", code)
            assert "[UNAVAILABLE]" in refused, refused
            # One try and one retry (1 s apart) against a closed port: well under the timeouts.
            assert time.monotonic() - began < 10
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                await in_thread(smtp_send, proxy.port("smtp"), "alice", code, "x@example.test", "t")
            assert info.value.smtp_code == 454
            assert uses(proxy, code_id) == 0
            (reason,) = {
                e["reason"] for e in proxy.audit_events("upstream") if e.get("result") == "fail"
            }
            assert "no OAuth2 token for alice" in reason and "ConnectionRefusedError" in reason
            token_service.up()
            await until(
                "a login after the token endpoint is back",
                lambda: imap_login(proxy.port("imap"), "alice", code) == "OK",
            )
        refusals = [line for line in oplog.lines if "no token from" in line]
        assert len(refusals) == 1, oplog.lines
        assert "oauth2.m365" in refusals[0] and token_service.token_url in refusals[0]
        assert any("issues tokens again" in line for line in oplog.lines), oplog.lines
    finally:
        token_service.up()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_slow_token_endpoint_is_a_temporary_refusal_in_bounded_time(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    settings = client_credentials(token_service, test_ca, tmp_path, "app-slow", retries=0)
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    token_service.hold()
    try:
        _, code = proxy.issue("alice", scopes=("imap",))
        began = time.monotonic()
        refused = await in_thread(imap_login, proxy.port("imap"), "alice", code)
        assert "[UNAVAILABLE]" in refused, refused
        assert 1.5 < time.monotonic() - began < 8  # the 2 s timeout, not the 60 s login timeout
        (reason,) = {e["reason"] for e in proxy.audit_events("upstream")}
        assert "no answer from 127.0.0.1" in reason and "within 2s" in reason
    finally:
        token_service.release()
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_a_revoked_client_secret_is_logged_once_and_refused_as_temporary(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    settings = client_credentials(token_service, test_ca, tmp_path, "app-revoked")
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    token_service.revoke_secret("app-revoked")
    try:
        with OpLog() as oplog:
            code_id, code = proxy.issue("alice", scopes=("imap", "pop3"))
            for _ in range(3):
                refused = await in_thread(imap_login, proxy.port("imap"), "alice", code)
                assert "[UNAVAILABLE]" in refused, refused
            assert "[SYS/TEMP]" in await in_thread(pop3_login, proxy.port("pop3"), "alice", code)
            assert uses(proxy, code_id) == 0
            # Not retried (nothing changes until an administrator acts), at most one request
            # per hold-off interval whatever the login rate.
            assert len(token_service.requests("app-revoked")) == 1

            def asked_again() -> bool:
                refused = imap_login(proxy.port("imap"), "alice", code)
                assert "[UNAVAILABLE]" in refused, refused
                return len(token_service.requests("app-revoked")) == 2

            await until("a second request after the hold-off", asked_again)
            token_service.revoke_secret("app-revoked", revoked=False)
            await until(
                "a login after the secret is valid again",
                lambda: imap_login(proxy.port("imap"), "alice", code) == "OK",
            )
        refusals = [line for line in oplog.lines if "no token from" in line]
        assert len(refusals) == 1, oplog.lines
        assert "invalid_client: AADSTS7000215: Invalid client secret provided." in refusals[0]
        everything = "\n".join(oplog.lines) + proxy.audit_text()
        assert SECRET not in everything
    finally:
        token_service.revoke_secret("app-revoked", revoked=False)
        await proxy.stop()


@pytest_twisted.ensureDeferred
async def test_the_token_endpoint_certificate_is_verified(
    oauth_dovecot, oauth_postfix, test_ca, token_service, tmp_path
):
    """Without the test CA (the system store only), the endpoint's certificate is not
    trusted: no request is made, no token, a temporary refusal."""
    settings = client_credentials(token_service, test_ca, tmp_path, "app-tls")
    del settings["ca_file"]
    proxy = await oauth_proxy(tmp_path, oauth_dovecot, oauth_postfix, test_ca, settings)
    try:
        _, code = proxy.issue("alice", scopes=("imap",))
        refused = await in_thread(imap_login, proxy.port("imap"), "alice", code)
        assert "[UNAVAILABLE]" in refused, refused
        assert token_service.requests("app-tls") == []
        (reason,) = {e["reason"] for e in proxy.audit_events("upstream")}
        assert "TLS with 127.0.0.1" in reason, reason
    finally:
        await proxy.stop()
