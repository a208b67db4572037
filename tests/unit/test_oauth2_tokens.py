"""The token cache (proxy/oauth2/tokens.py) on a fake clock, with a scripted token endpoint:
one request for every user (client credentials) or per user (service account), renewal before
expiry without making a login wait, one request in flight, bounded retries with backoff, a
hold-off after failures, one log line per kind of failure, and a refused token dropped.

The real endpoint over HTTPS is in tests/integration/test_oauth2_proxy.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer
from twisted.internet.task import Clock

from proxy.oauth2.grant import TokenError
from proxy.oauth2.settings import Grant, OAuth2Settings
from proxy.oauth2.tokens import (
    FAILURE_HOLD_SECONDS,
    MAX_CACHED_TOKENS,
    RETRY_BACKOFF_SECONDS,
    TokenSource,
)

SECRET = "client-Secret-123"
APP = OAuth2Settings(
    name="m365",
    grant=Grant.CLIENT_CREDENTIALS,
    token_url="https://login.example/token",
    scope="https://outlook.office365.com/.default",
    client_id="app",
    client_secret=SECRET,
    retries=2,
)


@pytest.fixture(scope="module")
def service_account() -> OAuth2Settings:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return OAuth2Settings(
        name="google",
        grant=Grant.SERVICE_ACCOUNT,
        token_url="https://oauth2.example/token",
        scope="https://mail.google.com/",
        client_id="sa@project.iam.gserviceaccount.com",
        private_key=pem,
        key_id="k1",
    )


class Endpoint:
    """A scripted token endpoint: each request gets the next answer, now or when released."""

    def __init__(self, clock: Clock, lifetime: int = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.requests: list[dict[str, str]] = []
        self.answers: list[tuple[int, dict] | Exception] = []
        self.held: list[defer.Deferred] = []
        self.hold = False
        self.issued = 0

    def post(self, url: str, fields: dict[str, str]) -> defer.Deferred:
        self.requests.append(fields)
        if self.hold:
            d: defer.Deferred = defer.Deferred()
            self.held.append(d)
            return d
        return self._answer()

    def release(self) -> None:
        held, self.held = self.held, []
        for d in held:
            self._answer().chainDeferred(d)

    def _answer(self) -> defer.Deferred:
        if self.answers:
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                return defer.fail(answer)
            status, body = answer
            return defer.succeed((status, json.dumps(body).encode()))
        self.issued += 1
        body = {"access_token": f"t{self.issued}", "token_type": "Bearer"}
        body["expires_in"] = self.lifetime
        return defer.succeed((200, json.dumps(body).encode()))


def run(d) -> list:
    """The outcome of a coroutine or Deferred so far: [] while pending, [value or Failure]."""
    out: list = []
    defer.ensureDeferred(d).addBoth(out.append)
    return out


def value(d):
    (outcome,) = run(d)
    if isinstance(outcome, BaseException) or hasattr(outcome, "raiseException"):
        outcome.raiseException()
    return outcome


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@pytest.fixture
def oplog():
    handler = Lines()
    logging.getLogger("apppass").addHandler(handler)
    yield handler.lines
    logging.getLogger("apppass").removeHandler(handler)


def source(settings=APP, lifetime: int = 3600):
    clock = Clock()
    clock.advance(1_000_000)
    endpoint = Endpoint(clock, lifetime)
    return TokenSource(settings, clock, post=endpoint.post), endpoint, clock


def test_one_application_token_serves_every_user():
    tokens, endpoint, _ = source()
    assert value(tokens.token("alice")).value == "t1"
    assert value(tokens.token("bob")).value == "t1"
    assert len(endpoint.requests) == 1
    assert endpoint.requests[0] == {
        "grant_type": "client_credentials",
        "client_id": "app",
        "scope": "https://outlook.office365.com/.default",
        "client_secret": SECRET,
    }


def test_a_service_account_has_one_token_per_user(service_account):
    tokens, endpoint, _ = source(service_account)
    assert value(tokens.token("alice")).value == "t1"
    assert value(tokens.token("bob")).value == "t2"
    assert value(tokens.token("alice")).value == "t1"
    assert len(endpoint.requests) == 2


def test_concurrent_logins_share_one_request():
    tokens, endpoint, _ = source()
    endpoint.hold = True
    waiting = [run(tokens.token(user)) for user in ("alice", "bob", "carol")]
    assert all(w == [] for w in waiting) and len(endpoint.requests) == 1
    endpoint.release()
    assert [w[0].value for w in waiting] == ["t1", "t1", "t1"]


def test_a_token_is_renewed_in_the_background_before_it_expires():
    """A one-hour token: its last 5 minutes still serve while the next is fetched."""
    tokens, endpoint, clock = source()
    first = value(tokens.token("alice"))
    clock.advance(3600 - 300 - 1)
    assert value(tokens.token("alice")) is first and len(endpoint.requests) == 1
    clock.advance(2)  # inside the margin: served at once, renewed meanwhile
    endpoint.hold = True
    assert value(tokens.token("alice")) is first
    assert value(tokens.token("bob")) is first
    assert len(endpoint.requests) == 2  # one renewal, however many logins
    endpoint.release()
    assert value(tokens.token("alice")).value == "t2"


def test_a_short_token_is_renewed_a_tenth_of_its_life_early():
    tokens, endpoint, clock = source(lifetime=60)
    first = value(tokens.token("alice"))
    assert first.refresh_at - first.expires_at == pytest.approx(-6)
    clock.advance(53)
    assert value(tokens.token("alice")) is first and len(endpoint.requests) == 1
    clock.advance(2)
    value(tokens.token("alice"))
    assert len(endpoint.requests) == 2


def test_an_expired_token_makes_the_login_wait_for_a_new_one():
    tokens, endpoint, clock = source(lifetime=60)
    value(tokens.token("alice"))
    clock.advance(61)
    endpoint.hold = True
    waiting = run(tokens.token("alice"))
    assert waiting == []
    endpoint.release()
    assert waiting[0].value == "t2"


def test_a_refused_token_is_forgotten_and_the_next_login_fetches_another():
    tokens, _, _ = source()
    first = value(tokens.token("alice"))
    tokens.forget("alice", first)
    second = value(tokens.token("bob"))
    assert second.value == "t2"
    tokens.forget("alice", first)  # a late refusal of the old token keeps the new one
    assert value(tokens.token("alice")) is second


def test_transient_failures_are_retried_with_backoff(oplog):
    tokens, endpoint, clock = source()
    endpoint.answers = [(503, {"error": "temporarily_unavailable"}), (500, {})]
    waiting = run(tokens.token("alice"))
    assert len(endpoint.requests) == 1 and waiting == []
    clock.advance(RETRY_BACKOFF_SECONDS)
    assert len(endpoint.requests) == 2 and waiting == []
    clock.advance(RETRY_BACKOFF_SECONDS * 2)
    assert len(endpoint.requests) == 3
    assert waiting[0].value == "t1"
    assert oplog == []  # nothing failed in the end


def test_retries_are_bounded_and_then_the_login_fails(oplog):
    tokens, endpoint, clock = source()
    down = TokenError("cannot connect to login.example:443: ConnectionRefusedError", "down", True)
    endpoint.answers = [down, down, down, down]
    waiting = run(tokens.token("alice"))
    clock.advance(RETRY_BACKOFF_SECONDS)
    clock.advance(RETRY_BACKOFF_SECONDS * 2)
    assert len(endpoint.requests) == 3  # the first try and retries: 2
    assert waiting[0].check(TokenError)
    assert len(oplog) == 1 and "ConnectionRefusedError" in oplog[0]


def test_a_refused_client_is_not_retried_and_is_logged_once_with_the_endpoints_text(oplog):
    tokens, endpoint, clock = source()
    refusal = {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid secret."}
    endpoint.answers = [(401, refusal)] * 2
    outcome = run(tokens.token("alice"))
    assert outcome[0].check(TokenError)
    assert str(outcome[0].value) == (
        "the token endpoint refused: invalid_client: AADSTS7000215: Invalid secret."
    )
    assert len(endpoint.requests) == 1
    # Within the hold-off: refused at once, without asking the endpoint again.
    assert run(tokens.token("bob"))[0].check(TokenError)
    assert len(endpoint.requests) == 1
    clock.advance(FAILURE_HOLD_SECONDS)
    assert run(tokens.token("alice"))[0].check(TokenError)
    assert len(endpoint.requests) == 2
    assert oplog == [
        "ERROR oauth2.m365: no token from https://login.example/token: the token endpoint"
        " refused: invalid_client: AADSTS7000215: Invalid secret.; logins through it are"
        " refused as temporary failures until it issues one"
    ]
    clock.advance(FAILURE_HOLD_SECONDS)
    assert value(tokens.token("alice")).value == "t1"
    assert oplog[1] == (
        "WARNING oauth2.m365: https://login.example/token issues tokens again (it failed:"
        " invalid_client)"
    )
    assert SECRET not in "\n".join(oplog)


def test_a_failed_renewal_keeps_serving_the_token_until_it_expires(oplog):
    tokens, endpoint, clock = source(lifetime=100)
    first = value(tokens.token("alice"))
    clock.advance(95)
    endpoint.answers = [(400, {"error": "invalid_grant"})]
    assert value(tokens.token("alice")) is first
    assert value(tokens.token("alice")) is first  # held off: no second request
    assert len(endpoint.requests) == 2
    clock.advance(6)
    assert value(tokens.token("alice")).value == "t2"


def test_an_unexpected_exception_is_a_temporary_failure_too(oplog):
    tokens, endpoint, _ = source(dataclasses.replace(APP, retries=0))
    endpoint.answers = [RuntimeError(f"boom {SECRET}")]
    outcome = run(tokens.token("alice"))
    assert outcome[0].check(TokenError)
    assert str(outcome[0].value) == "the token request failed: RuntimeError"
    assert SECRET not in "\n".join(oplog)


def test_per_user_tokens_are_bounded(service_account, monkeypatch):
    monkeypatch.setattr("proxy.oauth2.tokens.MAX_CACHED_TOKENS", 3)
    tokens, endpoint, _ = source(service_account)
    for user in ("a", "b", "c", "d"):
        value(tokens.token(user))
    value(tokens.token("a"))  # the oldest went first
    assert len(endpoint.requests) == 5
    assert MAX_CACHED_TOKENS >= 1000


def test_the_source_and_its_tokens_keep_secrets_out_of_repr():
    tokens, _, _ = source()
    token = value(tokens.token("alice"))
    assert "t1" not in repr(token) and SECRET not in repr(tokens)
    assert SECRET not in repr(APP)
    assert APP.timeout == timedelta(seconds=10)
