"""Specification of the SMTP upstream login (proxy/smtp/upstream.py): what goes to Postfix.

The upstream is an in-memory connection fed with Postfix's replies; the test reads the XCLIENT
line the login sent. Every value in it must stay one printable word, whatever the directory's
upstream identity or the client's HELO: otherwise a value could add attributes or commands to
the proxy's trusted session.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.commands import Hello
from proxy.config import Upstream
from proxy.protocols import MailProtocol, TlsMode, UpstreamLogin
from proxy.smtp.upstream import login, xtext
from proxy.upstream import LoginRequest, UpstreamConnection

POSTFIX = (
    b"220 mx ESMTP Postfix\r\n"
    b"250-mx\r\n250-PIPELINING\r\n250 XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n"
    b"220 mx ESMTP Postfix\r\n"
    b"250-mx\r\n250 PIPELINING\r\n"
)
# The scripted Postfix speaks in clear text (an upstream is STARTTLS unless told otherwise).
SETTINGS = Upstream(
    MailProtocol.SMTP, "192.0.2.1", 25, tls=TlsMode.NONE, login=UpstreamLogin.XCLIENT
)


def xclient_line(identity: str, helo: str | None, client_ip: str = "198.51.100.7") -> bytes:
    """The XCLIENT line a login sends for this identity and client HELO."""
    transport = StringTransport()
    conn = UpstreamConnection(SETTINGS, Clock())
    conn.makeConnection(transport)
    conn.dataReceived(POSTFIX)
    request = LoginRequest(identity, client_ip, 50123, "s1", Hello(helo, True) if helo else None)
    d = defer.ensureDeferred(login(conn, SETTINGS, request))
    results: list = []
    d.addBoth(results.append)
    assert results and not isinstance(results[0], Exception), results
    (line,) = [x for x in transport.value().split(b"\r\n") if x.startswith(b"XCLIENT ")]
    return line


def attributes(line: bytes) -> dict[str, str]:
    """XCLIENT's attributes, xtext-decoded as Postfix decodes them (RFC 3461 §4)."""
    out = {}
    for word in line.split(b" ")[1:]:
        name, _, value = word.partition(b"=")
        assert re.fullmatch(rb"[!-~]+", value) and b"=" not in value, word
        out[name.decode()] = re.sub(
            rb"\+([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), value
        ).decode()
    return out


def test_constants_go_as_they_are():
    line = xclient_line("alice@example.org", None, client_ip="unix socket")
    assert attributes(line) == {
        "NAME": "[UNAVAILABLE]",
        "ADDR": "[UNAVAILABLE]",
        "PORT": "50123",
        "PROTO": "SMTP",
        "HELO": "[UNAVAILABLE]",
        "LOGIN": "alice@example.org",
    }
    assert b" HELO=[UNAVAILABLE] " in line
    assert xtext("[TEMPUNAVAIL]") == "[TEMPUNAVAIL]"


@pytest.mark.parametrize(
    "identity",
    [
        "[x\r\nMAIL FROM:<ceo@example.org>",  # a command in the proxy's trusted session
        "[x ADDR=10.0.0.1 LOGIN=bob@example.org",  # attributes of the attacker's choosing
    ],
)
def test_an_identity_that_starts_with_a_bracket_is_encoded_too(identity):
    line = xclient_line(identity, "client.example.org")
    assert b"\r" not in line and b"\n" not in line
    assert attributes(line)["LOGIN"] == identity
    assert line.count(b"LOGIN=") == 1 and line.count(b"ADDR=") == 1


def test_a_helo_address_literal_is_encoded():
    line = xclient_line("alice", "[x+y=z]")
    assert b" HELO=[x+2By+3Dz] " in line
    assert attributes(line)["HELO"] == "[x+y=z]"


# What a client may say in EHLO (the core takes one printable word) and what a directory may
# hold: anything at all.
HELO = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
IDENTITY = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1)


@given(identity=IDENTITY, helo=HELO)
def test_any_identity_and_helo_round_trip_through_xtext_as_one_printable_word(identity, helo):
    line = xclient_line(identity, helo)
    assert re.fullmatch(rb"XCLIENT( [A-Z]+=[!-~]+)+", line), line
    attrs = attributes(line)
    assert sorted(attrs) == ["ADDR", "HELO", "LOGIN", "NAME", "PORT", "PROTO"]
    assert (attrs["LOGIN"], attrs["HELO"]) == (identity, helo)
