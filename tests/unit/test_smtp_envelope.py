"""Specification of how the command watch reads MAIL FROM and RCPT TO (proxy/smtp/envelope.py),
and of the sending policy's rules (proxy/codes/sending.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.codes.sending import SendingPolicy, own_addresses, policy, resolve, sender_problem
from proxy.smtp.envelope import Mailbox, mail_from, rcpt_to


@pytest.mark.parametrize(
    "line,box",
    [
        (b"MAIL FROM:<scanner@Example.ORG>", Mailbox("scanner", "example.org")),
        (
            b"mail from: <scanner@example.org> SIZE=100 BODY=8BITMIME",
            Mailbox("scanner", "example.org"),
        ),
        (b"MAIL\tFROM:<>", Mailbox("", "")),
        (b'MAIL FROM:<"a>b c"@example.org>', Mailbox('"a>b c"', "example.org", quoted=True)),
        (b"MAIL FROM:<@relay.example:x@example.org>", Mailbox("x", "example.org", routed=True)),
        (
            b"MAIL FROM:<j\xc3\xb6rg@b\xc3\xbccher.example>",
            Mailbox("j\u00f6rg", "b\u00fccher.example"),
        ),
    ],
)
def test_a_reverse_path_is_read_exactly(line, box):
    assert mail_from(line) == box


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:scanner@example.org",  # no brackets: servers differ about what follows
        b"MAIL FROM:<scanner@example.org",
        b"MAIL FROM:<scanner@example.org>SIZE=1",
        b"MAIL FROM:< scanner@example.org>",
        b"MAIL FROM:<scan ner@example.org>",
        b"MAIL FROM:<a@b@example.org>",
        b"MAIL FROM:<scanner>",
        b"MAIL FROM:<@relay:>",
        b"MAIL FROM:<scanner@example.org\x00>",
        b"MAIL FROM:<\xff@example.org>",
        b"MAIL TO:<scanner@example.org>",
    ],
)
def test_a_reverse_path_that_cannot_be_read_exactly_is_none(line):
    assert mail_from(line) is None


def test_a_forward_path_is_read_and_the_null_path_is_not_one():
    assert rcpt_to(b"RCPT TO:<Boss@Example.org> NOTIFY=NEVER") == Mailbox("Boss", "example.org")
    assert rcpt_to(b"RCPT TO:<>") is None
    assert rcpt_to(b"RCPT TO:boss@example.org") is None


ATEXT = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
    min_size=1,
    max_size=20,
)
LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)


@settings(max_examples=300)
@given(
    local=st.lists(ATEXT, min_size=1, max_size=3).map(".".join),
    domain=st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    verb=st.sampled_from([b"MAIL FROM:", b"mail from: ", b"Mail  From:"]),
    params=st.sampled_from([b"", b" SIZE=10", b" BODY=8BITMIME SMTPUTF8"]),
)
def test_every_plain_address_is_read_as_written(local, domain, verb, params):
    line = verb + f"<{local}@{domain}>".encode() + params
    assert mail_from(line) == Mailbox(local, domain)


@settings(max_examples=500)
@given(rest=st.binary(max_size=60))
def test_reading_a_path_never_raises_and_a_read_one_was_in_brackets(rest):
    for line in (b"MAIL FROM:" + rest, b"RCPT TO:" + rest):
        box = mail_from(line) if line.startswith(b"MAIL") else rcpt_to(line)
        assert box is None or rest.lstrip(b" \t").startswith(b"<")


def test_own_addresses_are_the_names_that_are_addresses_and_the_identity():
    names = ("alice", "Alice@Example.org", "EXAMPLE\\alice", "smtp:alice.smith@example.org")
    assert own_addresses(names, "alice@example.org") == (
        "alice@example.org",
        "alice.smith@example.org",
    )


def test_a_policy_with_any_rule_and_no_sender_rule_sends_as_the_accounts_own_addresses():
    assert policy([], ["Example.ORG"], None) == SendingPolicy(("own",), ("example.org",), None)
    assert policy([], [], None) == SendingPolicy()
    assert not SendingPolicy().active
    assert policy(["*@Example.org", "own"], [], 10).describe() == (
        "as *@example.org, own addresses; to anyone; 10 messages a day"
    )


@pytest.mark.parametrize(
    "value,ok",
    [
        ("scanner@example.org", True),
        ("*@example.org", True),
        ("own", True),
        ("*", True),
        ("*@", False),
        ("scanner", False),
        ("a b@example.org", False),
        ("@example.org", False),
        ("scanner@example..org", False),
        ('"x"@example.org', False),
    ],
)
def test_sender_rules_are_addresses_domains_own_or_any(value, ok):
    assert (sender_problem(value) is None) == ok


def test_rules_allow_only_the_listed_senders_and_plain_recipients_in_listed_domains():
    rules = resolve(
        SendingPolicy(("own", "*@scan.example.org"), ("example.org",), 10),
        ("alice", "alice@example.org"),
        "alice",
    )
    assert rules is not None
    assert rules.sender_allowed("ALICE", "example.org", quoted=False, routed=False)
    assert rules.sender_allowed("any.one", "scan.example.org", quoted=False, routed=False)
    assert not rules.sender_allowed("bob", "example.org", quoted=False, routed=False)
    assert not rules.sender_allowed("", "", quoted=False, routed=False)  # the null sender
    assert not rules.sender_allowed("alice", "example.org", quoted=False, routed=True)
    assert rules.recipient_allowed("boss", "example.org", quoted=False, routed=False)
    assert not rules.recipient_allowed("boss", "example.com", quoted=False, routed=False)
    assert not rules.recipient_allowed("x%evil.com", "example.org", quoted=False, routed=False)
    assert not rules.recipient_allowed('"x"', "example.org", quoted=True, routed=False)
    assert resolve(SendingPolicy(), (), "alice") is None
