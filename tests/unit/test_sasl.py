"""The shared SASL codecs and the exchange every protocol core drives."""

import base64
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.sasl import (
    LOGIN_PASSWORD_PROMPT,
    LOGIN_USERNAME_PROMPT,
    Credentials,
    SaslExchange,
    Step,
    client_plain,
    client_xoauth2,
    decode_b64,
    identity_problem,
    is_valid_login,
    server_mechanism,
)


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def exchange(name: str) -> SaslExchange:
    return SaslExchange(server_mechanism(name))


def test_plain_with_initial_response_is_done_at_once():
    result = exchange("PLAIN").start(b64(b"\0alice\0Code-1234").decode())
    assert result.step is Step.DONE and result.credentials == Credentials("alice", "Code-1234")


def test_plain_without_initial_response_sends_an_empty_challenge():
    x = exchange("plain")
    assert x.start(None).step is Step.CHALLENGE and x.start(None).challenge == ""
    assert x.respond(b64(b"alice\0alice\0pw")).credentials == Credentials("alice", "pw")


def test_plain_authzid_for_someone_else_is_refused():
    assert exchange("PLAIN").start(b64(b"bob\0alice\0pw").decode()).step is Step.AUTHZID_REFUSED


def test_login_prompts_for_username_then_password():
    x = exchange("LOGIN")
    first = x.start(None)
    assert (first.step, first.challenge) == (Step.CHALLENGE, LOGIN_USERNAME_PROMPT)
    second = x.respond(b64(b"alice"))
    assert (second.step, second.challenge) == (Step.CHALLENGE, LOGIN_PASSWORD_PROMPT)
    assert x.respond(b64(b"pw")).credentials == Credentials("alice", "pw")


def test_login_with_initial_username_as_microsoft_clients_send_it():
    x = exchange("LOGIN")
    assert x.start(b64(b"alice").decode()).challenge == LOGIN_PASSWORD_PROMPT


@pytest.mark.parametrize(
    "line,step",
    [
        (b"*", Step.CANCELLED),
        (b"not base64!", Step.BAD_BASE64),
        (b64(b"no separators"), Step.MALFORMED),
        (b64(b"\0alice\x00x\0pw"), Step.MALFORMED),
        (b64(b"\0al\rice\0pw"), Step.INVALID_LOGIN),
        (b64(b"\0\0pw"), Step.MALFORMED),
        (b64(b"\0" + b"a" * 256 + b"\0pw"), Step.MALFORMED),
    ],
)
def test_bad_responses_end_the_exchange_with_a_reason(line, step):
    x = exchange("PLAIN")
    x.start(None)
    assert x.respond(line).step is step


def test_equals_sign_is_the_empty_response():
    assert decode_b64("=") == b""


def test_unknown_mechanism_is_none():
    assert server_mechanism("CRAM-MD5") is None


def test_credentials_repr_hides_the_secret():
    assert "Code-1234" not in repr(Credentials("alice", "Code-1234"))


@pytest.mark.parametrize(
    "login,ok",
    [
        ("alice", True),
        ("alice@example.test", True),
        ("DOM\\alice", True),
        ("", False),
        ("al\x00ice", False),
        ("al\nice", False),
        ("a\x7f", False),
        ("a\x85b", False),
        ("a" * 256, False),
    ],
)
def test_login_names_with_controls_are_invalid(login, ok):
    assert is_valid_login(login) is ok


@pytest.mark.parametrize(
    "identity,problem",
    [
        ("alice", None),
        ("alice@example.org", None),
        ("[UNAVAILABLE]", None),  # odd but harmless: xtext-encoded, one word
        ("jörg@example.org", None),
        ("a" * 255, None),
        ("", "is empty"),
        ("[x\r\nMAIL FROM:<ceo@example.org>", "contains control characters"),
        ("al\x00ice", "contains control characters"),
        ("a\x85b", "contains control characters"),
        ("[x ADDR=10.0.0.1 LOGIN=bob@example.org", "contains a space"),
        ("a\u2028b", "contains a space"),  # Unicode's line separator
        ("a\ud800b", "is not valid UTF-8"),
        ("é" * 128, "is longer than 255 octets"),
    ],
)
def test_an_upstream_identity_is_one_word_a_sasl_authzid_can_carry(identity, problem):
    expected = (
        problem and f"upstream identity {problem}: unusable as a SASL authzid or XCLIENT LOGIN"
    )
    assert identity_problem(identity) == expected


@given(st.text())
def test_an_identity_without_a_problem_is_one_printable_utf8_word(identity):
    if identity_problem(identity) is None:
        assert identity and len(identity.encode("utf-8")) <= 255
        assert not any(c.isspace() or unicodedata.category(c) in ("Cc", "Cs") for c in identity)


_field = st.text(
    alphabet=st.characters(min_codepoint=32, blacklist_categories=("Cs", "Cc")),
    min_size=1,
    max_size=60,
)


@given(_field, _field)
def test_client_plain_round_trips_through_the_server(login, secret):
    result = exchange("PLAIN").start(client_plain(login, login, secret))
    assert result.step is Step.DONE and result.credentials == Credentials(login, secret)


@given(st.binary(max_size=300))
def test_arbitrary_responses_never_raise(raw):
    x = exchange("LOGIN")
    x.start(None)
    assert x.respond(raw).step in set(Step)


def test_xoauth2_initial_response_format():
    assert base64.b64decode(client_xoauth2("u@x", "tok")) == b"user=u@x\x01auth=Bearer tok\x01\x01"
