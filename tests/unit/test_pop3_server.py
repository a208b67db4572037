"""Specification of the POP3 pre-auth core (Pop3Core)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.decision import Refusal
from proxy.commands import Authenticate, Close, Failed, Send, StartTLS
from proxy.core import LineLimits
from proxy.pop3.server import MAX_AUTH_LINE, MAX_LINE, Pop3Core, pop3_limits
from proxy.sasl import MAX_FIELD, is_valid_login
from tests.support.streams import split_at

PLAINTEXT_DISALLOWED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
AUTH_FAILED = b"-ERR [AUTH] Authentication failed."


def b64(raw: bytes) -> bytes:
    return base64.b64encode(raw)


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return b64(f"{authzid}\0{authcid}\0{password}".encode())


def make(
    *,
    tls: bool = True,
    starttls: bool = False,
    plaintext: bool = False,
    limits: LineLimits | None = None,
) -> Pop3Core:
    return Pop3Core(
        tls_active=tls,
        starttls_available=starttls,
        plaintext_auth=plaintext,
        limits=limits,
        hostname="pop.example.org",
    )


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def replies(events) -> list[bytes]:
    return sent(events).splitlines()


def auths(events) -> list[Authenticate]:
    return [e for e in events if isinstance(e, Authenticate)]


def closes(events) -> list[Close]:
    return [e for e in events if isinstance(e, Close)]


# --- greeting and CAPA -------------------------------------------------------------------------


def test_greeting_is_ok_and_names_the_host():
    assert make().greeting() == [Send(b"+OK pop.example.org ready.\r\n")]


def test_capa_before_tls_offers_stls_and_no_plaintext_login_where_disallowed():
    events = make(tls=False, starttls=True).receive_data(b"CAPA\r\n")
    assert sent(events) == (
        b"+OK Capability list follows\r\nSTLS\r\nRESP-CODES\r\n"
        b"AUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION apppass\r\n.\r\n"
    )


def test_capa_under_tls_offers_user_and_sasl_but_not_stls():
    lines = replies(make(tls=True, starttls=True).receive_data(b"capa\r\n"))
    assert lines[:3] == [b"+OK Capability list follows", b"USER", b"SASL PLAIN LOGIN"]
    assert b"STLS" not in lines and lines[-1] == b"."


def test_capa_offers_user_and_sasl_without_tls_where_plaintext_is_allowed():
    lines = replies(make(tls=False, plaintext=True).receive_data(b"CAPA\r\n"))
    assert b"USER" in lines and b"SASL PLAIN LOGIN" in lines


def test_hostname_must_be_printable():
    with pytest.raises(ValueError):
        Pop3Core(
            tls_active=True, starttls_available=False, plaintext_auth=False, hostname="pop\r\n+OK"
        )


# --- USER / PASS -------------------------------------------------------------------------------


def test_user_then_pass_asks_the_authenticator():
    core = make()
    assert sent(core.receive_data(b"USER alice@example.org\r\n")) == b"+OK\r\n"
    (auth,) = auths(core.receive_data(b"PASS abcd efgh ijkl mnop\r\n"))
    assert (auth.credentials.login, auth.credentials.secret, auth.mechanism) == (
        "alice@example.org",
        "abcd efgh ijkl mnop",
        "USER",
    )


def test_pass_keeps_every_space_of_the_password():
    core = make()
    core.receive_data(b"USER alice\r\n")
    (auth,) = auths(core.receive_data(b"PASS  two  spaces \r\n"))
    assert auth.credentials.secret == " two  spaces "


def test_pass_without_user_is_refused():
    events = make().receive_data(b"PASS secret\r\n")
    assert replies(events) == [b"-ERR No username given."] and not auths(events)


def test_user_without_a_name_is_a_syntax_error():
    assert replies(make().receive_data(b"USER\r\nUSER \r\n")) == [b"-ERR Syntax: USER name"] * 2


def test_user_without_tls_is_refused_where_plaintext_is_disallowed():
    core = make(tls=False, starttls=True)
    events = core.receive_data(b"USER alice\r\nPASS pw\r\n")
    assert replies(events) == [PLAINTEXT_DISALLOWED, b"-ERR No username given."]
    assert not auths(events)


@pytest.mark.parametrize("name", [b"ali\x01ce", b"alice\x7f", "ali\u0085ce".encode(), b"\xff"])
def test_a_login_name_with_control_characters_or_bad_utf8_is_refused_without_asking(name):
    core = make(limits=pop3_limits(max_errors=10))
    core.receive_data(b"USER " + name + b"\r\n")
    events = core.receive_data(b"PASS pw\r\n")
    assert not auths(events)
    assert replies(events)[-1] in (AUTH_FAILED, b"-ERR No username given.")
    assert core.failures + core.errors >= 1


def test_nul_in_a_command_line_is_refused():
    assert replies(make().receive_data(b"USER ali\x00ce\r\n")) == [
        b"-ERR Invalid characters in command."
    ]


def test_a_password_longer_than_a_sasl_field_is_refused_without_asking():
    core = make()
    core.receive_data(b"USER alice\r\n")
    events = core.receive_data(b"PASS " + b"x" * (MAX_FIELD + 1) + b"\r\n")
    assert replies(events) == [AUTH_FAILED] and not auths(events)


@pytest.mark.parametrize("between", [b"b\r\n", b"CAPA\r\n", b"STAT\r\n", b"AUTH\r\n"])
def test_any_command_between_user_and_pass_forgets_the_name(between):
    core = make()
    core.receive_data(b"USER a\n" + between)
    events = core.receive_data(b"PASS pw\r\n")
    assert replies(events) == [b"-ERR No username given."] and not auths(events)


def test_a_second_user_replaces_the_first():
    core = make()
    core.receive_data(b"USER alice\r\nUSER bob\r\n")
    assert auths(core.receive_data(b"PASS pw\r\n"))[0].credentials.login == "bob"


# --- AUTH --------------------------------------------------------------------------------------


def test_auth_without_arguments_lists_the_mechanisms():
    assert sent(make().receive_data(b"AUTH\r\n")) == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_auth_without_arguments_lists_none_where_plaintext_is_disallowed():
    assert sent(make(tls=False).receive_data(b"AUTH\r\n")) == b"+OK\r\n.\r\n"


def test_auth_plain_with_initial_response_asks_the_authenticator():
    events = make().receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n")
    (auth,) = auths(events)
    assert (auth.credentials.login, auth.credentials.secret, auth.mechanism) == (
        "alice",
        "pw",
        "PLAIN",
    )
    assert sent(events) == b""


def test_auth_plain_without_initial_response_gets_an_empty_challenge():
    core = make()
    assert sent(core.receive_data(b"AUTH PLAIN\r\n")) == b"+ \r\n"
    assert auths(core.receive_data(plain("", "alice", "pw") + b"\r\n"))


def test_auth_login_prompts_for_username_then_password():
    core = make()
    assert sent(core.receive_data(b"AUTH LOGIN\r\n")) == b"+ VXNlcm5hbWU6\r\n"
    assert sent(core.receive_data(b64(b"alice") + b"\r\n")) == b"+ UGFzc3dvcmQ6\r\n"
    (auth,) = auths(core.receive_data(b64(b"pw") + b"\r\n"))
    assert (auth.credentials.login, auth.mechanism) == ("alice", "LOGIN")


def test_auth_login_with_initial_username_prompts_for_password():
    core = make()
    assert sent(core.receive_data(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")) == (
        b"+ UGFzc3dvcmQ6\r\n"
    )
    assert auths(core.receive_data(b64(b"pw") + b"\r\n"))[0].credentials.login == "alice"


def test_an_equals_sign_is_an_empty_initial_response():
    events = make().receive_data(b"AUTH PLAIN =\r\n")
    assert replies(events) == [AUTH_FAILED] and not auths(events)


def test_star_cancels_the_exchange():
    core = make()
    core.receive_data(b"AUTH LOGIN\r\n")
    assert replies(core.receive_data(b"*\r\n")) == [b"-ERR Authentication cancelled."]
    assert core.state == "command"


def test_bad_base64_is_refused_without_asking():
    events = make().receive_data(b"AUTH PLAIN %%%\r\n")
    assert replies(events) == [b"-ERR Invalid base64 data."]
    assert not auths(events) and any(isinstance(e, Failed) for e in events)


def test_unknown_mechanism_is_refused():
    assert replies(make().receive_data(b"AUTH GSSAPI\r\n")) == [
        b"-ERR Unsupported authentication mechanism."
    ]


def test_auth_with_too_many_arguments_is_a_syntax_error():
    assert replies(make().receive_data(b"AUTH PLAIN a b\r\n"))[0].startswith(b"-ERR Syntax")


def test_sasl_without_tls_is_refused_where_plaintext_is_disallowed():
    events = make(tls=False).receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n")
    assert replies(events) == [PLAINTEXT_DISALLOWED] and not auths(events)


def test_plain_authzid_other_than_authcid_is_refused():
    events = make().receive_data(b"AUTH PLAIN " + plain("admin", "alice", "pw") + b"\r\n")
    assert replies(events) == [AUTH_FAILED] and not auths(events)
    assert Failed("PLAIN authzid differs from authcid") in events


# --- decisions ---------------------------------------------------------------------------------


def authenticating(**kwargs) -> Pop3Core:
    core = make(**kwargs)
    core.receive_data(b"USER alice\r\n")
    assert auths(core.receive_data(b"PASS pw\r\n"))
    return core


@pytest.mark.parametrize(
    "refusal,reply",
    [
        (Refusal.CREDENTIALS, b"-ERR [AUTH] Authentication failed."),
        (Refusal.EXPIRED, b"-ERR [AUTH] Authentication failed."),
        (Refusal.FORBIDDEN, b"-ERR [AUTH] Authentication failed."),
        (Refusal.PRIVACY, PLAINTEXT_DISALLOWED),
        (Refusal.TEMPORARY, b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."),
        (Refusal.LIMIT, b"-ERR [SYS/TEMP] Too many login attempts, try again later."),
    ],
)
def test_refusals_get_the_rfc_2449_and_3206_response_codes(refusal, reply):
    core = authenticating()
    events = core.auth_failed(refusal)
    assert replies(events) == [reply]
    assert core.state == "command"


def test_third_failure_closes_the_connection_after_its_reply():
    core = authenticating()
    for _ in range(2):
        core.auth_failed(Refusal.CREDENTIALS)
        core.receive_data(b"USER alice\r\nPASS again\r\n")
    events = core.auth_failed(Refusal.CREDENTIALS)
    assert replies(events) == [AUTH_FAILED]
    assert isinstance(events[-1], Close) and core.closed
    assert core.receive_data(b"CAPA\r\n") == []


def test_auth_succeeded_says_logged_in_and_hands_over_pipelined_bytes():
    core = make()
    events = core.receive_data(b"USER alice\r\nPASS pw\r\nSTAT\r\nLIST\r\n")
    assert auths(events) and sent(events) == b"+OK\r\n"
    assert core.auth_succeeded() == [Send(b"+OK Logged in.\r\n")]
    assert core.take_pending() == b"STAT\r\nLIST\r\n"


def test_input_during_authentication_is_parsed_after_a_refusal():
    core = make()
    core.receive_data(b"USER alice\r\nPASS pw\r\nQUIT\r\n")
    events = core.auth_failed(Refusal.CREDENTIALS)
    assert replies(events) == [AUTH_FAILED, b"+OK Logging out."]
    assert isinstance(events[-1], Close)


def test_pipelined_input_beyond_max_pending_closes():
    core = authenticating(limits=pop3_limits(max_pending=50))
    assert core.receive_data(b"x" * 50) == []
    events = core.receive_data(b"x")
    assert replies(events)[0].startswith(b"-ERR") and isinstance(events[-1], Close)


def test_auth_results_without_an_outstanding_authenticate_are_bugs():
    core = make()
    with pytest.raises(RuntimeError):
        core.auth_failed(Refusal.CREDENTIALS)
    with pytest.raises(RuntimeError):
        core.auth_succeeded()
    with pytest.raises(RuntimeError):
        core.take_pending()


# --- STLS --------------------------------------------------------------------------------------


def test_stls_begins_tls_and_discards_pipelined_commands():
    core = make(tls=False, starttls=True)
    events = core.receive_data(b"STLS\r\nUSER mallory\r\nPASS pw\r\n")
    assert events == [Send(b"+OK Begin TLS negotiation\r\n"), StartTLS()]
    assert core.buffered == 0


def test_plaintext_arriving_before_tls_started_is_discarded():
    core = make(tls=False, starttls=True)
    core.receive_data(b"STLS\r\n")
    assert core.receive_data(b"USER mallory\r\n") == []
    assert core.buffered == 0  # dropped, not held
    core.tls_started()
    assert core.buffered == 0
    assert replies(core.receive_data(b"PASS pw\r\n")) == [b"-ERR No username given."]


def test_after_tls_user_and_sasl_are_offered():
    core = make(tls=False, starttls=True)
    core.receive_data(b"STLS\r\n")
    core.tls_started()
    lines = replies(core.receive_data(b"CAPA\r\n"))
    assert b"USER" in lines and b"STLS" not in lines
    core.receive_data(b"USER alice\r\n")
    assert auths(core.receive_data(b"PASS pw\r\n"))


@pytest.mark.parametrize(
    "tls,available,reply",
    [
        (True, True, b"-ERR Command not permitted when TLS active"),
        (False, False, b"-ERR STLS not available."),
    ],
)
def test_stls_is_refused_under_tls_or_where_unavailable(tls, available, reply):
    events = make(tls=tls, starttls=available).receive_data(b"STLS\r\n")
    assert replies(events) == [reply] and StartTLS() not in events


# --- other commands ----------------------------------------------------------------------------


def test_quit_logs_out_and_closes():
    core = make()
    events = core.receive_data(b"QUIT\r\nCAPA\r\n")
    assert events[0] == Send(b"+OK Logging out.\r\n") and isinstance(events[1], Close)
    assert len(events) == 2


@pytest.mark.parametrize("command", [b"STAT", b"LIST", b"RETR 1", b"NOOP", b"UIDL"])
def test_transaction_commands_before_login_are_refused(command):
    assert replies(make().receive_data(command + b"\r\n")) == [b"-ERR Not logged in."]


def test_apop_is_not_supported():
    assert replies(make().receive_data(b"APOP alice 0123456789abcdef\r\n")) == [
        b"-ERR APOP is not supported."
    ]


def test_unknown_and_empty_commands_are_refused():
    assert replies(make().receive_data(b"FROB\r\n\r\n")) == [b"-ERR Unknown command."] * 2


# --- limits ------------------------------------------------------------------------------------


def test_a_command_line_may_have_512_octets_with_crlf_but_not_more():
    core = make(limits=pop3_limits(max_errors=10))
    core.receive_data(b"USER " + b"a" * (MAX_LINE - 7) + b"\r\n")
    assert replies(core.receive_data(b"USER " + b"a" * (MAX_LINE - 6) + b"\r\n")) == [
        b"-ERR Command line too long."
    ]


def test_an_auth_line_may_have_4096_octets():
    line = b"AUTH PLAIN    " + b"A" * (MAX_AUTH_LINE - 16) + b"\r\n"
    assert len(line) == MAX_AUTH_LINE
    assert replies(make().receive_data(line)) == [AUTH_FAILED]  # too long for a PLAIN field


def test_a_line_over_the_auth_limit_is_too_long_and_skipped():
    core = make()
    events = core.receive_data(b"AUTH PLAIN " + b"A" * MAX_AUTH_LINE)
    events += core.receive_data(b"AA\r\nCAPA\r\n")
    assert replies(events)[:2] == [b"-ERR Command line too long.", b"+OK Capability list follows"]


def test_a_sasl_response_over_the_limit_is_refused():
    core = make()
    core.receive_data(b"AUTH LOGIN\r\n")
    assert replies(core.receive_data(b"A" * (MAX_AUTH_LINE + 1))) == [
        b"-ERR Authentication response too long."
    ]
    assert core.state == "command"


def test_errors_beyond_max_errors_close_after_the_last_reply():
    core = make()
    events = core.receive_data(b"FROB\r\n" * 6)
    assert replies(events) == [b"-ERR Unknown command."] * 5
    assert isinstance(events[-1], Close) and core.errors == 5


def test_commands_beyond_max_commands_close():
    events = make().receive_data(b"CAPA\r\n" * 51)
    assert replies(events)[-1] == b"-ERR Too many commands." and isinstance(events[-1], Close)


def test_limits_must_be_positive_and_auth_lines_at_least_command_lines():
    with pytest.raises(ValueError):
        pop3_limits(max_failures=0)
    with pytest.raises(ValueError):
        pop3_limits(max_line=600, max_auth_line=599)


def test_login_timeout_closes_without_a_response_as_rfc_1939_says():
    core = make()
    assert core.login_timeout() == [Close("login timeout")]
    assert core.login_timeout() == [] and core.receive_data(b"CAPA\r\n") == []


def test_login_timeout_after_login_does_nothing():
    core = authenticating()
    core.auth_succeeded()
    assert core.login_timeout() == []


# --- chunking and arbitrary input (properties) ----------------------------------------------

SESSION = (
    b"CAPA\r\nAUTH\r\nUSER alice\r\nAUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n"
    b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\nSTAT\r\n"
)


def feed_all(core: Pop3Core, chunks) -> list:
    events = []
    for chunk in chunks:
        events += core.receive_data(chunk)
    return events


def test_feeding_one_byte_at_a_time_gives_the_same_events():
    whole = feed_all(make(), [SESSION])
    assert auths(whole)
    assert feed_all(make(), [SESSION[i : i + 1] for i in range(len(SESSION))]) == whole


COMMAND_LINES = [
    b"CAPA",
    b"AUTH",
    b"STLS",
    b"QUIT",
    b"USER alice",
    b"PASS pw",
    b"PASS",
    b"STAT",
    b"APOP a b",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"AUTH PLAIN " + plain("", "alice", "pw"),
    b"AUTH PLAIN " + plain("eve", "alice", "pw"),
    b"AUTH LOGIN " + b64(b"alice"),
    b64(b"alice"),
    b64(b"pw"),
    b"*",
    b"=",
    b"AUTH CRAM-MD5",
    b"frob",
    b"",
    b"x" * 600,
    b"A" * 5000,
]


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(st.sampled_from(COMMAND_LINES), max_size=25),
    ends=st.lists(st.sampled_from([b"\r\n", b"\n"]), min_size=25, max_size=25),
    cuts=st.lists(st.integers(min_value=0), max_size=30),
    tls=st.booleans(),
    starttls=st.booleans(),
    plaintext=st.booleans(),
)
def test_any_chunking_of_a_command_stream_gives_the_same_events(
    lines, ends, cuts, tls, starttls, plaintext
):
    stream = b"".join(line + end for line, end in zip(lines, ends, strict=False))
    kwargs = {"tls": tls, "starttls": starttls, "plaintext": plaintext}
    whole = feed_all(make(**kwargs), [stream])
    assert feed_all(make(**kwargs), split_at(stream, cuts)) == whole


def check_invariants(core: Pop3Core, events: list, limits: LineLimits) -> None:
    assert core.buffered <= limits.max_buffered
    assert core.commands <= limits.max_commands + 1
    assert core.errors <= limits.max_errors and core.failures <= limits.max_failures
    if any(isinstance(e, Close) for e in events):
        assert isinstance(events[-1], Close) and core.closed
    for event in events:
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n")
            assert event.data.startswith((b"+OK", b"-ERR", b"+ "))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(
        st.binary(max_size=300) | st.sampled_from([line + b"\r\n" for line in COMMAND_LINES]),
        max_size=40,
    ),
    decisions=st.lists(st.sampled_from(list(Refusal)), max_size=40),
    small=st.booleans(),
)
def test_arbitrary_bytes_never_raise_and_stay_within_the_limits(chunks, decisions, small):
    limits = (
        pop3_limits(max_line=64, max_auth_line=128, max_commands=8, max_pending=200)
        if small
        else pop3_limits()
    )
    core = make(tls=False, starttls=True, plaintext=True, limits=limits)
    decisions = iter(decisions)
    closed = False
    for chunk in chunks:
        events = core.receive_data(chunk)
        while core.state == "authenticating":
            more = core.auth_failed(next(decisions, Refusal.CREDENTIALS))
            check_invariants(core, more, limits)
            events += more
        if core.state == "starting-tls":
            core.tls_started()
        if closed:
            assert events == []
        check_invariants(core, events, limits)
        assert len(closes(events)) <= 1
        closed = closed or core.closed


@settings(max_examples=200, deadline=None)
@given(login=st.text(min_size=1, max_size=80), secret=st.text(max_size=80))
def test_plain_round_trips_any_credentials_or_refuses_them_without_asking(login, secret):
    raw = b"\0" + login.encode() + b"\0" + secret.encode()
    events = make().receive_data(b"AUTH PLAIN " + b64(raw) + b"\r\n")
    if (
        is_valid_login(login)
        and "\0" not in login + secret
        and len(secret.encode()) <= MAX_FIELD
        and len(login.encode()) <= MAX_FIELD
    ):
        (auth,) = auths(events)
        assert (auth.credentials.login, auth.credentials.secret) == (login, secret)
    else:
        assert not auths(events) and replies(events) == [AUTH_FAILED]


@settings(max_examples=200, deadline=None)
@given(login=st.text(min_size=1, max_size=80), secret=st.text(max_size=80), initial=st.booleans())
def test_login_round_trips_any_credentials_or_refuses_them_without_asking(login, secret, initial):
    core = make()
    if initial:
        events = core.receive_data(b"AUTH LOGIN " + b64(login.encode()) + b"\r\n")
    else:
        core.receive_data(b"AUTH LOGIN\r\n")
        events = core.receive_data(b64(login.encode()) + b"\r\n")
    if core.state == "sasl":
        events += core.receive_data(b64(secret.encode()) + b"\r\n")
    if is_valid_login(login) and len(secret.encode()) <= MAX_FIELD:
        (auth,) = auths(events)
        assert (auth.credentials.login, auth.credentials.secret) == (login, secret)
    else:
        assert not auths(events)


ONE_LINE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n")


@settings(max_examples=200, deadline=None)
@given(login=st.text(ONE_LINE, min_size=1, max_size=60), secret=st.text(ONE_LINE, max_size=60))
def test_user_and_pass_round_trip_any_single_line_credentials(login, secret):
    core = make(limits=pop3_limits(max_errors=10))
    events = core.receive_data(b"USER " + login.encode() + b"\r\n")
    events += core.receive_data(b"PASS " + secret.encode() + b"\r\n")
    if is_valid_login(login) and not any(
        (ord(c) < 0x20 and c != "\t") or c == "\x7f" for c in secret
    ):
        (auth,) = auths(events)
        assert (auth.credentials.login, auth.credentials.secret) == (login, secret)
    else:
        assert not auths(events)
