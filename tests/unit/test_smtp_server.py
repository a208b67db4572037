"""Specification of the SMTP pre-auth core (proxy/smtp/server.py): bytes in, commands out."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.decision import Refusal
from proxy.commands import Authenticate, Close, Failed, Send, StartTLS
from proxy.core import LineLimits
from proxy.sasl import MAX_FIELD, is_valid_login
from proxy.smtp.server import MAX_AUTH_LINE, MAX_LINE, SmtpCore, smtp_limits
from tests.support.streams import split_at

UPSTREAM_EHLO = [
    "PIPELINING",
    "SIZE 10240000",
    "AUTH PLAIN LOGIN",
    "AUTH=PLAIN",
    "STARTTLS",
    "XCLIENT NAME ADDR PROTO HELO LOGIN",
    "XFORWARD NAME ADDR",
    "ENHANCEDSTATUSCODES",
    "8BITMIME",
    "DSN",
    "SMTPUTF8",
    "CHUNKING",
]


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
    extensions=UPSTREAM_EHLO,
) -> SmtpCore:
    return SmtpCore(
        tls_active=tls,
        starttls_available=starttls,
        plaintext_auth=plaintext,
        limits=limits,
        hostname="mx.example.org",
        extensions=extensions,
    )


def ready(**kwargs) -> SmtpCore:
    """A core whose client has said EHLO."""
    core = make(**kwargs)
    core.receive_data(b"EHLO client.example\r\n")
    return core


def sent(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def replies(events) -> list[bytes]:
    return sent(events).splitlines()


def auths(events) -> list[Authenticate]:
    return [e for e in events if isinstance(e, Authenticate)]


def closes(events) -> list[Close]:
    return [e for e in events if isinstance(e, Close)]


# --- greeting and EHLO -----------------------------------------------------------------------


def test_greeting_names_the_host_and_says_esmtp():
    assert make().greeting() == [Send(b"220 mx.example.org ESMTP\r\n")]


def test_ehlo_advertises_upstream_extensions_without_auth_starttls_xclient_or_xforward():
    events = make(tls=True).receive_data(b"EHLO client.example\r\n")
    assert sent(events) == (
        b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-DSN\r\n"
        b"250-SMTPUTF8\r\n250-CHUNKING\r\n250 AUTH PLAIN LOGIN\r\n"
    )


def test_ehlo_before_tls_offers_starttls_and_no_auth_when_plaintext_is_disallowed():
    lines = replies(make(tls=False, starttls=True).receive_data(b"EHLO c\r\n"))
    assert b"250-STARTTLS" in lines or b"250 STARTTLS" in lines
    assert not any(b"AUTH" in line for line in lines)


@pytest.mark.parametrize("tls,plaintext", [(True, False), (False, True), (True, True)])
def test_ehlo_offers_auth_plain_login_under_tls_or_where_plaintext_is_allowed(tls, plaintext):
    lines = replies(make(tls=tls, plaintext=plaintext).receive_data(b"EHLO c\r\n"))
    assert lines[-1] == b"250 AUTH PLAIN LOGIN"


def test_ehlo_under_tls_does_not_offer_starttls():
    lines = replies(make(tls=True, starttls=True).receive_data(b"EHLO c\r\n"))
    assert not any(b"STARTTLS" in line for line in lines)


def test_ehlo_with_no_extensions_is_a_one_line_reply():
    core = make(tls=False, starttls=False, plaintext=False, extensions=())
    assert sent(core.receive_data(b"EHLO c\r\n")) == b"250 mx.example.org\r\n"


def test_ehlo_records_the_helo_name_and_esmtp():
    core = make()
    core.receive_data(b"ehlo  client.example   extra words\r\n")
    assert (core.helo_name, core.esmtp) == ("client.example", True)


def test_helo_gets_a_one_line_reply_and_records_the_name_without_esmtp():
    core = make()
    assert sent(core.receive_data(b"HELO oldclient\r\n")) == b"250 mx.example.org\r\n"
    assert (core.helo_name, core.esmtp) == ("oldclient", False)


def test_helo_only_client_may_still_authenticate():
    core = make()
    core.receive_data(b"HELO oldclient\r\n")
    events = core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n")
    assert auths(events)[0].credentials.login == "alice"


@pytest.mark.parametrize(
    "line", [b"EHLO\r\n", b"EHLO   \r\n", b"HELO\r\n", b"EHLO caf\xc3\xa9\r\n"]
)
def test_ehlo_or_helo_without_a_proper_name_is_a_syntax_error(line):
    core = make()
    events = core.receive_data(line)
    assert replies(events)[0].startswith(b"501 5.5.4 Syntax: ")
    assert core.helo_name is None


def test_upstream_extension_lines_must_be_printable():
    with pytest.raises(ValueError):
        make(extensions=["SIZE 1\r\n250 FAKE"])
    with pytest.raises(TypeError):
        make(extensions="PIPELINING")


def test_upstream_extensions_are_deduplicated_by_keyword():
    core = make(extensions=["SIZE 100", "size 200", "8BITMIME"])
    assert core.extensions == ("SIZE 100", "8BITMIME")


def test_hostname_must_be_one_printable_word():
    with pytest.raises(ValueError):
        SmtpCore(
            tls_active=True, starttls_available=False, plaintext_auth=False, hostname="mx example"
        )


# --- AUTH --------------------------------------------------------------------------------------


def test_auth_before_ehlo_or_helo_is_a_bad_sequence():
    events = make().receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n")
    assert replies(events) == [b"503 5.5.1 Error: send HELO/EHLO first"]
    assert not auths(events)


def test_auth_plain_with_initial_response_asks_the_authenticator():
    events = ready().receive_data(
        b"AUTH PLAIN " + plain("", "alice@example.org", "abcd efgh") + b"\r\n"
    )
    assert sent(events) == b""
    (auth,) = auths(events)
    assert (auth.credentials.login, auth.credentials.secret) == ("alice@example.org", "abcd efgh")
    assert auth.mechanism == "PLAIN"


def test_auth_plain_without_initial_response_gets_an_empty_challenge():
    core = ready()
    assert sent(core.receive_data(b"AUTH PLAIN\r\n")) == b"334 \r\n"
    (auth,) = auths(core.receive_data(plain("", "alice", "pw") + b"\r\n"))
    assert auth.credentials.secret == "pw"


def test_auth_login_prompts_for_username_then_password():
    core = ready()
    assert sent(core.receive_data(b"AUTH LOGIN\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    assert sent(core.receive_data(b64(b"alice") + b"\r\n")) == b"334 UGFzc3dvcmQ6\r\n"
    (auth,) = auths(core.receive_data(b64(b"secret pw") + b"\r\n"))
    assert (auth.credentials.login, auth.credentials.secret, auth.mechanism) == (
        "alice",
        "secret pw",
        "LOGIN",
    )


def test_auth_login_with_initial_username_prompts_for_password():
    core = ready()
    assert sent(core.receive_data(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")) == (
        b"334 UGFzc3dvcmQ6\r\n"
    )
    (auth,) = auths(core.receive_data(b64(b"pw") + b"\r\n"))
    assert auth.credentials.login == "alice"


def test_auth_mechanism_name_is_case_insensitive():
    assert sent(ready().receive_data(b"auth login\r\n")) == b"334 VXNlcm5hbWU6\r\n"


def test_an_equals_sign_is_an_empty_initial_response():
    # An empty PLAIN message has no NULs: refused as malformed, without asking anyone.
    events = ready().receive_data(b"AUTH PLAIN =\r\n")
    assert replies(events) == [b"535 5.7.8 Authentication credentials invalid"]
    assert not auths(events)


def test_an_empty_login_password_is_passed_on():
    core = ready()
    core.receive_data(b"AUTH LOGIN " + b64(b"alice") + b"\r\n")
    (auth,) = auths(core.receive_data(b"\r\n"))
    assert auth.credentials.secret == ""


def test_star_cancels_the_exchange():
    core = ready()
    core.receive_data(b"AUTH LOGIN\r\n")
    events = core.receive_data(b"*\r\n")
    assert replies(events) == [b"501 5.7.0 Authentication cancelled"]
    assert core.state == "command"
    assert sent(core.receive_data(b"NOOP\r\n")) == b"250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("line", [b"AUTH PLAIN not*base64\r\n", b"AUTH PLAIN YWJj\xff\r\n"])
def test_bad_base64_initial_response_gets_501_without_authenticate(line):
    events = ready().receive_data(line)
    assert replies(events) == [b"501 5.5.2 Invalid base64 data"]
    assert not auths(events) and any(isinstance(e, Failed) for e in events)


def test_bad_base64_response_ends_the_exchange():
    core = ready()
    core.receive_data(b"AUTH LOGIN\r\n")
    assert replies(core.receive_data(b"!!!\r\n")) == [b"501 5.5.2 Invalid base64 data"]
    assert core.state == "command"


def test_unknown_mechanism_gets_504():
    assert replies(ready().receive_data(b"AUTH CRAM-MD5\r\n")) == [
        b"504 5.5.4 Unrecognized authentication type"
    ]


@pytest.mark.parametrize("line", [b"AUTH\r\n", b"AUTH PLAIN a b\r\n"])
def test_auth_with_wrong_number_of_arguments_is_a_syntax_error(line):
    assert replies(ready().receive_data(line))[0].startswith(b"501 5.5.4 Syntax: AUTH")


def test_plaintext_auth_without_tls_gets_538_where_disallowed():
    events = ready(tls=False, plaintext=False).receive_data(
        b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n"
    )
    assert replies(events) == [
        b"538 5.7.11 Encryption required for requested authentication mechanism"
    ]
    assert not auths(events)


def test_plaintext_auth_without_tls_is_allowed_where_configured():
    events = ready(tls=False, plaintext=True).receive_data(
        b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n"
    )
    assert auths(events)


def test_plain_authzid_other_than_authcid_is_refused_with_535():
    events = ready().receive_data(b"AUTH PLAIN " + plain("bob", "alice", "pw") + b"\r\n")
    assert replies(events) == [b"535 5.7.8 Authentication credentials invalid"]
    assert not auths(events)
    assert Failed("PLAIN authzid differs from authcid") in events


def test_plain_authzid_equal_to_authcid_is_accepted():
    events = ready().receive_data(b"AUTH PLAIN " + plain("alice", "alice", "pw") + b"\r\n")
    assert auths(events)[0].credentials.login == "alice"


@pytest.mark.parametrize("login", ["ali\x01ce", "alice\x7f", "ali\u0085ce", "a\tb"])
def test_login_with_control_characters_is_refused_without_authenticate(login):
    core = ready()
    core.receive_data(b"AUTH LOGIN\r\n")
    events = core.receive_data(b64(login.encode()) + b"\r\n")
    events += core.receive_data(b64(b"pw") + b"\r\n")
    assert replies(events)[-1] == b"535 5.7.8 Authentication credentials invalid"
    assert not auths(events)
    assert core.failures == 1


def test_nul_in_a_plain_login_is_refused_without_authenticate():
    events = ready().receive_data(b"AUTH PLAIN " + b64(b"\0ali\0ce\0pw") + b"\r\n")
    assert replies(events) == [b"535 5.7.8 Authentication credentials invalid"]
    assert not auths(events)


# --- decisions ---------------------------------------------------------------------------------


def authenticating(**kwargs) -> SmtpCore:
    core = ready(**kwargs)
    assert auths(core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n"))
    return core


@pytest.mark.parametrize(
    "refusal,reply",
    [
        (Refusal.CREDENTIALS, b"535 5.7.8 Authentication credentials invalid"),
        (Refusal.EXPIRED, b"535 5.7.8 Authentication credentials invalid"),
        (Refusal.FORBIDDEN, b"535 5.7.8 Authentication credentials invalid"),
        (Refusal.PRIVACY, b"538 5.7.11 Encryption required for requested authentication mechanism"),
        (Refusal.TEMPORARY, b"454 4.7.0 Temporary authentication failure"),
    ],
)
def test_refusals_get_the_rfc_4954_replies(refusal, reply):
    core = authenticating()
    events = core.auth_failed(refusal)
    assert replies(events) == [reply]
    assert not closes(events) and core.state == "command"


def test_limit_refusal_gets_421_and_closes():
    events = authenticating().auth_failed(Refusal.LIMIT)
    assert replies(events) == [b"421 4.7.0 mx.example.org Too many failed authentications"]
    assert isinstance(events[-1], Close)


def test_third_failure_gets_421_and_closes():
    core = authenticating()
    core.auth_failed(Refusal.CREDENTIALS)
    core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw2") + b"\r\n")
    core.auth_failed(Refusal.CREDENTIALS)
    core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw3") + b"\r\n")
    events = core.auth_failed(Refusal.CREDENTIALS)
    assert replies(events) == [
        b"535 5.7.8 Authentication credentials invalid",
        b"421 4.7.0 mx.example.org Error: too many failed authentications",
    ]
    assert isinstance(events[-1], Close) and core.closed


def test_failures_refused_by_the_core_count_towards_the_limit():
    core = ready()
    events = []
    for _ in range(3):
        events += core.receive_data(b"AUTH PLAIN " + plain("x", "alice", "pw") + b"\r\n")
    assert replies(events)[-1].startswith(b"421 4.7.0")
    assert core.closed


def test_auth_succeeded_replies_235_and_hands_over_pipelined_bytes():
    core = ready()
    events = core.receive_data(
        b"AUTH PLAIN "
        + plain("", "alice", "pw")
        + b"\r\nMAIL FROM:<alice@example.org>\r\nRCPT TO:<b"
    )
    assert auths(events) and sent(events) == b""
    assert core.receive_data(b"ob@example.org>\r\n") == []
    assert core.auth_succeeded() == [Send(b"235 2.7.0 Authentication successful\r\n")]
    assert core.take_pending() == b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@example.org>\r\n"
    assert core.state == "logged-in"


def test_input_during_authentication_is_parsed_after_a_refusal():
    core = ready()
    core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\nNOOP\r\n")
    assert replies(core.auth_failed(Refusal.CREDENTIALS)) == [
        b"535 5.7.8 Authentication credentials invalid",
        b"250 2.0.0 Ok",
    ]


def test_pipelined_input_beyond_max_pending_gets_421_and_closes():
    core = authenticating(limits=smtp_limits(max_pending=100))
    assert core.receive_data(b"x" * 100) == []
    events = core.receive_data(b"x")
    assert replies(events)[0].startswith(b"421 4.7.0 mx.example.org")
    assert isinstance(events[-1], Close)
    assert core.auth_succeeded() == [] and core.auth_failed(Refusal.CREDENTIALS) == []


def test_auth_results_without_an_outstanding_authenticate_are_bugs():
    core = ready()
    with pytest.raises(RuntimeError):
        core.auth_failed(Refusal.CREDENTIALS)
    with pytest.raises(RuntimeError):
        core.auth_succeeded()
    with pytest.raises(RuntimeError):
        core.take_pending()


# --- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_replies_220_starts_tls_and_discards_pipelined_commands():
    core = ready(tls=False, starttls=True, plaintext=False)
    events = core.receive_data(b"STARTTLS\r\nAUTH PLAIN " + plain("", "mallory", "pw") + b"\r\n")
    assert events == [Send(b"220 2.0.0 Ready to start TLS\r\n"), StartTLS()]
    assert core.buffered == 0


def test_plaintext_arriving_before_tls_started_is_discarded():
    core = ready(tls=False, starttls=True)
    core.receive_data(b"STARTTLS\r\n")
    assert core.receive_data(b"EHLO injected\r\nAUTH PLAIN " + plain("", "m", "p") + b"\r\n") == []
    assert core.buffered == 0  # dropped, not held
    core.tls_started()
    assert core.buffered == 0 and core.helo_name is None


def test_after_tls_the_client_must_say_ehlo_again_and_auth_is_offered():
    core = ready(tls=False, starttls=True, plaintext=False)
    core.receive_data(b"STARTTLS\r\n")
    core.tls_started()
    assert core.tls_active and core.esmtp is False
    assert replies(core.receive_data(b"AUTH LOGIN\r\n")) == [
        b"503 5.5.1 Error: send HELO/EHLO first"
    ]
    lines = replies(core.receive_data(b"EHLO again\r\n"))
    assert lines[-1] == b"250 AUTH PLAIN LOGIN" and b"250-STARTTLS" not in lines
    assert auths(core.receive_data(b"AUTH PLAIN " + plain("", "alice", "pw") + b"\r\n"))


@pytest.mark.parametrize(
    "tls,available,line,reply",
    [
        (True, True, b"STARTTLS\r\n", b"503 5.5.1 Error: TLS already active"),
        (False, False, b"STARTTLS\r\n", b"502 5.5.1 Error: command not implemented"),
        (False, True, b"STARTTLS now\r\n", b"501 5.5.4 Syntax: STARTTLS"),
    ],
)
def test_starttls_is_refused_under_tls_where_unavailable_or_with_arguments(
    tls, available, line, reply
):
    events = ready(tls=tls, starttls=available).receive_data(line)
    assert replies(events) == [reply]
    assert StartTLS() not in events


# --- other commands ----------------------------------------------------------------------------


def test_rset_noop_help_and_vrfy_are_answered_before_login():
    events = make().receive_data(b"RSET\r\nNOOP anything\r\nHELP\r\nVRFY alice\r\n")
    assert [line[:9] for line in replies(events)] == [
        b"250 2.0.0",
        b"250 2.0.0",
        b"214 2.0.0",
        b"252 2.0.0",
    ]
    assert not any(isinstance(e, Failed) for e in events)


def test_quit_says_bye_and_closes():
    core = make()
    events = core.receive_data(b"QUIT\r\nNOOP\r\n")
    assert events[0] == Send(b"221 2.0.0 Bye\r\n") and isinstance(events[1], Close)
    assert len(events) == 2 and core.closed


@pytest.mark.parametrize("verb", [b"MAIL FROM:<a@b>", b"RCPT TO:<a@b>", b"DATA"])
def test_mail_commands_before_login_need_authentication(verb):
    assert replies(ready().receive_data(verb + b"\r\n")) == [b"530 5.7.0 Authentication required"]


def test_bdat_before_login_is_refused_and_its_chunk_dropped_unread():
    core = ready(limits=smtp_limits(max_errors=10))
    events = core.receive_data(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert replies(events) == [b"530 5.7.0 Authentication required", b"250 2.0.0 Ok"]


def test_bdat_without_a_chunk_size_closes_the_connection():
    events = ready().receive_data(b"BDAT LAST\r\n")
    assert replies(events)[0] == b"501 5.5.4 Syntax: BDAT count [LAST]"
    assert replies(events)[-1].startswith(b"421 4.5.0") and isinstance(events[-1], Close)


@pytest.mark.parametrize("line", [b"XCLIENT ADDR=10.0.0.1 LOGIN=bob", b"xforward addr=1.2.3.4"])
def test_xclient_and_xforward_from_a_client_are_refused(line):
    assert replies(ready().receive_data(line + b"\r\n")) == [
        b"550 5.7.0 Error: insufficient authorization"
    ]


def test_unknown_and_empty_commands_get_500():
    events = make().receive_data(b"FROB\r\n\r\n")
    assert replies(events) == [b"500 5.5.2 Error: command not recognized"] * 2


def test_control_characters_in_a_command_are_a_syntax_error():
    assert replies(make().receive_data(b"NOOP \x00x\r\n")) == [b"500 5.5.2 Error: bad syntax"]


def test_bare_lf_ends_a_command_line_too():
    assert replies(make().receive_data(b"NOOP\nNOOP\r\n")) == [b"250 2.0.0 Ok"] * 2


# --- limits ------------------------------------------------------------------------------------


def test_a_command_line_may_have_512_octets_with_crlf_but_not_more():
    core = make()
    ok = b"NOOP " + b"x" * (MAX_LINE - 7) + b"\r\n"
    assert replies(core.receive_data(ok)) == [b"250 2.0.0 Ok"]
    long = b"NOOP " + b"x" * (MAX_LINE - 6) + b"\r\n"
    assert replies(core.receive_data(long)) == [b"500 5.5.2 Error: line too long"]


def test_an_auth_line_may_have_12288_octets():
    core = ready()
    line = b"AUTH PLAIN    " + b"A" * (MAX_AUTH_LINE - 16) + b"\r\n"
    assert len(line) == MAX_AUTH_LINE
    # Long but valid base64: decoded, it is not a PLAIN message.
    assert replies(core.receive_data(line)) == [b"535 5.7.8 Authentication credentials invalid"]


def test_a_line_over_12288_octets_is_too_long_and_skipped():
    core = ready()
    events = core.receive_data(b"AUTH PLAIN " + b"A" * MAX_AUTH_LINE)
    events += core.receive_data(b"AAAA\r\nNOOP\r\n")
    assert replies(events) == [b"500 5.5.2 Error: line too long", b"250 2.0.0 Ok"]
    assert core.buffered == 0


def test_a_sasl_response_over_the_limit_gets_500_5_5_6():
    core = ready()
    core.receive_data(b"AUTH LOGIN\r\n")
    events = core.receive_data(b"A" * (MAX_AUTH_LINE + 1))
    assert replies(events) == [b"500 5.5.6 Authentication exchange line is too long"]
    assert core.state == "command"


def test_errors_beyond_max_errors_get_421_and_close():
    core = make()
    events = core.receive_data(b"FROB\r\n" * 5 + b"NOOP\r\n")
    lines = replies(events)
    assert lines[:5] == [b"500 5.5.2 Error: command not recognized"] * 5
    assert lines[5:] == [b"421 4.7.0 mx.example.org Error: too many errors"]
    assert isinstance(events[-1], Close) and core.errors == 5


def test_commands_beyond_max_commands_get_421_and_close():
    core = make()
    events = core.receive_data(b"NOOP\r\n" * 51)
    lines = replies(events)
    assert lines[:50] == [b"250 2.0.0 Ok"] * 50
    assert lines[50:] == [b"421 4.7.0 mx.example.org Error: too many commands"]


def test_limits_must_be_positive_and_auth_lines_at_least_command_lines():
    with pytest.raises(ValueError):
        smtp_limits(max_commands=0)
    with pytest.raises(ValueError):
        smtp_limits(max_line=1000, max_auth_line=999)


def test_login_timeout_gets_421_4_4_2_and_closes():
    core = ready()
    events = core.login_timeout()
    assert events == [
        Send(b"421 4.4.2 mx.example.org Error: timeout exceeded\r\n"),
        Close("login timeout"),
    ]
    assert core.login_timeout() == [] and core.receive_data(b"NOOP\r\n") == []


def test_login_timeout_during_the_tls_handshake_only_closes():
    core = ready(tls=False, starttls=True)
    core.receive_data(b"STARTTLS\r\n")
    assert core.login_timeout() == [Close("login timeout")]


def test_login_timeout_after_login_does_nothing():
    core = authenticating()
    core.auth_succeeded()
    assert core.login_timeout() == []


# --- chunking and arbitrary input (properties) ----------------------------------------------

SESSION = (
    b"EHLO client.example\r\nNOOP\r\nAUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n"
    b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\nMAIL FROM:<a@b>\r\n"
)


def feed_all(core: SmtpCore, chunks) -> list:
    events = []
    for chunk in chunks:
        events += core.receive_data(chunk)
    return events


def test_feeding_one_byte_at_a_time_gives_the_same_events():
    whole = feed_all(ready(), [SESSION])
    assert auths(whole)
    assert feed_all(ready(), [SESSION[i : i + 1] for i in range(len(SESSION))]) == whole


COMMAND_LINES = [
    b"EHLO client.example",
    b"HELO old",
    b"NOOP",
    b"RSET",
    b"HELP",
    b"VRFY bob",
    b"QUIT",
    b"STARTTLS",
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
    b"MAIL FROM:<a@b>",
    b"BDAT 3",
    b"abc",
    b"XCLIENT",
    b"frob",
    b"",
    b"x" * 600,
    b"A" * 13000,
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


def check_invariants(core: SmtpCore, events: list, limits: LineLimits) -> None:
    assert core.buffered <= limits.max_buffered
    assert core.commands <= limits.max_commands + 1
    assert core.errors <= limits.max_errors and core.failures <= limits.max_failures
    if any(isinstance(e, Close) for e in events):
        assert isinstance(events[-1], Close) and core.closed
    for event in events:
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n") and re.match(rb"^\d{3}[ -]", event.data)


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
        smtp_limits(max_line=64, max_auth_line=128, max_commands=8, max_pending=200)
        if small
        else smtp_limits()
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
    events = ready().receive_data(b"AUTH PLAIN " + b64(raw) + b"\r\n")
    acceptable = (
        is_valid_login(login)
        and "\0" not in login + secret
        and len(secret.encode()) <= MAX_FIELD
        and len(login.encode()) <= MAX_FIELD
    )
    if acceptable:
        (auth,) = auths(events)
        assert (auth.credentials.login, auth.credentials.secret) == (login, secret)
    else:
        assert not auths(events)
        assert replies(events)[0].startswith(b"535 5.7.8")


@settings(max_examples=200, deadline=None)
@given(login=st.text(min_size=1, max_size=80), secret=st.text(max_size=80), initial=st.booleans())
def test_login_round_trips_any_credentials_or_refuses_them_without_asking(login, secret, initial):
    core = ready()
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
