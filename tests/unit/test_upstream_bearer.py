"""Upstream logins with a bearer token (proxy/upstreamauth.py and the IMAP, POP3 and SMTP
dialogues): the SASL encodings, the error challenge answered as each mechanism wants, a refused
token dropped, a missing token a temporary failure, and the token fetched while the upstream
greets.

Upstreams are in-memory connections fed with Dovecot's and Postfix's lines (as seen from the
real ones in tests/integration/test_oauth2_proxy.py); the token endpoint is scripted.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.config import Upstream
from proxy.imap.spec import ImapSpec
from proxy.oauth2.settings import Grant, OAuth2Settings
from proxy.oauth2.tokens import TokenSource
from proxy.pop3.spec import Pop3Spec
from proxy.protocols import MailProtocol, TlsMode, UpstreamLogin
from proxy.sasl import client_oauthbearer, client_xoauth2
from proxy.smtp.spec import SmtpSpec
from proxy.upstream import LoginRequest, UpstreamConnection, UpstreamError

APP = OAuth2Settings(
    name="m365",
    grant=Grant.CLIENT_CREDENTIALS,
    token_url="https://login.example/token",
    scope="https://outlook.office365.com/.default",
    client_id="app",
    client_secret="s3cret",
    retries=0,
)
# Dovecot's XOAUTH2/OAUTHBEARER error report, base64 of {"status":"401",...}.
ERROR_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"mail"}')
REQUEST = LoginRequest("alice", "198.51.100.7", 50123, "s1")


def test_xoauth2_and_oauthbearer_initial_responses():
    assert base64.b64decode(client_xoauth2("alice@x", "T")) == (
        b"user=alice@x\x01auth=Bearer T\x01\x01"
    )
    assert base64.b64decode(client_oauthbearer("alice@x", "T", "imap.example", 993)) == (
        b"n,a=alice@x,\x01host=imap.example\x01port=993\x01auth=Bearer T\x01\x01"
    )
    assert base64.b64decode(client_oauthbearer("a,b=c", "T")) == (
        b"n,a=a=2Cb=3Dc,\x01auth=Bearer T\x01\x01"  # RFC 5801 saslname escapes
    )


class Endpoint:
    def __init__(self) -> None:
        self.requests = 0
        self.fail = False
        self.held: defer.Deferred | None = None

    def post(self, url: str, fields: dict[str, str]) -> defer.Deferred:
        self.requests += 1
        if self.fail:
            return defer.succeed((401, b'{"error":"invalid_client"}'))
        body = json.dumps({"access_token": f"tok{self.requests}", "expires_in": 3600}).encode()
        if self.held is not None:
            return self.held.addCallback(lambda _: (200, body))
        return defer.succeed((200, body))


def login(spec, lines: bytes, **settings):
    """Run spec.login against an upstream that says `lines`: (outcome, what it was sent)."""
    transport = StringTransport()
    conn = UpstreamConnection(spec.upstream, Clock())
    conn.makeConnection(transport)
    conn.dataReceived(lines)
    out: list = []
    defer.ensureDeferred(spec.login(conn, REQUEST)).addBoth(out.append)
    return out[0], transport.value()


def upstream(protocol: MailProtocol, login: UpstreamLogin) -> Upstream:
    return Upstream(
        protocol,
        "mail.example",
        143,
        tls=TlsMode.NONE,
        login=login,
        oauth2=APP,
        send_client_address=False,
    )


def tokens() -> tuple[TokenSource, Endpoint]:
    endpoint = Endpoint()
    return TokenSource(APP, Clock(), post=endpoint.post), endpoint


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] ready\r\n"


@pytest.mark.parametrize("mechanism", [UpstreamLogin.XOAUTH2, UpstreamLogin.OAUTHBEARER])
def test_imap_logs_in_with_the_token_as_initial_response(mechanism):
    source, _ = tokens()
    spec = ImapSpec(upstream(MailProtocol.IMAP, mechanism), max_failures=3, tokens=source)
    result, sent = login(spec, IMAP_GREETING + b"L OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
    assert result.capabilities == "IMAP4rev1 IDLE"
    response = (
        client_xoauth2("alice", "tok1")
        if mechanism is UpstreamLogin.XOAUTH2
        else client_oauthbearer("alice", "tok1", "mail.example", 143)
    )
    assert sent == f"L AUTHENTICATE {mechanism.upper()} {response}\r\n".encode()


@pytest.mark.parametrize(
    ("mechanism", "answer"), [(UpstreamLogin.XOAUTH2, b""), (UpstreamLogin.OAUTHBEARER, b"AQ==")]
)
def test_imap_answers_the_error_challenge_and_drops_the_refused_token(mechanism, answer):
    source, endpoint = tokens()
    spec = ImapSpec(upstream(MailProtocol.IMAP, mechanism), max_failures=3, tokens=source)
    refusal = (
        b"+ " + ERROR_CHALLENGE + b"\r\nL NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )
    result, sent = login(spec, IMAP_GREETING + refusal)
    assert isinstance(result.value, UpstreamError)
    assert "upstream refused the login as alice: [AUTHENTICATIONFAILED]" in str(result.value)
    assert sent.endswith(b"\r\n" + answer + b"\r\n")  # after the AUTHENTICATE line
    result, _ = login(spec, IMAP_GREETING + b"L OK [CAPABILITY IMAP4rev1] Logged in\r\n")
    assert endpoint.requests == 2  # the refused token was not used again


def test_imap_without_sasl_ir_sends_the_token_as_the_continuation():
    source, _ = tokens()
    spec = ImapSpec(
        upstream(MailProtocol.IMAP, UpstreamLogin.XOAUTH2), max_failures=3, tokens=source
    )
    lines = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2] ready\r\n+ \r\nL OK [CAPABILITY X] hi\r\n"
    result, sent = login(spec, lines)
    assert result.capabilities == "X"
    assert sent == f"L AUTHENTICATE XOAUTH2\r\n{client_xoauth2('alice', 'tok1')}\r\n".encode()


def test_no_token_is_a_temporary_failure_and_nothing_is_sent():
    source, endpoint = tokens()
    endpoint.fail = True
    spec = ImapSpec(
        upstream(MailProtocol.IMAP, UpstreamLogin.XOAUTH2), max_failures=3, tokens=source
    )
    result, sent = login(spec, IMAP_GREETING)
    assert isinstance(result.value, UpstreamError)
    assert str(result.value) == (
        "no OAuth2 token for alice: the token endpoint refused: invalid_client"
    )
    assert sent == b""


def test_the_token_is_asked_for_while_the_upstream_greets():
    source, endpoint = tokens()
    endpoint.held = defer.Deferred()
    spec = SmtpSpec(
        upstream(MailProtocol.SMTP, UpstreamLogin.XOAUTH2),
        max_failures=3,
        hostname="apppass.example",
        tokens=source,
    )
    transport = StringTransport()
    conn = UpstreamConnection(spec.upstream, Clock())
    conn.makeConnection(transport)
    out: list = []
    defer.ensureDeferred(spec.login(conn, REQUEST)).addBoth(out.append)
    assert endpoint.requests == 1 and out == []  # asked before the greeting came
    conn.dataReceived(b"220 mx ESMTP\r\n250-mx\r\n250 AUTH PLAIN XOAUTH2\r\n")
    assert transport.value() == b"EHLO apppass\r\n"  # the dialogue went on meanwhile
    endpoint.held.callback(None)
    conn.dataReceived(b"235 2.7.0 Authentication successful\r\n")
    assert out[0].extensions == ("AUTH PLAIN XOAUTH2",)
    assert transport.value().endswith(
        f"AUTH XOAUTH2 {client_xoauth2('alice', 'tok1')}\r\n".encode()
    )


def test_pop3_answers_the_error_challenge_and_drops_the_refused_token():
    source, _ = tokens()
    spec = Pop3Spec(
        upstream(MailProtocol.POP3, UpstreamLogin.XOAUTH2),
        max_failures=3,
        hostname="apppass.example",
        tokens=source,
    )
    lines = b"+OK ready\r\n+ " + ERROR_CHALLENGE + b"\r\n-ERR [AUTH] Authentication failed.\r\n"
    result, sent = login(spec, lines)
    assert isinstance(result.value, UpstreamError)
    assert sent == f"AUTH XOAUTH2 {client_xoauth2('alice', 'tok1')}\r\n\r\n".encode()
    result, sent = login(spec, b"+OK ready\r\n+OK Logged in.\r\n")
    assert sent == f"AUTH XOAUTH2 {client_xoauth2('alice', 'tok2')}\r\n".encode()


def test_smtp_answers_the_error_challenge_and_drops_the_refused_token():
    source, endpoint = tokens()
    spec = SmtpSpec(
        upstream(MailProtocol.SMTP, UpstreamLogin.OAUTHBEARER),
        max_failures=3,
        hostname="apppass.example",
        tokens=source,
    )
    ehlo = b"220 mx ESMTP\r\n250-mx\r\n250 AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n"
    refused = b"334 " + ERROR_CHALLENGE + b"\r\n535 5.7.8 Error: authentication failed\r\n"
    result, sent = login(spec, ehlo + refused)
    assert isinstance(result.value, UpstreamError)
    assert "upstream refused the login as alice: 535 5.7.8" in str(result.value)
    assert sent.endswith(b"\r\nAQ==\r\n")
    login(spec, ehlo + b"235 2.7.0 Authentication successful\r\n")
    assert endpoint.requests == 2


def test_smtp_says_when_the_upstream_does_not_offer_the_mechanism():
    source, endpoint = tokens()
    spec = SmtpSpec(
        upstream(MailProtocol.SMTP, UpstreamLogin.XOAUTH2),
        max_failures=3,
        hostname="apppass.example",
        tokens=source,
    )
    result, _ = login(spec, b"220 mx ESMTP\r\n250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    assert str(result.value) == "upstream does not offer AUTH XOAUTH2"
    login(spec, b"220 mx\r\n250-mx\r\n250 AUTH XOAUTH2\r\n235 2.7.0 ok\r\n")
    assert endpoint.requests == 1  # a token not refused stays cached


def test_a_plain_login_cancels_a_challenge_it_cannot_answer():
    settings = replace(
        upstream(MailProtocol.IMAP, UpstreamLogin.AUTHZID),
        oauth2=None,
        master_user="proxy",
        master_password="pw",
    )
    spec = ImapSpec(settings, max_failures=3)
    lines = IMAP_GREETING + b"+ c29tZXRoaW5n\r\nL NO refused\r\n"
    result, sent = login(spec, lines)
    assert isinstance(result.value, UpstreamError)
    assert sent.endswith(b"\r\n*\r\n")


def test_an_upstream_that_keeps_challenging_is_given_up_on():
    source, _ = tokens()
    spec = ImapSpec(
        upstream(MailProtocol.IMAP, UpstreamLogin.XOAUTH2), max_failures=3, tokens=source
    )
    result, _ = login(spec, IMAP_GREETING + b"+ \r\n" * 5)
    assert str(result.value) == "upstream kept challenging the login"
