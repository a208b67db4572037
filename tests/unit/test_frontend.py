"""Specification of the Frontend (proxy/frontend.py): a whole session driven in memory.

The client and the upstream are in-memory transports, the clock is Twisted's Clock, and the
Authenticator is scripted with real Grant and Denial values. Specs come from a parsed config, so
`auth.max_failures` is followed from the YAML to the connection being closed.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxy.audit import Audit
from proxy.auth.decision import Attempt, Decision, Denial, Grant, Refusal
from proxy.codes.store import Reservation
from proxy.config import parse
from proxy.directory.account import Account
from proxy.frontend import Frontend, SessionContext
from proxy.limits import ConnectionLimits, LimitSettings
from proxy.metrics import Metrics
from proxy.oplog import Health
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
            # The scripted upstreams speak in clear text.
            "upstream": {
                "imap": {
                    "host": "192.0.2.1",
                    "tls": "none",
                    "master_user": "proxy",
                    "master_password_file": __file__,
                },
                "pop3": {
                    "host": "192.0.2.1",
                    "tls": "none",
                    "master_user": "proxy",
                    "master_password_file": __file__,
                },
                "smtp": {"host": "192.0.2.1", "tls": "none", "login": "xclient"},
            },
        }
    )


class ScriptedAuthenticator:
    """Answers every attempt with the next scripted decision, and remembers the attempts and
    what became of each Grant's use (confirmed after the upstream login, or released)."""

    def __init__(self, *decisions: Decision, confirms: bool = True) -> None:
        self.decisions = list(decisions)
        self.attempts: list[Attempt] = []
        self.confirms = confirms
        self.confirmed: list[Grant] = []
        self.released: list[Grant] = []

    async def confirm(self, grant: Grant, attempt: Attempt) -> bool:
        if self.confirms:
            self.confirmed.append(grant)
        return self.confirms

    def release(self, grant: Grant) -> None:
        self.released.append(grant)

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
        limits: ConnectionLimits | None = None,
        client_ip: str = "198.51.100.7",
    ) -> None:
        s = settings(max_failures)
        self.limits = limits or ConnectionLimits(LimitSettings())
        self.metrics = Metrics()
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
            limits=self.limits,
            metrics=self.metrics,
            health=Health(),
            opened=self.live.add,
            closed=self.live.discard,
        )
        listener = next(item for item in s.listeners if item.protocol == protocol)
        self.frontend = Frontend(context, listener, protocol_specs(s)[MailProtocol(protocol)], None)
        self.client = StringTransport(peerAddress=IPv4Address("TCP", client_ip, 50123))
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


def grant(account: Account = ALICE) -> Grant:
    return Grant(account, 7, "laptop", account.upstream_identity, Reservation(7, 1))


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


def test_a_session_pipelining_10000_refused_commands_writes_a_few_audit_lines():
    upstream = ScriptedUpstream(*POSTFIX_XCLIENT)
    session = Session("smtp", ScriptedAuthenticator(grant()), upstream)
    session.send(b"EHLO printer.example.org\r\n")
    session.send(f"AUTH PLAIN {client_plain('', 'alice', CODE)}\r\n".encode())
    burst = b"XCLIENT LOGIN=bob\r\n" * 10
    for _ in range(1000):  # 10,000 lines in 1,000 reads over 50 s
        assert session.send(burst) == b"550 5.7.0 Error: XCLIENT not permitted\r\n" * 10
        session.clock.advance(0.05)
    session.frontend.connectionLost(Failure(ConnectionDone()))  # the client leaves
    assert upstream.conn is not None
    upstream.conn.connectionLost(Failure(ConnectionDone()))
    events = session.audited("refused")
    assert len(events) <= 1 + 50 / 10 + 1  # the first, one per 10 s, the rest at session end
    assert events[0] == {**events[0], "commands": ["XCLIENT"], "count": 10}
    assert sum(e["count"] for e in events) == 10000
    assert session.audited("session")  # the summary comes before the session's own event


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


def test_a_logged_in_session_drops_its_pre_auth_core_and_still_relays_drains_and_ends():
    """An idle session keeps only what the relay needs: the core (line buffer, limits,
    counters) is garbage once the session is spliced (docs/architecture.md "Memory of an idle
    session")."""
    upstream = ScriptedUpstream(*DOVECOT_LOGIN)
    session = Session("imap", ScriptedAuthenticator(grant()), upstream)
    core = weakref.ref(session.frontend.core)
    session.send(f"a LOGIN alice {CODE}\r\n".encode())
    gc.collect()
    assert core() is None
    upstream.transport.clear()
    session.send(b"b NOOP\r\n")
    assert upstream.sent == b"b NOOP\r\n"
    session.frontend.drain()  # a session goes on while the proxy drains
    assert session.later(3600) == b""  # the login timer is gone with the core
    assert not session.closed
    session.frontend.end("app password 7 revoked")
    assert session.closed


def test_a_use_is_counted_only_after_the_upstream_login_succeeded():
    authenticator = ScriptedAuthenticator(grant())
    Session("imap", authenticator, ScriptedUpstream(*DOVECOT_LOGIN)).send(
        f"a LOGIN alice {CODE}\r\n".encode()
    )
    assert authenticator.confirmed and not authenticator.released

    down = ScriptedAuthenticator(grant())
    session = Session("imap", down, ScriptedUpstream(down=True))
    session.send(f"a LOGIN alice {CODE}\r\n".encode())
    assert down.released and not down.confirmed


def test_a_use_that_cannot_be_counted_does_not_start_the_session():
    upstream = ScriptedUpstream(*DOVECOT_LOGIN)
    session = Session("imap", ScriptedAuthenticator(grant(), confirms=False), upstream)
    assert session.send(f"a LOGIN alice {CODE}\r\n".encode()) == b""
    assert session.later(FAILURE_DELAY) == (
        b"a NO [UNAVAILABLE] Temporary authentication failure, try again later.\r\n"
    )
    assert upstream.transport.disconnecting and session.frontend.grant is None


@pytest.mark.parametrize(
    "protocol,farewell",
    [
        ("imap", b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"),
        ("pop3", b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"),
        ("smtp", b"421 4.7.0 mx.example.org Error: too many connections\r\n"),
    ],
)
def test_past_the_connection_cap_a_client_is_told_and_closed(protocol, farewell):
    limits = ConnectionLimits(LimitSettings(max_connections=2))
    for _ in range(2):
        Session(protocol, ScriptedAuthenticator(grant()), ScriptedUpstream(), limits=limits)
    third = Session(protocol, ScriptedAuthenticator(grant()), ScriptedUpstream(), limits=limits)
    assert third.client.value() == farewell
    assert third.closed and third.frontend not in third.live
    (refused,) = third.audited("connection_refused")
    assert "limits.max_connections" in refused["reason"]
    third.frontend.connectionLost(Failure(ConnectionDone()))
    assert limits.connections == 2  # a refused connection was never counted


def test_connections_not_logged_in_are_capped_per_address_and_freed_by_login():
    limits = ConnectionLimits(LimitSettings(max_preauth_per_address=2))
    first = Session(
        "imap", ScriptedAuthenticator(grant()), ScriptedUpstream(*DOVECOT_LOGIN), limits=limits
    )
    Session("imap", ScriptedAuthenticator(grant()), ScriptedUpstream(), limits=limits)
    refused = Session("imap", ScriptedAuthenticator(grant()), ScriptedUpstream(), limits=limits)
    assert refused.closed
    other = Session(
        "imap",
        ScriptedAuthenticator(grant()),
        ScriptedUpstream(),
        limits=limits,
        client_ip="203.0.113.9",
    )
    assert not other.closed
    first.send(f"a LOGIN alice {CODE}\r\n".encode())  # logged in: no longer pre-auth
    again = Session("imap", ScriptedAuthenticator(grant()), ScriptedUpstream(), limits=limits)
    assert not again.closed


@pytest.mark.parametrize(
    "protocol,login,refusal",
    [
        (
            "imap",
            b"a LOGIN alice x\r\n",
            b"a NO [UNAVAILABLE] Too many sessions for this account, try again later.\r\n"
            b"* BYE Too many sessions for this account\r\n",
        ),
        (
            "pop3",
            b"USER alice\r\nPASS x\r\n",
            b"+OK\r\n-ERR [SYS/TEMP] Too many sessions for this account, try again later.\r\n",
        ),
        (
            "smtp",
            b"EHLO c\r\nAUTH PLAIN " + client_plain("", "alice", "x").encode() + b"\r\n",
            b"421 4.7.0 mx.example.org Too many sessions for this account\r\n",
        ),
    ],
)
def test_past_an_accounts_session_cap_its_login_is_refused_and_closed(protocol, login, refusal):
    limits = ConnectionLimits(LimitSettings(max_sessions_per_account=1))
    limits.logging_in(ALICE.key)  # one session of alice's is open elsewhere
    authenticator = ScriptedAuthenticator(grant())
    upstream = ScriptedUpstream()
    session = Session(protocol, authenticator, upstream, limits=limits)
    assert session.send(login).endswith(refusal)
    assert session.closed and upstream.conn is None  # never logged in upstream
    assert authenticator.released and not authenticator.confirmed
    limits.session_ended(ALICE.key)
    assert limits.sessions(ALICE.key) == 0


def sample(session: Session, name: str, **labels: str) -> float:
    return session.metrics.registry.get_sample_value(name, labels) or 0.0


def test_logins_and_sessions_are_counted_without_naming_anyone():
    upstream = ScriptedUpstream(*DOVECOT_LOGIN)
    session = Session("imap", ScriptedAuthenticator(grant()), upstream)
    session.send(f"a LOGIN alice {CODE}\r\n".encode())
    labels = {"protocol": "imap", "listener": "imap-1143", "outcome": "grant"}
    assert sample(session, "apppass_logins_total", **labels) == 1
    assert sample(session, "apppass_sessions", protocol="imap") == 1
    refused = Session("imap", ScriptedAuthenticator(Denial(Refusal.CREDENTIALS, "x")), upstream)
    refused.send(f"a LOGIN alice {CODE}\r\n".encode())
    assert sample(refused, "apppass_logins_total", **{**labels, "outcome": "credentials"}) == 1
    exposition = generate_latest(session.metrics.registry).decode()
    assert "alice" not in exposition and "198.51.100.7" not in exposition


def test_a_policed_smtp_session_waits_for_the_store_then_relays_and_counts_the_message():
    """A code with a daily cap: the first recipient waits (client reading paused) until the
    store answers; the answer goes out through the relay; the accepted message is counted, a
    refused sender is audited and counted on the code when the session ends."""
    from proxy.auth.decision import Sending
    from proxy.codes.sending import SendingPolicy, resolve
    from tests.support.messages import Messages

    rules = resolve(SendingPolicy(("own",), ("example.org",), 10), (), "alice@example.org")
    assert rules is not None
    messages = Messages()
    granted = Grant(
        ALICE, 7, "printer", ALICE.upstream_identity, Reservation(7), Sending(rules, messages)
    )
    upstream = ScriptedUpstream(*POSTFIX_XCLIENT)
    session = Session("smtp", ScriptedAuthenticator(granted), upstream)
    session.send(b"EHLO printer.example.org\r\n")
    session.send(f"AUTH PLAIN {client_plain('', 'alice', CODE)}\r\n".encode())
    upstream.transport.clear()
    assert session.send(b"MAIL FROM:<boss@example.org>\r\n").startswith(b"550 5.7.1 ")
    session.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert upstream.sent == b"MAIL FROM:<alice@example.org>\r\n"
    assert session.client.producerState == "paused"  # nothing more is read meanwhile
    messages.holds[0].callback(20417)
    assert upstream.sent.endswith(b"RCPT TO:<bob@example.org>\r\nDATA\r\n")
    assert session.client.producerState == "paused"  # now for the reply to DATA
    assert upstream.conn is not None
    upstream.conn.dataReceived(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n")
    assert session.client.producerState == "producing"
    session.send(b"Subject: scan\r\n\r\nscan\r\n.\r\n")
    upstream.conn.dataReceived(b"250 2.0.0 Ok: queued as 4XYZ\r\n")
    assert session.client.value().endswith(b"250 2.0.0 Ok: queued as 4XYZ\r\n")
    assert messages.sent_days == [20417]
    session.frontend.connectionLost(Failure(ConnectionDone()))
    upstream.conn.connectionLost(Failure(ConnectionDone()))
    assert messages.refusals == [1] and messages.released == []
    (refused,) = session.audited("refused")
    assert refused["commands"] == ["MAIL FROM (sender not allowed)"]
