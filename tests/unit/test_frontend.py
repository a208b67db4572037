"""Specification of the Frontend (proxy/frontend.py): a whole session driven in memory.

The client and the upstream are in-memory transports, the clock is Twisted's Clock, and the
Authenticator is scripted with real Grant and Denial values. Specs come from a parsed config, so
`auth.max_failures` is followed from the YAML to the connection being closed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxy.audit import Audit
from proxy.auth.decision import Attempt, Decision, Denial, Grant, Refusal
from proxy.config import parse
from proxy.directory.account import Account
from proxy.frontend import Frontend, SessionContext
from proxy.protocols import MailProtocol
from proxy.sasl import client_plain
from proxy.service import protocol_specs
from proxy.upstream import UpstreamConnection, UpstreamError

FAILURE_DELAY = 2.0
ALICE = Account(key="uid-alice", login="alice", upstream_identity="alice@example.org")
CODE = "Abcd-Efgh-Jkmn-Pqrs"


def settings(max_failures: int | None = None):
    auth: dict[str, Any] = {"failure_delay": f"{int(FAILURE_DELAY)}s"}
    if max_failures is not None:
        auth["max_failures"] = max_failures
    return parse(
        {
            "hostname": "mx.example.org",
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "auth": auth,
            "listeners": [
                {
                    "protocol": p,
                    "bind": f"127.0.0.1:{port}",
                    "tls": "none",
                    "plaintext_auth_from": ["0.0.0.0/0"],
                }
                for p, port in (("imap", 1143), ("pop3", 1110), ("smtp", 1587))
            ],
            "upstream": {
                "imap": {
                    "host": "192.0.2.1",
                    "master_user": "proxy",
                    "master_password_file": __file__,
                },
                "pop3": {
                    "host": "192.0.2.1",
                    "master_user": "proxy",
                    "master_password_file": __file__,
                },
                "smtp": {"host": "192.0.2.1", "login": "xclient"},
            },
        }
    )


class ScriptedAuthenticator:
    """Answers every attempt with the next scripted decision, and remembers the attempts."""

    def __init__(self, *decisions: Decision) -> None:
        self.decisions = list(decisions)
        self.attempts: list[Attempt] = []

    def authenticate(self, attempt: Attempt) -> defer.Deferred[Decision]:
        self.attempts.append(attempt)
        decision = self.decisions.pop(0) if len(self.decisions) > 1 else self.decisions[0]
        return defer.succeed(decision)


class ScriptedUpstream:
    """The upstream side: what it will say, fed before the login reads it; what it was sent."""

    def __init__(self, *lines: bytes, down: bool = False) -> None:
        self.lines = lines
        self.down = down
        self.conn: UpstreamConnection | None = None
        self.transport = StringTransport()

    async def connect(self, upstream_settings) -> UpstreamConnection:
        if self.down:
            raise UpstreamError("cannot connect to 192.0.2.1:143: ConnectionRefusedError")
        self.conn = UpstreamConnection(upstream_settings, Clock())
        self.conn.makeConnection(self.transport)
        self.conn.dataReceived(b"".join(line + b"\r\n" for line in self.lines))
        return self.conn

    @property
    def sent(self) -> bytes:
        return self.transport.value()


class Session:
    """One client connection to a Frontend, in memory."""

    def __init__(
        self,
        protocol: str,
        authenticator: ScriptedAuthenticator,
        upstream: ScriptedUpstream,
        max_failures: int | None = None,
    ) -> None:
        s = settings(max_failures)
        self.clock = Clock()
        self.events: list[dict] = []
        self.audit = Audit(stream=_Discard())
        self.audit.listeners.append(self.events.append)
        self.live: set[Frontend] = set()
        context = SessionContext(
            authenticator=authenticator,
            audit=self.audit,
            reactor=self.clock,
            login_timeout=s.auth.login_timeout.total_seconds(),
            failure_delay=FAILURE_DELAY,
            connect=upstream.connect,
            opened=self.live.add,
            closed=self.live.discard,
        )
        listener = next(item for item in s.listeners if item.protocol == protocol)
        self.frontend = Frontend(context, listener, protocol_specs(s)[MailProtocol(protocol)], None)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 50123))
        self.frontend.makeConnection(self.client)

    def send(self, data: bytes) -> bytes:
        """Client bytes in; what the client got since the last call out."""
        self.client.clear()
        self.frontend.dataReceived(data)
        return self.client.value()

    def later(self, seconds: float) -> bytes:
        self.client.clear()
        self.clock.advance(seconds)
        return self.client.value()

    @property
    def closed(self) -> bool:
        return self.client.disconnecting or self.client.disconnected

    def audited(self, event: str) -> list[dict]:
        return [e for e in self.events if e["event"] == event]


class _Discard:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def grant() -> Grant:
    return Grant(ALICE, 7, "laptop", ALICE.upstream_identity)


DOVECOT_LOGIN = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.",
    b"I OK ID completed.",
    b"L OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in",
)


def test_imap_login_granted_logs_in_upstream_as_the_user_and_relays_both_ways():
    upstream = ScriptedUpstream(*DOVECOT_LOGIN)
    authenticator = ScriptedAuthenticator(grant())
    session = Session("imap", authenticator, upstream)
    assert (
        session.send(f"a LOGIN alice {CODE}\r\n".encode())
        == b"a OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
    )
    attempt = authenticator.attempts[0]
    assert (attempt.login, attempt.secret, attempt.mechanism, attempt.client_ip) == (
        "alice",
        CODE,
        "LOGIN",
        "198.51.100.7",
    )
    master = client_plain("alice@example.org", "proxy", Path(__file__).read_text().strip())
    assert f"L AUTHENTICATE PLAIN {master}\r\n".encode() in upstream.sent
    assert b'"x-originating-ip" "198.51.100.7"' in upstream.sent
    assert CODE.encode() not in upstream.sent
    upstream.transport.clear()
    session.send(b"b SELECT INBOX\r\n")
    assert upstream.sent == b"b SELECT INBOX\r\n"
    session.client.clear()
    assert upstream.conn is not None
    upstream.conn.dataReceived(b"* 3 EXISTS\r\n")
    assert session.client.value() == b"* 3 EXISTS\r\n"
    assert session.frontend in session.live


def test_imap_login_refused_is_answered_after_the_failure_delay():
    upstream = ScriptedUpstream()
    session = Session("imap", ScriptedAuthenticator(Denial(Refusal.CREDENTIALS, "wrong")), upstream)
    assert session.send(f"a LOGIN alice {CODE}\r\n".encode()) == b""
    assert session.later(FAILURE_DELAY - 0.1) == b""
    assert session.later(0.1) == b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    assert upstream.conn is None  # never connected for a refused login
    assert session.send(b"b NOOP\r\n") == b"b OK NOOP completed\r\n"


@pytest.mark.parametrize(
    "upstream",
    [
        ScriptedUpstream(down=True),
        ScriptedUpstream(
            b"* OK ready", b"I OK", b"L NO [AUTHENTICATIONFAILED] master login refused"
        ),
    ],
    ids=["upstream down", "upstream refuses the master login"],
)
def test_imap_upstream_trouble_is_a_temporary_failure(upstream):
    session = Session("imap", ScriptedAuthenticator(grant()), upstream)
    session.send(f"a LOGIN alice {CODE}\r\n".encode())
    assert (
        session.later(FAILURE_DELAY)
        == b"a NO [UNAVAILABLE] Temporary authentication failure, try again later.\r\n"
    )
    assert not session.closed
    (event,) = session.audited("upstream")
    assert event["result"] == "fail" and event["login"] == "alice"
    assert session.frontend.grant is None


def test_pop3_login_granted_and_refused():
    upstream = ScriptedUpstream(
        b"+OK Dovecot ready.", b"+OK", b"SASL PLAIN", b".", b"+OK Logged in."
    )
    session = Session("pop3", ScriptedAuthenticator(grant()), upstream)
    session.send(b"USER alice\r\n")
    assert session.send(f"PASS {CODE}\r\n".encode()) == b"+OK Logged in.\r\n"
    assert b"AUTH PLAIN " in upstream.sent

    refused = Session(
        "pop3", ScriptedAuthenticator(Denial(Refusal.TEMPORARY, "LDAP down")), ScriptedUpstream()
    )
    refused.send(b"USER alice\r\n")
    refused.send(f"PASS {CODE}\r\n".encode())
    assert (
        refused.later(FAILURE_DELAY)
        == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later.\r\n"
    )


POSTFIX_XCLIENT = (
    b"220 mx ESMTP Postfix",
    b"250-mx",
    b"250-PIPELINING",
    b"250-XCLIENT NAME ADDR PROTO HELO LOGIN",
    b"250 CHUNKING",
    b"220 mx ESMTP Postfix",
    b"250-mx",
    b"250-PIPELINING",
    b"250 CHUNKING",
)


def test_smtp_login_repeats_the_clients_ehlo_upstream_and_watches_the_session():
    upstream = ScriptedUpstream(*POSTFIX_XCLIENT)
    session = Session("smtp", ScriptedAuthenticator(grant()), upstream)
    session.send(b"EHLO printer.example.org\r\n")
    plain = client_plain("", "alice", CODE)
    assert (
        session.send(f"AUTH PLAIN {plain}\r\n".encode())
        == b"235 2.7.0 Authentication successful\r\n"
    )
    assert b"EHLO printer.example.org\r\n" in upstream.sent
    assert b"XCLIENT LOGIN=alice@example.org ADDR=198.51.100.7" in upstream.sent
    assert b"HELO=printer.example.org PROTO=ESMTP" in upstream.sent
    upstream.transport.clear()
    assert session.send(b"XCLIENT LOGIN=bob\r\n") == b"550 5.7.0 Error: XCLIENT not permitted\r\n"
    assert upstream.sent == b""
    (refused,) = session.audited("refused")
    assert refused["commands"] == ["XCLIENT"]


@pytest.mark.parametrize(
    "protocol,login,refusal_reply,farewell",
    [
        (
            "imap",
            b"a LOGIN alice wrong\r\n",
            b"a NO [AUTHENTICATIONFAILED] Authentication failed.",
            b"* BYE Too many invalid authentication attempts",
        ),
        ("pop3", b"USER alice\r\nPASS wrong\r\n", b"-ERR [AUTH] Authentication failed.", None),
        (
            "smtp",
            b"AUTH PLAIN " + client_plain("", "alice", "wrong").encode() + b"\r\n",
            b"535 5.7.8 Authentication credentials invalid",
            b"421 4.7.0 mx.example.org Error: too many failed authentications",
        ),
    ],
)
def test_auth_max_failures_from_the_config_closes_after_exactly_that_many(
    protocol, login, refusal_reply, farewell
):
    session = Session(
        protocol,
        ScriptedAuthenticator(Denial(Refusal.CREDENTIALS, "wrong")),
        ScriptedUpstream(),
        max_failures=5,
    )
    if protocol == "smtp":
        session.send(b"EHLO client\r\n")
    for attempt in range(1, 6):
        session.send(login)
        answer = session.later(FAILURE_DELAY)
        assert answer.startswith(refusal_reply + b"\r\n")
        if attempt < 5:
            assert not session.closed, f"closed after {attempt} failures"
    assert session.closed
    if farewell is not None:
        assert answer.endswith(farewell + b"\r\n")
    (disconnect,) = session.audited("disconnect")
    assert disconnect["reason"] == "too many failed logins"


def test_protocol_errors_and_closes_are_audited_with_their_reasons():
    session = Session("imap", ScriptedAuthenticator(grant()), ScriptedUpstream())
    session.send(b"a FETCH 1 BODY[]\r\nb LOGOUT\r\n")
    assert [e["reason"] for e in session.audited("client_error")] == ["command FETCH before login"]
    assert [e["reason"] for e in session.audited("disconnect")] == ["logout"]
    assert session.closed
    session.frontend.connectionLost(Failure(ConnectionDone()))
    assert session.frontend not in session.live


def test_login_timeout_says_bye_and_closes():
    session = Session("imap", ScriptedAuthenticator(grant()), ScriptedUpstream())
    timeout = settings().auth.login_timeout.total_seconds()
    assert session.later(timeout - 1) == b""
    assert session.later(1) == b"* BYE Login timed out\r\n"
    assert session.closed


def test_a_granted_session_ends_when_told_to():
    upstream = ScriptedUpstream(*DOVECOT_LOGIN)
    session = Session("imap", ScriptedAuthenticator(grant()), upstream)
    session.send(f"a LOGIN alice {CODE}\r\n".encode())
    session.frontend.end("app password 7 revoked")
    assert session.client.disconnected or session.client.disconnecting
    assert upstream.transport.disconnected or upstream.transport.disconnecting
