"""The sandbox upstream of `apppass demo` without a socket: SMTP XCLIENT refusals fed through a
StringTransport, loopback-only listening and the welcome message in every INBOX. Real clients
against the listening sandbox: tests/integration/test_sandbox.py."""

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from proxy.demo.sandbox import Sandbox
from proxy.demo.servers import SandboxSMTP

MASTER, MASTER_PASSWORD = "master", "master-secret"


# --- SMTP -----------------------------------------------------------------------------------


def smtp_lines(peer: str, *lines: bytes) -> tuple[list[bytes], SandboxSMTP]:
    """Feed lines to a server whose client is `peer`; its reply lines after the greeting."""
    server = SandboxSMTP(Sandbox({"demo": None}, MASTER, MASTER_PASSWORD))
    transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 4321))
    server.makeConnection(transport)
    for line in lines:
        server.dataReceived(line + b"\r\n")
    server.connectionLost(Failure(ConnectionDone()))
    return transport.value().splitlines()[1:], server


def test_smtp_xclient_from_outside_loopback_is_refused():
    replies, server = smtp_lines("192.0.2.7", b"XCLIENT LOGIN=demo")
    assert replies == [b"550 5.7.0 Error: insufficient authorization"]
    assert not server.authenticated


@pytest.mark.parametrize(
    "attribute", [b"HELO=evil+0D+0AX-Injected:+20yes", b"ADDR=+ZZ", b"FOO=bar"]
)
def test_smtp_xclient_refuses_bad_attributes_and_control_characters(attribute):
    replies, server = smtp_lines("127.0.0.1", b"XCLIENT LOGIN=demo " + attribute)
    assert len(replies) == 1 and replies[0].startswith(b"501 5.5.4 ")
    assert not server.authenticated


# --- the Sandbox ----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "localhost", "example.test"])
def test_listen_refuses_anything_but_a_loopback_address(host):
    sb = Sandbox({"demo": None}, MASTER, MASTER_PASSWORD)
    with pytest.raises(ValueError, match="loopback only"):
        sb.listen(reactor, host=host)


def test_every_inbox_starts_with_a_welcome_message():
    sb = Sandbox({"demo": None, "alice@example.org": "pw"}, MASTER, MASTER_PASSWORD)
    for user, address in (
        ("demo", "demo@example.test"),
        ("alice@example.org", "alice@example.org"),
    ):
        (welcome,) = sb.mailbox(user).messages
        assert b"Subject: Welcome to the apppass sandbox" in welcome.raw
        assert f"To: <{address}>".encode() in welcome.raw
    with pytest.raises(KeyError):
        sb.mailbox("nobody")
