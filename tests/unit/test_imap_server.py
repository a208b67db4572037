"""Specification of the IMAP pre-auth core (proxy.imap.server): bytes in, commands out."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth.decision import Refusal
from proxy.commands import Authenticate, Close, Failed, Send, StartTLS
from proxy.core import MAX_COMMANDS, MAX_ERRORS, MAX_FAILURES, MAX_PENDING
from proxy.imap.server import (
    MAX_EXTRA_CAPABILITIES,
    MAX_LINE,
    MAX_LITERAL,
    ImapCore,
    ImapLimits,
    extra_capabilities,
)
from proxy.imap.syntax import ID_MAX_PAIRS, decided_by_apppass, is_capability
from proxy.sasl import Credentials
from tests.support.streams import split_at

PLAINTEXT_CAPS = "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS LOGINDISABLED"
TLS_CAPS = "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN"


def core(
    *, tls: bool = True, starttls: bool = False, plaintext: bool = False, **limits: int
) -> ImapCore:
    return ImapCore(
        tls_active=tls,
        starttls_available=starttls,
        plaintext_auth=plaintext,
        limits=ImapLimits(**limits),
    )


def replies(events) -> list[bytes]:
    """The reply lines, without CRLF (each Send is checked to be exactly one CRLF line)."""
    out = []
    for event in events:
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n") and event.data.count(b"\n") == 1, event
            out.append(event.data[:-2])
    return out


def authenticates(events) -> list[Authenticate]:
    return [e for e in events if isinstance(e, Authenticate)]


def closes(events) -> list[Close]:
    return [e for e in events if isinstance(e, Close)]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def drive(imap: ImapCore, chunks, refusal: Refusal = Refusal.CREDENTIALS) -> list:
    """Feed chunks; answer every login with auth_failed(refusal), as a frontend would."""
    events: list = []
    for chunk in chunks:
        events += imap.receive_data(chunk)
        while imap.state == "authenticating":
            events += imap.auth_failed(refusal)
    return events


# --- Greeting and capabilities ----------------------------------------------------------------


def test_greeting_without_tls_offers_starttls_and_disables_login():
    imap = core(tls=False, starttls=True)
    assert replies(imap.greeting()) == [
        f"* OK [CAPABILITY {PLAINTEXT_CAPS}] apppass ready.".encode()
    ]


def test_greeting_with_tls_offers_plain_and_login_mechanisms():
    imap = core(tls=True, starttls=True)
    assert replies(imap.greeting()) == [f"* OK [CAPABILITY {TLS_CAPS}] apppass ready.".encode()]


def test_plaintext_auth_allowed_offers_mechanisms_without_tls():
    imap = core(tls=False, starttls=True, plaintext=True)
    assert imap.capabilities() == "IMAP4rev1 SASL-IR LITERAL+ ID STARTTLS AUTH=PLAIN AUTH=LOGIN"


def test_starttls_is_not_offered_when_unavailable():
    imap = core(tls=False, starttls=False)
    assert imap.capabilities() == "IMAP4rev1 SASL-IR LITERAL+ ID LOGINDISABLED"


def test_greeting_text_is_configurable_and_cannot_inject_lines():
    imap = ImapCore(
        tls_active=True,
        starttls_available=False,
        plaintext_auth=False,
        greeting_text="Hi.\r\n* BYE fake",
    )
    assert replies(imap.greeting()) == [f"* OK [CAPABILITY {TLS_CAPS}] Hi.??* BYE fake".encode()]


# Dovecot 2.3's pre-login list, over TLS and before it (with disable_plaintext_auth).
DOVECOT_TLS = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=LOGIN"
DOVECOT_CLEAR = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS LOGINDISABLED"


@pytest.mark.parametrize("upstream", [DOVECOT_TLS, DOVECOT_CLEAR])
def test_the_upstreams_capabilities_are_listed_without_what_apppass_decides(upstream):
    extras = extra_capabilities(upstream.split())
    assert extras == ("LOGIN-REFERRALS", "ENABLE", "IDLE")
    imap = ImapCore(
        tls_active=False, starttls_available=True, plaintext_auth=False, capabilities=extras
    )
    assert imap.capabilities() == (
        "IMAP4rev1 SASL-IR LITERAL+ ID LOGIN-REFERRALS ENABLE IDLE STARTTLS LOGINDISABLED"
    )
    imap = ImapCore(
        tls_active=True, starttls_available=True, plaintext_auth=False, capabilities=extras
    )
    assert replies(imap.receive_data(b"a CAPABILITY\r\n"))[0] == (
        b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID LOGIN-REFERRALS ENABLE IDLE"
        b" AUTH=PLAIN AUTH=LOGIN"
    )


def test_upstream_names_that_are_no_capability_or_repeat_are_left_out():
    names = [
        "IDLE",
        "idle",
        "imap4REV1",
        "X-GM-EXT-1",
        "a]b",
        "(",
        "",
        "é",
        "auth=xoauth2",
        "sasl-ir",
    ]
    assert extra_capabilities(names) == ("IDLE", "X-GM-EXT-1")


def test_the_upstreams_list_is_bounded():
    names = [f"X-{i:04d}" for i in range(1000)]
    extras = extra_capabilities(names)
    assert 0 < len(" ".join(extras)) <= MAX_EXTRA_CAPABILITIES
    assert extras == tuple(names[: len(extras)])


@settings(max_examples=300)
@given(
    names=st.lists(st.text(max_size=12) | st.sampled_from(DOVECOT_CLEAR.split()), max_size=40),
    tls=st.booleans(),
    starttls=st.booleans(),
    plaintext=st.booleans(),
)
def test_the_merged_list_is_apppasss_own_plus_each_upstream_name_once(
    names, tls, starttls, plaintext
):
    imap = ImapCore(
        tls_active=tls,
        starttls_available=starttls,
        plaintext_auth=plaintext,
        capabilities=extra_capabilities(names),
    )
    caps = imap.capabilities().split(" ")
    assert caps[:4] == ["IMAP4rev1", "SASL-IR", "LITERAL+", "ID"]
    assert len({c.upper() for c in caps}) == len(caps)
    assert all(is_capability(c) for c in caps)
    own = core(tls=tls, starttls=starttls, plaintext=plaintext).capabilities().split(" ")
    assert [c for c in caps if decided_by_apppass(c)] == [c for c in own if decided_by_apppass(c)]
    upstream = {n.upper() for n in names}
    assert all(c in own or c.upper() in upstream for c in caps)


# --- Simple commands --------------------------------------------------------------------------


def test_capability_command_lists_capabilities_then_completes():
    assert replies(core().receive_data(b"a1 CAPABILITY\r\n")) == [
        f"* CAPABILITY {TLS_CAPS}".encode(),
        b"a1 OK CAPABILITY completed",
    ]


def test_command_names_are_case_insensitive():
    assert replies(core().receive_data(b"a cApAbIlItY\r\nb noop\r\n")) == [
        f"* CAPABILITY {TLS_CAPS}".encode(),
        b"a OK CAPABILITY completed",
        b"b OK NOOP completed",
    ]


def test_noop_completes():
    assert replies(core().receive_data(b"x NOOP\r\n")) == [b"x OK NOOP completed"]


def test_bare_lf_line_ends_are_accepted():
    assert replies(core().receive_data(b"x NOOP\n")) == [b"x OK NOOP completed"]


def test_logout_says_bye_completes_and_closes():
    events = core().receive_data(b"z LOGOUT\r\nafter NOOP\r\n")
    assert replies(events) == [b"* BYE Logging out", b"z OK LOGOUT completed"]
    assert events[-1] == Close("logout")


@pytest.mark.parametrize(
    "line", [b"a CAPABILITY x", b"a NOOP now", b"a LOGOUT please", b"a STARTTLS x"]
)
def test_argumentless_commands_with_arguments_get_bad(line):
    events = core(tls=False, starttls=True).receive_data(line + b"\r\n")
    assert replies(events)[0].startswith(b"a BAD ")
    assert any(isinstance(e, Failed) for e in events)
    assert not any(isinstance(e, StartTLS) for e in events)


@pytest.mark.parametrize(
    "command", [b"SELECT INBOX", b"EXAMINE INBOX", b'LIST "" *', b"ENABLE UTF8=ACCEPT", b"FOO"]
)
def test_other_commands_before_login_get_bad(command):
    events = core().receive_data(b"t7 " + command + b"\r\n")
    assert replies(events) == [b"t7 BAD Unknown command or not allowed before login"]
    assert any(isinstance(e, Failed) for e in events)


# --- Tags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", [b"a", b"A001", b"tag]1", b"a.b-c_d", b"1", b"x!#$&'=~"])
def test_tag_may_be_any_astring_chars_except_plus(tag):
    assert replies(core().receive_data(tag + b" NOOP\r\n")) == [tag + b" OK NOOP completed"]


@pytest.mark.parametrize(
    "line",
    [
        b"+ NOOP",
        b"a+b NOOP",
        b"* NOOP",
        b"a%b NOOP",
        b'"a" NOOP',
        b"(a NOOP",
        b"a{b NOOP",
        b"a\\b NOOP",
        b" NOOP",
        b"\x01a NOOP",
        b"\xc3\xa9 NOOP",
    ],
)
def test_invalid_tag_gets_untagged_bad_and_is_never_echoed(line):
    events = core().receive_data(line + b"\r\n")
    assert replies(events) == [b"* BAD Invalid tag"]


@pytest.mark.parametrize("line", [b"a", b"a ", b"a  NOOP", b"a N\x00OP"])
def test_missing_or_invalid_command_name_gets_tagged_bad(line):
    assert replies(core().receive_data(line + b"\r\n")) == [
        b"a BAD Missing or invalid command name"
    ]


def test_empty_lines_are_ignored_but_counted_as_commands():
    imap = core(max_commands=3)
    assert replies(imap.receive_data(b"\r\n\r\n")) == []
    events = imap.receive_data(b"a NOOP\r\nb NOOP\r\n")
    assert replies(events) == [b"a OK NOOP completed", b"* BYE Too many commands before login"]
    assert closes(events)


# --- ID (RFC 2971) ----------------------------------------------------------------------------


def test_id_is_answered_and_its_parameters_kept():
    imap = core()
    events = imap.receive_data(b'i ID ("name" "Thunderbird" "version" "115.0" "os" NIL)\r\n')
    assert replies(events) == [b'* ID ("name" "apppass")', b"i OK ID completed"]
    assert imap.client_id == {"name": "Thunderbird", "version": "115.0", "os": None}


def test_id_nil_is_answered_and_leaves_no_client_id():
    imap = core()
    assert replies(imap.receive_data(b"i ID NIL\r\n")) == [
        b'* ID ("name" "apppass")',
        b"i OK ID completed",
    ]
    assert imap.client_id is None


def test_id_with_an_empty_list_gives_empty_parameters():
    imap = core()
    imap.receive_data(b"i ID ()\r\n")
    assert imap.client_id == {}


def test_id_values_may_be_literals():
    imap = core()
    events = imap.receive_data(b'i ID ("name" {6}\r\nMutt\xc3\xa9 "x" {2+}\r\nab)\r\n')
    assert replies(events) == [
        b"+ Ready for literal data",
        b'* ID ("name" "apppass")',
        b"i OK ID completed",
    ]
    assert imap.client_id == {"name": "Mutt\u00e9", "x": "ab"}


@pytest.mark.parametrize(
    "params",
    [
        b"",
        b"FOO",
        b"(",
        b'("name")',
        b'("name" "a" "b")',
        b"(name value)",
        b'(("a" "b"))',
        b'("name" "unterminated)',
        b'("a" "b\\x")',
        b'"name" "x"',
        b"NIL NIL",
        b'("k" "line\x01ok" "\x01bad" "v")',
        b'("' + b"k" * 31 + b'" "v")',
        b'("\xff" "v")',
    ],
)
def test_id_with_malformed_parameters_is_still_answered_ok(params):
    imap = core()
    events = imap.receive_data(b"i ID " + params + b"\r\n")
    assert replies(events) == [b'* ID ("name" "apppass")', b"i OK ID completed"]
    assert not any(isinstance(e, Failed) for e in events)
    assert imap.client_id is None


def test_id_with_more_than_thirty_pairs_is_ignored():
    imap = core()
    pairs = b" ".join(b'"k%d" "v"' % i for i in range(ID_MAX_PAIRS + 1))
    assert replies(imap.receive_data(b"i ID (" + pairs + b")\r\n"))[-1] == b"i OK ID completed"
    assert imap.client_id is None
    pairs = b" ".join(b'"k%d" "v"' % i for i in range(ID_MAX_PAIRS))
    imap.receive_data(b"j ID (" + pairs + b")\r\n")
    assert imap.client_id is not None and len(imap.client_id) == ID_MAX_PAIRS


def test_id_value_longer_than_1024_octets_is_ignored():
    imap = core()
    imap.receive_data(b'i ID ("name" "' + b"v" * 1025 + b'")\r\n')
    assert imap.client_id is None
    imap.receive_data(b'i ID ("name" "' + b"v" * 1024 + b'")\r\n')
    assert imap.client_id == {"name": "v" * 1024}


def test_id_value_literal_with_line_break_is_ignored():
    imap = core()
    imap.receive_data(b'i ID ("name" {6+}\r\nx\r\ny Z)\r\n')
    assert imap.client_id is None


def test_id_with_oversized_literal_is_answered_ok_and_the_literal_skipped():
    imap = core()
    events = imap.receive_data(b'i ID ("name" {2000+}\r\n' + b"x" * 2000 + b")\r\nn NOOP\r\n")
    assert replies(events) == [
        b'* ID ("name" "apppass")',
        b"i OK ID completed",
        b"n OK NOOP completed",
    ]


# --- STARTTLS ---------------------------------------------------------------------------------


def test_starttls_replies_ok_then_asks_for_the_handshake():
    imap = core(tls=False, starttls=True)
    events = imap.receive_data(b"s STARTTLS\r\n")
    assert events == [Send(b"s OK Begin TLS negotiation now\r\n"), StartTLS()]


def test_starttls_discards_commands_pipelined_in_the_same_data():
    """CVE-2011-0411: a man in the middle appends commands after the client's STARTTLS."""
    imap = core(tls=False, starttls=True, plaintext=True)
    events = imap.receive_data(b"s STARTTLS\r\nevil LOGIN victim secret\r\nx NOOP\r\n")
    assert events == [Send(b"s OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert imap.buffered == 0
    imap.tls_started()
    assert replies(imap.receive_data(b"c NOOP\r\n")) == [b"c OK NOOP completed"]


def test_starttls_discards_a_partial_line_buffered_before_it_and_input_before_the_handshake():
    imap = core(tls=False, starttls=True, plaintext=True)
    assert imap.receive_data(b"s STARTTLS\r\nevil LOG") == [
        Send(b"s OK Begin TLS negotiation now\r\n"),
        StartTLS(),
    ]
    assert imap.receive_data(b"IN victim secret\r\n") == []  # plaintext before the handshake
    imap.tls_started()
    assert replies(imap.receive_data(b"c NOOP\r\n")) == [b"c OK NOOP completed"]


def test_after_tls_capabilities_drop_starttls_and_gain_mechanisms():
    imap = core(tls=False, starttls=True)
    imap.receive_data(b"s STARTTLS\r\n")
    imap.tls_started()
    assert replies(imap.receive_data(b"c CAPABILITY\r\n"))[0] == f"* CAPABILITY {TLS_CAPS}".encode()
    assert authenticates(imap.receive_data(b"l LOGIN user pass\r\n"))


def test_starttls_forgets_the_id_sent_in_the_clear():
    imap = core(tls=False, starttls=True)
    imap.receive_data(b'i ID ("x-originating-ip" "10.0.0.1")\r\n')
    assert imap.client_id == {"x-originating-ip": "10.0.0.1"}
    imap.receive_data(b"s STARTTLS\r\n")
    assert imap.client_id is None


def test_starttls_when_tls_is_active_gets_bad():
    events = core(tls=True, starttls=True).receive_data(b"s STARTTLS\r\n")
    assert replies(events) == [b"s BAD TLS is already active"]
    assert not any(isinstance(e, StartTLS) for e in events)


def test_starttls_when_not_available_gets_bad():
    events = core(tls=False, starttls=False).receive_data(b"s STARTTLS\r\n")
    assert replies(events) == [b"s BAD STARTTLS is not available here"]
    assert not any(isinstance(e, StartTLS) for e in events)


# --- LOGIN ------------------------------------------------------------------------------------


def test_login_with_atoms_asks_the_authenticator():
    events = core().receive_data(b"l LOGIN alice@example.org Abcd-Efgh-Jkmn-Pqrs\r\n")
    assert events == [
        Authenticate(Credentials("alice@example.org", "Abcd-Efgh-Jkmn-Pqrs"), "LOGIN")
    ]


def test_login_with_quoted_strings_unescapes_quote_and_backslash():
    events = core().receive_data(b'l LOGIN "al ice" "p\\"a\\\\ss w(o)rd{1}"\r\n')
    assert authenticates(events)[0].credentials == Credentials("al ice", 'p"a\\ss w(o)rd{1}')


def test_login_with_utf8_quoted_user_name():
    events = core().receive_data('l LOGIN "jürgen" "pw"\r\n'.encode())
    assert authenticates(events)[0].credentials == Credentials("jürgen", "pw")


def test_login_with_synchronizing_literal_gets_continuation():
    imap = core()
    assert replies(imap.receive_data(b"l LOGIN {5}\r\n")) == [b"+ Ready for literal data"]
    events = imap.receive_data(b'alice "secret"\r\n')
    assert authenticates(events)[0].credentials == Credentials("alice", "secret")


def test_login_with_non_synchronizing_literal_gets_no_continuation():
    imap = core()
    assert imap.receive_data(b"l LOGIN alice {6+}\r\n") == []
    events = imap.receive_data(b"sec\r\nt\r\n")
    assert events == [Authenticate(Credentials("alice", "sec\r\nt"), "LOGIN")]


def test_login_with_both_arguments_as_literals():
    imap = core()
    events = imap.receive_data(b"l LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
    assert replies(events) == [b"+ Ready for literal data"] * 2
    assert authenticates(events)[0].credentials == Credentials("alice", "secret")


def test_login_with_an_empty_literal_password():
    events = core().receive_data(b"l LOGIN alice {0+}\r\n\r\n")
    assert authenticates(events)[0].credentials == Credentials("alice", "")


@pytest.mark.parametrize(
    "args", [b"", b"alice", b"alice secret extra", b"(alice) secret", b"alice NIL)"]
)
def test_login_with_wrong_arguments_gets_bad(args):
    events = core().receive_data(b"l LOGIN " + args + b"\r\n")
    assert replies(events) == [b"l BAD LOGIN expects a user name and a password"]
    assert not authenticates(events)


@pytest.mark.parametrize(
    "args",
    [
        b'"alice secret',
        b'alice "se\\cret"',
        b"alice pa{5}",
        b"alice p\x01w",
        b"alice p\xc3\xa4ss",
        b"alice se\rcret",
    ],
)
def test_login_with_bad_syntax_gets_bad(args):
    events = core().receive_data(b"l LOGIN " + args + b"\r\n")
    assert replies(events)[0].startswith(b"l BAD ")
    assert not authenticates(events)


@pytest.mark.parametrize(
    "literal",
    [b"ali\x00ce", b"ali\rce", b"ali\nce", b"ali\x1bce", b"ali\x7fce", "ali\u0085ce".encode()],
)
def test_login_name_with_control_characters_is_refused_before_any_lookup(literal):
    imap = core()
    events = imap.receive_data(b"l LOGIN {%d+}\r\n%s secret\r\n" % (len(literal), literal))
    assert replies(events) == [b"l NO [AUTHENTICATIONFAILED] Authentication failed."]
    assert not authenticates(events)
    assert imap.failures == 1


def test_quoted_login_name_with_control_character_is_refused():
    events = core().receive_data(b'l LOGIN "ali\x01ce" secret\r\n')
    assert replies(events) == [b"l NO [AUTHENTICATIONFAILED] Authentication failed."]
    assert not authenticates(events)


def test_login_not_in_utf8_is_refused_as_a_failure():
    imap = core()
    events = imap.receive_data(b"l LOGIN {2+}\r\n\xff\xfe secret\r\n")
    assert replies(events) == [b"l NO [AUTHENTICATIONFAILED] Authentication failed."]
    assert imap.failures == 1


def test_login_name_longer_than_255_characters_is_refused():
    events = core().receive_data(b"l LOGIN " + b"a" * 256 + b" secret\r\n")
    assert replies(events) == [b"l NO [AUTHENTICATIONFAILED] Authentication failed."]


def test_login_without_tls_is_refused_with_privacyrequired():
    imap = core(tls=False, starttls=True)
    events = imap.receive_data(b"l LOGIN alice secret\r\n")
    assert replies(events) == [
        b"l NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS."
    ]
    assert not authenticates(events)


def test_login_literal_without_tls_is_refused_before_any_continuation():
    imap = core(tls=False, starttls=True)
    events = imap.receive_data(b"l LOGIN {5}\r\n")
    assert replies(events) == [
        b"l NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS."
    ]
    assert replies(imap.receive_data(b"n NOOP\r\n")) == [b"n OK NOOP completed"]


def test_login_non_synchronizing_literals_without_tls_are_skipped_unread():
    imap = core(tls=False, starttls=True)
    events = imap.receive_data(b"l LOGIN {5+}\r\nalice {8+}\r\nx LOGOUT\r\nn NOOP\r\n")
    assert replies(events) == [
        b"l NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS.",
        b"n OK NOOP completed",
    ]


def test_authenticate_without_tls_is_refused_with_privacyrequired():
    imap = core(tls=False, starttls=True)
    events = imap.receive_data(b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert replies(events) == [
        b"a NO [PRIVACYREQUIRED] Plaintext authentication is not allowed without TLS."
    ]
    assert not authenticates(events)


def test_plaintext_login_is_allowed_when_configured():
    events = core(tls=False, plaintext=True).receive_data(b"l LOGIN alice secret\r\n")
    assert authenticates(events)


# --- Literal limits ---------------------------------------------------------------------------


def test_oversized_synchronizing_literal_is_refused_without_continuation():
    imap = core()
    events = imap.receive_data(b"l LOGIN alice {%d}\r\n" % (MAX_LITERAL + 1))
    assert replies(events) == [b"l BAD [TOOBIG] Literal too big"]
    assert any(isinstance(e, Failed) for e in events)
    # the client does not send the literal; its next line is a new command
    assert replies(imap.receive_data(b"n NOOP\r\n")) == [b"n OK NOOP completed"]


def test_literal_of_exactly_max_literal_octets_is_accepted():
    imap = core()
    events = imap.receive_data(
        b"l LOGIN alice {%d+}\r\n" % MAX_LITERAL + b"p" * MAX_LITERAL + b"\r\n"
    )
    assert authenticates(events)[0].credentials.secret == "p" * MAX_LITERAL


def test_oversized_non_synchronizing_literal_is_skipped_without_buffering():
    imap = core()
    size = 1_000_000
    events = imap.receive_data(b"l LOGIN alice {%d+}\r\n" % size)
    assert replies(events) == [b"l BAD [TOOBIG] Literal too big"]
    payload = (b"x LOGOUT\r\n" * (size // 10 + 1))[:size]
    for i in range(0, size, 65536):
        assert imap.receive_data(payload[i : i + 65536]) == []
        assert imap.buffered == 0
    events = imap.receive_data(b" trailing words\r\nn NOOP\r\n")
    assert replies(events) == [b"n OK NOOP completed"]


def test_literal_in_a_command_that_takes_none_is_refused_and_skipped():
    imap = core()
    events = imap.receive_data(b"a APPEND INBOX {11+}\r\nx LOGOUT\r\n\r\nn NOOP\r\n")
    assert replies(events) == [
        b"a BAD Unknown command or not allowed before login",
        b"n OK NOOP completed",
    ]


def test_literal_marker_in_a_known_command_without_arguments_is_refused():
    events = core().receive_data(b"a NOOP {3}\r\n")
    assert replies(events) == [b"a BAD Unexpected literal"]


def test_login_with_more_than_two_literals_gets_bad():
    imap = core()
    events = imap.receive_data(b"l LOGIN {1+}\r\na {1+}\r\nb {1}\r\n")
    assert replies(events) == [b"l BAD Too many literals"]
    assert replies(imap.receive_data(b"n NOOP\r\n")) == [b"n OK NOOP completed"]


# --- AUTHENTICATE -----------------------------------------------------------------------------


def test_authenticate_plain_with_initial_response():
    events = core().receive_data(b"a AUTHENTICATE PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert events == [Authenticate(Credentials("alice", "secret"), "PLAIN")]


def test_authenticate_plain_without_initial_response_sends_empty_challenge():
    imap = core()
    assert replies(imap.receive_data(b"a AUTHENTICATE PLAIN\r\n")) == [b"+ "]
    events = imap.receive_data(b64(b"\0alice\0secret") + b"\r\n")
    assert authenticates(events)[0].credentials == Credentials("alice", "secret")


def test_authenticate_login_prompts_for_username_then_password():
    imap = core()
    assert replies(imap.receive_data(b"a AUTHENTICATE LOGIN\r\n")) == [b"+ VXNlcm5hbWU6"]
    assert replies(imap.receive_data(b64(b"alice") + b"\r\n")) == [b"+ UGFzc3dvcmQ6"]
    events = imap.receive_data(b64(b"secret") + b"\r\n")
    assert events == [Authenticate(Credentials("alice", "secret"), "LOGIN")]


def test_authenticate_login_with_initial_response_skips_the_username_prompt():
    imap = core()
    assert replies(imap.receive_data(b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n")) == [
        b"+ UGFzc3dvcmQ6"
    ]
    assert authenticates(imap.receive_data(b64(b"secret") + b"\r\n"))


def test_authenticate_mechanism_name_is_case_insensitive():
    events = core().receive_data(b"a authenticate plain " + b64(b"\0alice\0secret") + b"\r\n")
    assert authenticates(events)


def test_authenticate_equals_sign_is_an_empty_initial_response_not_a_missing_one():
    events = core().receive_data(b"a AUTHENTICATE PLAIN =\r\n")
    assert replies(events) == [b"a BAD Invalid authentication data"]  # empty PLAIN message
    events = core().receive_data(b"a AUTHENTICATE LOGIN =\r\n")
    assert replies(events) == [b"a BAD Invalid authentication data"]  # empty user name


def test_authenticate_is_cancelled_by_a_star_line():
    imap = core()
    imap.receive_data(b"a AUTHENTICATE LOGIN\r\n")
    events = imap.receive_data(b"*\r\n")
    assert replies(events) == [b"a BAD Authentication cancelled"]
    assert replies(imap.receive_data(b"n NOOP\r\n")) == [b"n OK NOOP completed"]


@pytest.mark.parametrize(
    "response", [b"not base64!", b"AHVzZXI", b"\xff\xfe", b64(b"only-one-part"), b64(b"\0\0secret")]
)
def test_authenticate_with_malformed_response_gets_bad(response):
    imap = core()
    imap.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    events = imap.receive_data(response + b"\r\n")
    assert replies(events) == [b"a BAD Invalid authentication data"]
    assert any(isinstance(e, Failed) for e in events)
    assert not authenticates(events)


def test_authenticate_plain_for_another_identity_is_refused_with_authorizationfailed():
    imap = core()
    events = imap.receive_data(b"a AUTHENTICATE PLAIN " + b64(b"bob\0alice\0secret") + b"\r\n")
    assert replies(events) == [b"a NO [AUTHORIZATIONFAILED] Authorization identity refused"]
    assert not authenticates(events)
    assert imap.failures == 1


def test_authenticate_plain_with_authzid_equal_to_authcid_is_accepted():
    events = core().receive_data(b"a AUTHENTICATE PLAIN " + b64(b"alice\0alice\0secret") + b"\r\n")
    assert authenticates(events)[0].credentials == Credentials("alice", "secret")


def test_authenticate_plain_with_control_characters_in_login_is_refused():
    imap = core()
    events = imap.receive_data(b"a AUTHENTICATE PLAIN " + b64(b"\0ali\nce\0secret") + b"\r\n")
    assert replies(events) == [b"a NO [AUTHENTICATIONFAILED] Authentication failed."]
    assert not authenticates(events)


def test_authenticate_with_unsupported_mechanism_gets_no():
    events = core().receive_data(b"a AUTHENTICATE CRAM-MD5\r\n")
    assert replies(events) == [b"a NO Unsupported authentication mechanism"]


@pytest.mark.parametrize("args", [b"", b"PLAIN a b", b'"PLAIN"', b"(PLAIN)"])
def test_authenticate_with_wrong_arguments_gets_bad(args):
    events = core().receive_data(b"a AUTHENTICATE " + args + b"\r\n")
    assert replies(events)[0].startswith(b"a BAD ")


def test_authenticate_response_line_too_long_gets_bad():
    imap = core(max_line=64)
    imap.receive_data(b"a AUTHENTICATE PLAIN\r\n")
    events = imap.receive_data(b"A" * 100 + b"\r\nn NOOP\r\n")
    assert replies(events) == [b"a BAD Authentication response too long", b"n OK NOOP completed"]


# --- Outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal, code",
    [
        (Refusal.CREDENTIALS, b"[AUTHENTICATIONFAILED]"),
        (Refusal.EXPIRED, b"[EXPIRED]"),
        (Refusal.FORBIDDEN, b"[AUTHORIZATIONFAILED]"),
        (Refusal.PRIVACY, b"[PRIVACYREQUIRED]"),
        (Refusal.TEMPORARY, b"[UNAVAILABLE]"),
        (Refusal.LIMIT, b"[UNAVAILABLE]"),
    ],
)
def test_auth_failed_maps_each_refusal_to_its_response_code(refusal, code):
    imap = core()
    imap.receive_data(b"l LOGIN alice secret\r\n")
    (line,) = replies(imap.auth_failed(refusal))
    assert line.startswith(b"l NO " + code + b" ")


def test_failed_logins_close_the_connection_after_max_failures():
    imap = core()
    for i in range(MAX_FAILURES - 1):
        imap.receive_data(b"l%d LOGIN alice wrong\r\n" % i)
        assert not closes(imap.auth_failed(Refusal.CREDENTIALS))
    imap.receive_data(b"last LOGIN alice wrong\r\n")
    events = imap.auth_failed(Refusal.CREDENTIALS)
    assert replies(events) == [
        b"last NO [AUTHENTICATIONFAILED] Authentication failed.",
        b"* BYE Too many invalid authentication attempts",
    ]
    assert events[-1] == Close("too many failed logins")
    assert imap.receive_data(b"n NOOP\r\n") == []


def test_invalid_login_names_count_as_failed_logins():
    imap = core(max_failures=2)
    events = imap.receive_data(b'a LOGIN "x\x01" p\r\nb LOGIN "y\x02" p\r\nc NOOP\r\n')
    assert replies(events)[-1] == b"* BYE Too many invalid authentication attempts"
    assert closes(events)


def test_input_while_authenticating_is_held_then_parsed_after_failure():
    imap = core()
    events = imap.receive_data(b"l LOGIN alice wrong\r\nn NOOP\r\nm LOGIN alice right\r\n")
    assert [type(e) for e in events] == [Authenticate]
    assert imap.receive_data(b"o NOOP\r\n") == []
    events = imap.auth_failed(Refusal.CREDENTIALS)
    assert replies(events) == [
        b"l NO [AUTHENTICATIONFAILED] Authentication failed.",
        b"n OK NOOP completed",
    ]
    assert authenticates(events)[0].credentials == Credentials("alice", "right")
    assert replies(imap.auth_failed(Refusal.TEMPORARY)) == [
        b"m NO [UNAVAILABLE] Temporary authentication failure, try again later.",
        b"o OK NOOP completed",
    ]


def test_auth_succeeded_replies_with_the_upstream_capabilities():
    imap = core()
    imap.receive_data(b"l LOGIN alice secret\r\n")
    assert imap.auth_succeeded("IMAP4rev1 IDLE UIDPLUS") == [
        Send(b"l OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS] Logged in\r\n")
    ]


def test_take_pending_returns_what_the_client_sent_after_its_login_command():
    imap = core()
    imap.receive_data(b"l LOGIN alice {6}\r\nsecret\r\ns SELECT INBOX\r\nf FETCH 1:")
    assert imap.receive_data(b"* FLAGS\r\n") == []
    imap.auth_succeeded("IMAP4rev1")
    assert imap.receive_data(b"i IDLE\r\n") == []
    assert imap.take_pending() == b"s SELECT INBOX\r\nf FETCH 1:* FLAGS\r\ni IDLE\r\n"
    assert imap.take_pending() == b""


def test_take_pending_before_success_is_a_bug():
    imap = core()
    with pytest.raises(RuntimeError):
        imap.take_pending()
    imap.receive_data(b"l LOGIN alice secret\r\nn NOOP\r\n")
    with pytest.raises(RuntimeError):
        imap.take_pending()


def test_take_pending_after_close_gives_nothing():
    imap = core()
    imap.receive_data(b"l LOGIN alice secret\r\nn NOOP\r\n")
    imap.login_timeout()
    assert imap.auth_succeeded("IMAP4rev1") == []
    assert imap.take_pending() == b""


def test_input_held_while_authenticating_is_bounded():
    imap = core()
    events = imap.receive_data(b"l LOGIN alice secret\r\n" + b"n NOOP\r\n" * (MAX_PENDING // 8))
    assert authenticates(events)
    assert not closes(events)
    events = imap.receive_data(b"n NOOP\r\n")
    assert replies(events) == [b"* BYE Too much input before login completed"]
    assert closes(events)
    assert imap.buffered == 0
    assert imap.auth_failed(Refusal.CREDENTIALS) == []  # too late: ignored
    assert imap.auth_succeeded("IMAP4rev1") == []


def test_auth_results_without_an_outstanding_login_are_bugs():
    imap = core()
    with pytest.raises(RuntimeError):
        imap.auth_failed(Refusal.CREDENTIALS)
    with pytest.raises(RuntimeError):
        imap.auth_succeeded("IMAP4rev1")


# --- Bounds -----------------------------------------------------------------------------------


def test_line_too_long_gets_bad_and_a_failed_event():
    imap = core()
    events = imap.receive_data(b"a LOGIN alice " + b"x" * MAX_LINE + b"\r\nn NOOP\r\n")
    assert replies(events) == [b"* BAD Command line too long", b"n OK NOOP completed"]
    assert Failed("line too long") in events


def test_line_too_long_is_reported_before_its_end_arrives():
    imap = core(max_line=64)
    events = imap.receive_data(b"a NOOP " + b"x" * 100)
    assert replies(events) == [b"* BAD Command line too long"]
    assert imap.buffered == 0
    assert imap.receive_data(b"x" * 1000) == []
    assert replies(imap.receive_data(b"\r\nn NOOP\r\n")) == [b"n OK NOOP completed"]


def test_command_whose_lines_together_are_too_long_gets_bad():
    imap = core(max_line=32, max_literal=8)
    events = imap.receive_data(b"i ID (" + b'"k" {1+}\r\nv ' * 12 + b")\r\n")
    assert replies(events)[-1] == b"i OK ID completed"  # ID is never BAD
    assert imap.client_id is None
    events = imap.receive_data(
        b"l LOGIN {1+}\r\na" + b" " * 20 + b"{1+}\r\nb" + b" " * 20 + b"\r\n"
    )
    assert replies(events)[0] == b"l BAD [TOOBIG] Command too long"


def test_too_many_bad_commands_say_bye_and_close():
    imap = core()
    events = imap.receive_data(b"a FOO\r\n" * MAX_ERRORS + b"n NOOP\r\n")
    assert replies(events)[-1] == b"* BYE Too many invalid commands"
    assert replies(events).count(b"a BAD Unknown command or not allowed before login") == MAX_ERRORS
    assert events[-1] == Close("too many errors")


def test_too_many_commands_before_login_say_bye_and_close():
    imap = core()
    events = imap.receive_data(b"n NOOP\r\n" * (MAX_COMMANDS + 5))
    assert replies(events).count(b"n OK NOOP completed") == MAX_COMMANDS
    assert replies(events)[-1] == b"* BYE Too many commands before login"
    assert events[-1] == Close("too many commands")


def test_login_timeout_says_bye_and_closes():
    imap = core()
    imap.receive_data(b"a NOOP\r\nb LOG")
    assert imap.login_timeout() == [Send(b"* BYE Login timed out\r\n"), Close("login timeout")]
    assert imap.receive_data(b"IN a b\r\n") == []
    assert imap.login_timeout() == []


def test_login_timeout_after_login_does_nothing():
    imap = core()
    imap.receive_data(b"l LOGIN alice secret\r\n")
    imap.auth_succeeded("IMAP4rev1")
    assert imap.login_timeout() == []


def test_limits_are_named_constants_with_sane_defaults():
    limits = ImapLimits()
    assert (
        limits.max_line,
        limits.max_literal,
        limits.max_commands,
        limits.max_failures,
        limits.max_errors,
        limits.max_pending,
    ) == (MAX_LINE, MAX_LITERAL, MAX_COMMANDS, MAX_FAILURES, MAX_ERRORS, MAX_PENDING)
    assert limits.max_literal >= 4 * 255  # any valid login name fits a literal


@pytest.mark.parametrize(
    "field",
    ["max_line", "max_literal", "max_commands", "max_failures", "max_errors", "max_pending"],
)
def test_limits_must_be_positive(field):
    with pytest.raises(ValueError):
        ImapLimits(**{field: 0})


def test_secrets_are_not_in_any_reply_or_failure():
    imap = core(tls=False, starttls=True)
    events = drive(
        imap,
        [
            b"l LOGIN alice Sup3rSecret\r\n",
            b"a AUTHENTICATE PLAIN " + b64(b"bob\0alice\0Sup3rSecret") + b"\r\n",
        ],
    )
    assert b"Sup3rSecret" not in b"".join(replies(events))
    assert not any("Sup3rSecret" in repr(e) for e in events)


# --- Byte at a time and properties ------------------------------------------------------------

SESSION = (
    b"a1 CAPABILITY\r\n"
    b'a2 ID ("name" "Mail" "version" {3}\r\n1.0)\r\n'
    b"a3 SELECT INBOX\r\n"
    b'a4 LOGIN "alice" {5+}\r\nwrong\r\n'
    b"a5 AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"pass word") + b"\r\n"
    b"a6 AUTHENTICATE PLAIN\r\n*\r\n"
    b"a7 APPEND INBOX {4+}\r\nabcd\r\n"
    b"a8 NOOP\r\n"
)


def test_byte_at_a_time_feeding_gives_the_same_events_as_one_chunk():
    whole = drive(core(), [SESSION])
    one_by_one = drive(core(), [SESSION[i : i + 1] for i in range(len(SESSION))])
    assert one_by_one == whole
    assert replies(whole)[-1] == b"a8 OK NOOP completed"
    assert [a.credentials for a in authenticates(whole)] == [
        Credentials("alice", "wrong"),
        Credentials("alice", "pass word"),
    ]


_TAGGED = [
    b"CAPABILITY\r\n",
    b"noop\r\n",
    b"NOOP\r\n",
    b'ID ("name" "x" "version" "1")\r\n',
    b"ID NIL\r\n",
    b'ID ("name" {2}\r\nab)\r\n',
    b"SELECT INBOX\r\n",
    b"LOGIN user pass\r\n",
    b'LOGIN "us\\"er" "pa ss"\r\n',
    b"LOGIN {4}\r\nuser {4+}\r\npass\r\n",
    b"LOGIN {4+}\r\nuser {2000}\r\n",
    b"LOGIN user {5000+}\r\n" + b"z\r\n" * 2500 + b" x\r\n",
    b"AUTHENTICATE PLAIN " + b64(b"\0user\0pass") + b"\r\n",
    b"AUTHENTICATE PLAIN\r\n" + b64(b"\0user\0pass") + b"\r\n",
    b"AUTHENTICATE LOGIN\r\n" + b64(b"user") + b"\r\n" + b64(b"pass") + b"\r\n",
    b"AUTHENTICATE PLAIN\r\n*\r\n",
    b"AUTHENTICATE PLAIN !!\r\n",
    b"AUTHENTICATE X\r\n",
    b"LOGIN\r\n",
    b'LOGIN "x\r\n',
    b"APPEND INBOX {3+}\r\nabc\r\n",
    b"LOGOUT\r\n",
]
_UNTAGGED = [b"\r\n", b"+ NOOP\r\n", b"x" * 9000 + b"\r\n"]


@st.composite
def command_streams(draw):
    parts = []
    for i, kind in enumerate(
        draw(st.lists(st.integers(0, len(_TAGGED) + len(_UNTAGGED) - 1), max_size=12))
    ):
        if kind < len(_TAGGED):
            parts.append(b"t%d " % i + _TAGGED[kind])
        else:
            parts.append(_UNTAGGED[kind - len(_TAGGED)])
    return b"".join(parts)


# Counting limits high enough to see long streams through; max_pending too, since input held
# during a login depends on when the answer comes, which no split of the input can decide.
_GENEROUS = {"max_commands": 1000, "max_failures": 1000, "max_errors": 1000, "max_pending": 1 << 20}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=command_streams(), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_any_split_of_a_command_stream_gives_the_same_events(stream, cuts):
    whole = drive(core(**_GENEROUS), [stream])
    assert drive(core(**_GENEROUS), split_at(stream, cuts)) == whole


_LOGIN_CHARS = st.characters(blacklist_categories=("Cc", "Cs"))
_ATOM_OK = set(range(0x21, 0x7F)) - set(b'(){"\\')


def _encode(value: str, how: str) -> tuple[bytes, int]:
    """One LOGIN argument in the given encoding, and how many continuations it expects."""
    raw = value.encode("utf-8")
    if how == "atom" and raw and all(b in _ATOM_OK for b in raw):
        return raw, 0
    if how in ("atom", "quoted") and b"\r" not in raw and b"\n" not in raw:
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"', 0
    if how == "literal+":
        return b"{%d+}\r\n" % len(raw) + raw, 0
    return b"{%d}\r\n" % len(raw) + raw, 1


@settings(max_examples=300, deadline=None)
@given(
    login=st.text(_LOGIN_CHARS, min_size=1, max_size=255),
    secret=st.text(st.characters(blacklist_categories=("Cs",)), max_size=64),
    how_login=st.sampled_from(["atom", "quoted", "literal", "literal+"]),
    how_secret=st.sampled_from(["atom", "quoted", "literal", "literal+"]),
)
def test_login_arguments_round_trip_into_the_same_credentials(login, secret, how_login, how_secret):
    user, waits_user = _encode(login, how_login)
    password, waits_secret = _encode(secret, how_secret)
    events = core().receive_data(b"l LOGIN " + user + b" " + password + b"\r\n")
    assert replies(events) == [b"+ Ready for literal data"] * (waits_user + waits_secret)
    assert events[-1] == Authenticate(Credentials(login, secret), "LOGIN")


@settings(max_examples=200, deadline=None)
@given(
    login=st.text(_LOGIN_CHARS, min_size=1, max_size=60),
    secret=st.text(
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=60
    ),
    initial=st.booleans(),
    mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
)
def test_sasl_arguments_round_trip_into_the_same_credentials(login, secret, initial, mechanism):
    if mechanism == "PLAIN":
        responses = [b64(b"\0" + login.encode() + b"\0" + secret.encode())]
    else:
        responses = [b64(login.encode()), b64(secret.encode()) or b"="]
    imap = core()
    first = b"a AUTHENTICATE " + mechanism.encode()
    if initial:
        first += b" " + responses.pop(0)
    events = imap.receive_data(first + b"\r\n" + b"".join(r + b"\r\n" for r in responses))
    assert events[-1] == Authenticate(Credentials(login, secret), mechanism)


_FRAGMENTS = [
    b"a ",
    b"LOGIN ",
    b"ID ",
    b"AUTHENTICATE PLAIN",
    b"AUTHENTICATE LOGIN",
    b"NOOP",
    b"STARTTLS",
    b"LOGOUT",
    b"{3}",
    b"{4+}",
    b"{99999+}",
    b"{0}",
    b"\r\n",
    b"\n",
    b'"',
    b"\\",
    b" ",
    b"(",
    b")",
    b"NIL",
    b"*",
    b"=",
    b"AHVAcA==",
    b"x" * 40,
    b"\x00",
    b"\xff",
    b"+",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=200),
            st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(b"".join),
        ),
        max_size=20,
    ),
    tls=st.booleans(),
    outcome=st.sampled_from([None, *Refusal]),
)
def test_arbitrary_bytes_never_raise_and_never_exceed_the_bounds(chunks, tls, outcome):
    limits = ImapLimits(
        max_line=64,
        max_literal=16,
        max_pending=100,
        max_commands=40,
        max_errors=30,
        max_failures=10,
    )
    imap = ImapCore(tls_active=tls, starttls_available=True, plaintext_auth=False, limits=limits)
    for chunk in chunks:
        events = imap.receive_data(chunk)
        replies(events)  # each Send is one CRLF-terminated line
        assert imap.buffered <= limits.max_buffered
        if imap.state == "starting-tls":
            imap.tls_started()
        while imap.state == "authenticating":
            if outcome is None:
                replies(imap.auth_succeeded("IMAP4rev1"))
            else:
                replies(imap.auth_failed(outcome))
            assert imap.buffered <= limits.max_buffered
        if imap.state == "logged-in":
            imap.take_pending()
    assert imap.commands <= limits.max_commands + 1
    assert imap.errors <= limits.max_errors and imap.failures <= limits.max_failures
