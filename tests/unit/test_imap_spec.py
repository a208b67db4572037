"""What apppass's IMAP lists before login: the upstream's pre-login capabilities, learned by a
probe (proxy/imap/spec.py, proxy/imap/upstream.py), or a listener's own list.

The upstream is an in-memory connection fed with a server's lines; the real Dovecot is in
tests/integration/test_imap_proxy.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from proxy.config import parse
from proxy.imap.spec import ImapSpec
from proxy.protocols import TlsMode
from proxy.upstream import UpstreamConnection, UpstreamError

DOVECOT = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
    b" LOGINDISABLED] Dovecot ready.\r\n"
    b"* CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS"
    b" LOGINDISABLED\r\n"
    b"C OK Pre-login capabilities listed, post-login capabilities have more.\r\n"
)


def settings(**listener):
    return parse(
        {
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "listeners": [
                {
                    "protocol": "imap",
                    "bind": "127.0.0.1:1143",
                    "tls": "none",
                    "plaintext_auth_from": ["127.0.0.0/8"],
                    **listener,
                }
            ],
            "upstream": {
                "imap": {
                    "host": "192.0.2.1",
                    "tls": "none",
                    "master_user": "proxy",
                    "master_password_file": __file__,
                }
            },
        },
        base_dir=Path(__file__).parent,
    )


def probe(spec: ImapSpec, lines: bytes) -> tuple[bytes, object]:
    """Run the probe against an upstream that says `lines`: (what it was sent, the outcome)."""
    transport = StringTransport()
    conn = UpstreamConnection(spec.upstream, Clock())
    conn.makeConnection(transport)
    conn.dataReceived(lines)
    outcome: list = []
    defer.ensureDeferred(spec.probe(conn)).addBoth(outcome.append)
    assert outcome, "the probe waits for more than the upstream said"
    return transport.value(), outcome[0]


def spec() -> ImapSpec:
    s = settings()
    assert s.upstreams["imap"].tls is TlsMode.NONE
    return ImapSpec(s.upstreams["imap"], max_failures=3)


def core_caps(spec: ImapSpec, *, tls: bool = False) -> str:
    core = spec.make_core(tls_active=tls, starttls_available=False, plaintext_auth=True)
    return core.capabilities()


def test_before_a_probe_only_apppasss_own_are_listed():
    assert core_caps(spec()) == "IMAP4rev1 SASL-IR LITERAL+ ID AUTH=PLAIN AUTH=LOGIN"


def test_the_probe_asks_capability_then_logs_out_and_lists_what_it_learned():
    imap = spec()
    sent, outcome = probe(imap, DOVECOT)
    assert outcome is None
    assert sent == b"C CAPABILITY\r\nQ LOGOUT\r\n"
    assert imap.advertised == ("LOGIN-REFERRALS", "ENABLE", "IDLE")
    # The upstream's LOGINDISABLED (it wants TLS from the proxy) is not the client's business.
    assert core_caps(imap) == (
        "IMAP4rev1 SASL-IR LITERAL+ ID LOGIN-REFERRALS ENABLE IDLE AUTH=PLAIN AUTH=LOGIN"
    )


def test_each_successful_probe_refreshes_the_list_and_a_failed_one_keeps_it():
    imap = spec()
    probe(imap, DOVECOT)
    _, outcome = probe(imap, b"* OK ready\r\n* CAPABILITY IMAP4rev1 IDLE NAMESPACE\r\nC OK\r\n")
    assert outcome is None and imap.advertised == ("IDLE", "NAMESPACE")
    _, outcome = probe(imap, b"* BYE too busy\r\n")
    assert isinstance(outcome.value, UpstreamError)
    assert imap.advertised == ("IDLE", "NAMESPACE")


@pytest.mark.parametrize(
    "lines,error",
    [
        (b"* PREAUTH hello\r\n", "pre-authenticated"),
        (b"* OK ready\r\nC OK\r\n", "no capabilities"),
        (b"* OK ready\r\n* BYE shutting down\r\n", "BYE"),
    ],
)
def test_a_probe_that_learns_nothing_is_an_upstream_error(lines, error):
    imap = spec()
    _, outcome = probe(imap, lines)
    assert isinstance(outcome.value, UpstreamError) and error in str(outcome.value)
    assert imap.advertised == ()


def test_a_listeners_own_list_replaces_the_upstreams():
    imap = spec()
    listener = settings(capabilities=["IMAP4rev1", "IDLE", "MOVE"]).listeners[0]
    own = imap.for_listener(listener)
    probe(imap, DOVECOT)
    assert own.advertised == ("IDLE", "MOVE")
    assert (
        core_caps(own, tls=True) == "IMAP4rev1 SASL-IR LITERAL+ ID IDLE MOVE AUTH=PLAIN AUTH=LOGIN"
    )
    assert imap.for_listener(settings().listeners[0]) is imap  # no list: the upstream's
    assert imap.advertised == ("LOGIN-REFERRALS", "ENABLE", "IDLE")
    nothing = imap.for_listener(settings(capabilities=[]).listeners[0])
    assert nothing.advertised == ()
