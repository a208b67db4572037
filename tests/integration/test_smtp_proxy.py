"""SMTP through apppass to a real Postfix delivering into Dovecot: printers and old clients send
with app passwords; the proxy's trust is never the client's."""

from __future__ import annotations

import base64
import smtplib
import socket
import subprocess
import uuid

import pytest
import pytest_twisted
import yaml
from twisted.internet import reactor, threads
from twisted.protocols import portforward

from tests.integration.harness import USERS, start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.integration


def tls_listeners(test_ca) -> list[dict]:
    cert = {"cert_file": str(test_ca.cert), "key_file": str(test_ca.key)}
    return [
        {
            "name": "plain",
            "protocol": "smtp",
            "tls": "none",
            "plaintext_auth_from": ["127.0.0.0/8"],
        },
        {"name": "starttls", "protocol": "smtp", "tls": "starttls", **cert},
        {"name": "implicit", "protocol": "smtp", "tls": "implicit", **cert},
        {
            "name": "proxied",
            "protocol": "smtp",
            "tls": "none",
            "plaintext_auth_from": ["192.0.2.0/24"],
            "proxy_protocol_from": ["127.0.0.0/8"],
        },
    ]


@pytest_twisted.async_yield_fixture(scope="module")
async def xclient_proxy(postfix, test_ca, tmp_path_factory):
    harness = await start_proxy(
        tmp_path_factory.mktemp("smtp-xclient"),
        listeners=tls_listeners(test_ca),
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.smtp_port,
                "tls": "starttls",
                "ca_file": str(test_ca.ca),
                "login": "xclient",
            }
        },
    )
    yield harness
    await harness.stop()


@pytest_twisted.async_yield_fixture(scope="module")
async def authzid_proxy(postfix, test_ca, tmp_path_factory):
    harness = await start_proxy(
        tmp_path_factory.mktemp("smtp-authzid"),
        listeners=[
            {
                "name": "plain",
                "protocol": "smtp",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.submissions_port,
                "tls": "implicit",
                "ca_file": str(test_ca.ca),
                "login": "authzid",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    yield harness
    await harness.stop()


def message(token: str, sender="alice@example.test", to="alice@example.test") -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {token}\r\n\r\nscanned document {token}\r\n"
    ).encode()


def send_smtplib(
    port,
    login,
    code,
    *,
    mechanism="PLAIN",
    initial=True,
    tls=None,
    implicit_ctx=None,
    sender="alice@example.test",
    to="alice@example.test",
    token=None,
):
    token = token or str(uuid.uuid4())
    cls = smtplib.SMTP_SSL if implicit_ctx else smtplib.SMTP
    kwargs = {"context": implicit_ctx} if implicit_ctx else {}
    with cls("127.0.0.1", port, timeout=15, **kwargs) as smtp:
        smtp.ehlo("printer.example.test")
        if tls:
            smtp.starttls(context=tls)
            smtp.ehlo("printer.example.test")
        smtp.user, smtp.password = login, code
        method = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[mechanism]
        smtp.auth(mechanism, method, initial_response_ok=initial)
        smtp.sendmail(sender, [to], message(token, sender, to))
    return token


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs)


@pytest.mark.parametrize(
    "mechanism,initial", [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False)]
)
@pytest_twisted.ensureDeferred
async def test_smtplib_sends_with_each_auth_form(xclient_proxy, dovecot, mechanism, initial):
    code_id, code = xclient_proxy.issue("alice", label=f"smtplib {mechanism}", scopes=("smtp",))
    token = await in_thread(
        send_smtplib,
        xclient_proxy.port("plain"),
        "alice",
        code,
        mechanism=mechanism,
        initial=initial,
    )
    msg = await in_thread(dovecot.wait_for_message, "alice", token)
    assert msg["Return-Path"] == "<alice@example.test>"
    assert "Authenticated sender: alice" in str(msg.get_all("Received"))
    rec = xclient_proxy.store.get(code_id)
    assert (rec.use_count, rec.last_used_protocol) == (1, "smtp")


@pytest_twisted.ensureDeferred
async def test_starttls_and_implicit_tls(xclient_proxy, dovecot, test_ca):
    _, code = xclient_proxy.issue("alice", scopes=("smtp",))
    ctx = test_ca.client_context()
    t1 = await in_thread(send_smtplib, xclient_proxy.port("starttls"), "alice", code, tls=ctx)
    t2 = await in_thread(
        send_smtplib, xclient_proxy.port("implicit"), "alice", code, implicit_ctx=ctx
    )
    await in_thread(dovecot.wait_for_message, "alice", t1)
    await in_thread(dovecot.wait_for_message, "alice", t2)


def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--silent", "1", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("auth", ["PLAIN", "LOGIN"])
@pytest_twisted.ensureDeferred
async def test_swaks_over_starttls(xclient_proxy, dovecot, test_ca, auth):
    _, code = xclient_proxy.issue("printer1", label="swaks", scopes=("smtp",))
    token = str(uuid.uuid4())
    result = await in_thread(
        swaks,
        "--server",
        f"127.0.0.1:{xclient_proxy.port('starttls')}",
        "--tls",
        "--tls-ca-path",
        str(test_ca.ca),
        "--tls-verify",
        "--auth",
        auth,
        "--auth-user",
        "printer1",
        "--auth-password",
        code,
        "--from",
        "printer1@example.test",
        "--to",
        "printer1@example.test",
        "--header",
        f"Subject: {token}",
    )
    assert result.returncode == 0, (
        f"swaks exited {result.returncode}"
    )  # its transcript holds the code
    msg = await in_thread(dovecot.wait_for_message, "printer1", token)
    assert msg["Return-Path"] == "<printer1@example.test>"


def session(port: int, lines: list[bytes], *, proxy_header: bytes = b"") -> list[bytes]:
    """Send each line after reading the reply to the previous one; returns every reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        if proxy_header:
            s.sendall(proxy_header)
        f = s.makefile("rb")
        replies = []

        def read_reply():
            while True:
                line = f.readline()
                replies.append(line)
                if line[3:4] != b"-":
                    return

        read_reply()
        for line in lines:
            s.sendall(line)
            read_reply()
        return replies


def auth_plain_line(login: str, code: str) -> bytes:
    return b"AUTH PLAIN " + base64.b64encode(f"\0{login}\0{code}".encode()) + b"\r\n"


@pytest_twisted.ensureDeferred
async def test_helo_only_client_can_auth_and_send(xclient_proxy, dovecot):
    _, code = xclient_proxy.issue("printer1", label="old MFP", scopes=("smtp",))
    token = str(uuid.uuid4())
    replies = await in_thread(
        session,
        xclient_proxy.port("plain"),
        [
            b"HELO mfp\r\n",
            auth_plain_line("printer1", code),
            b"MAIL FROM:<printer1@example.test>\r\n",
            b"RCPT TO:<printer1@example.test>\r\n",
            b"DATA\r\n",
            message(token, "printer1@example.test", "printer1@example.test") + b".\r\n",
            b"QUIT\r\n",
        ],
    )
    assert [r[:3] for r in replies] == [
        b"220",
        b"250",
        b"235",
        b"250",
        b"250",
        b"354",
        b"250",
        b"221",
    ]
    await in_thread(dovecot.wait_for_message, "printer1", token)


@pytest_twisted.ensureDeferred
async def test_ehlo_advertises_upstream_extensions_and_auth_only_where_allowed(xclient_proxy):
    plain = await in_thread(session, xclient_proxy.port("plain"), [b"EHLO x\r\n"])
    starttls = await in_thread(session, xclient_proxy.port("starttls"), [b"EHLO x\r\n"])
    text = b"".join(plain)
    assert b"AUTH PLAIN LOGIN" in text and b"PIPELINING" in text and b"XCLIENT" not in text
    assert b"AUTH" not in b"".join(starttls) and b"STARTTLS" in b"".join(starttls)


@pytest_twisted.ensureDeferred
async def test_plaintext_auth_refused_before_starttls(xclient_proxy):
    _, code = xclient_proxy.issue("alice", scopes=("smtp",))
    replies = await in_thread(
        session, xclient_proxy.port("starttls"), [b"EHLO x\r\n", auth_plain_line("alice", code)]
    )
    assert replies[-1].startswith(b"538 5.7.11")


@pytest_twisted.ensureDeferred
async def test_upstream_records_the_real_client_address(xclient_proxy, postfix, dovecot):
    _, code = xclient_proxy.issue("printer1", label="behind haproxy", scopes=("smtp",))
    token = str(uuid.uuid4())
    mark = postfix.log_mark()
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40001 25\r\n"
    replies = await in_thread(
        session,
        xclient_proxy.port("proxied"),
        [
            b"EHLO scanner.example.test\r\n",
            auth_plain_line("printer1", code),
            b"MAIL FROM:<printer1@example.test>\r\n",
            b"RCPT TO:<printer1@example.test>\r\n",
            b"DATA\r\n",
            message(token, "printer1@example.test", "printer1@example.test") + b".\r\n",
        ],
        proxy_header=header,
    )
    assert replies[-1].startswith(b"250"), replies
    msg = await in_thread(dovecot.wait_for_message, "printer1", token)
    assert "192.0.2.7" in str(msg.get_all("Received"))
    assert "192.0.2.7" in postfix.log_since(mark)
    assert xclient_proxy.store.list(include_inactive=True)[-1].last_used_ip == "192.0.2.7"


@pytest_twisted.ensureDeferred
async def test_client_xclient_and_xforward_after_auth_are_refused(xclient_proxy, postfix):
    _, code = xclient_proxy.issue("printer1", scopes=("smtp",))
    mark = postfix.log_mark()
    replies = await in_thread(
        session,
        xclient_proxy.port("plain"),
        [
            b"EHLO x\r\n",
            auth_plain_line("printer1", code),
            b"XCLIENT LOGIN=alice ADDR=10.9.9.9\r\n",
            b"XFORWARD ADDR=10.9.9.9\r\n",
            b"MAIL FROM:<printer1@example.test>\r\n",
        ],
    )
    assert replies[-3][:1] == b"5" and replies[-2][:1] == b"5", replies
    assert replies[-1].startswith(b"250")
    assert "LOGIN=alice" not in postfix.log_since(mark) and "10.9.9.9" not in postfix.log_since(
        mark
    )
    assert xclient_proxy.audit_events("refused")


@pytest_twisted.ensureDeferred
async def test_pipelined_xclient_after_data_refused_is_still_refused(xclient_proxy, postfix):
    _, code = xclient_proxy.issue("printer1", scopes=("smtp",))
    mark = postfix.log_mark()
    # DATA without recipients is refused by Postfix; the XCLIENT after it must not pass as content.
    replies = await in_thread(
        session,
        xclient_proxy.port("plain"),
        [
            b"EHLO x\r\n",
            auth_plain_line("printer1", code),
            b"MAIL FROM:<printer1@example.test>\r\n",
            b"DATA\r\n",
            b"XCLIENT LOGIN=alice\r\n",
        ],
    )
    assert replies[-2][:1] == b"5" and replies[-1][:1] == b"5", replies
    assert "LOGIN=alice" not in postfix.log_since(mark)


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("wrong", b"535 5.7.8"),
        ("unknown", b"535 5.7.8"),
        ("revoke", b"535 5.7.8"),
        ("disable", b"535 5.7.8"),
        ("expire", b"535 5.7.8"),
        ("use_up", b"535 5.7.8"),
        ("imap_only", b"535 5.7.8"),
        ("other_network", b"535 5.7.8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_failure_gets_535(xclient_proxy, setup, expected):
    kw = {
        "imap_only": {"scopes": ("imap",)},
        "other_network": {"networks": ("10.0.0.0/8",)},
        "use_up": {"max_uses": 1},
    }.get(setup, {"scopes": ("smtp",)})
    rec_id, code = xclient_proxy.issue("alice", **kw)
    login = "nobody" if setup == "unknown" else "alice"
    if setup == "wrong":
        code = code[:5] + ("A" if code[5] != "A" else "B") + code[6:]
    elif setup == "revoke":
        xclient_proxy.store.revoke(rec_id)
    elif setup == "disable":
        xclient_proxy.store.set_disabled(rec_id, True)
    elif setup == "expire":
        xclient_proxy.store.run("UPDATE codes SET expires_at = 1 WHERE id = ?", (rec_id,))
    elif setup == "use_up":
        ok = await in_thread(
            session, xclient_proxy.port("plain"), [b"EHLO x\r\n", auth_plain_line(login, code)]
        )
        assert ok[-1].startswith(b"235")
    replies = await in_thread(
        session, xclient_proxy.port("plain"), [b"EHLO x\r\n", auth_plain_line(login, code)]
    )
    assert replies[-1].startswith(expected), replies


@pytest_twisted.ensureDeferred
async def test_authzid_upstream_login_through_dovecot_sasl(authzid_proxy, dovecot):
    _, code = authzid_proxy.issue("alice", label="authzid", scopes=("smtp",))
    token = await in_thread(send_smtplib, authzid_proxy.port("plain"), "alice", code)
    msg = await in_thread(dovecot.wait_for_message, "alice", token)
    assert "Authenticated sender: alice" in str(msg.get_all("Received"))


@pytest_twisted.ensureDeferred
async def test_upstream_down_gives_454(xclient_proxy, postfix):
    _, code = xclient_proxy.issue("alice", scopes=("smtp",))
    await in_thread(postfix.stop)
    try:
        replies = await in_thread(
            session, xclient_proxy.port("plain"), [b"EHLO x\r\n", auth_plain_line("alice", code)]
        )
    finally:
        await in_thread(postfix.start)
    assert replies[-1].startswith(b"454 4.7.0"), replies


@pytest_twisted.ensureDeferred
async def test_starttls_command_injection_is_defeated(xclient_proxy, test_ca):
    code_id, code = xclient_proxy.issue("alice", scopes=("smtp",))

    def client():
        with socket.create_connection(
            ("127.0.0.1", xclient_proxy.port("starttls")), timeout=10
        ) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"EHLO x\r\n")
            while f.readline()[3:4] == b"-":
                pass
            # A man in the middle appends AUTH after STARTTLS, in the same packet.
            s.sendall(b"STARTTLS\r\n" + auth_plain_line("alice", code))
            assert f.readline().startswith(b"220")
            tls = test_ca.client_context().wrap_socket(s, server_hostname="localhost")
            tls.sendall(b"NOOP\r\n")
            reply = tls.recv(4096)
            tls.close()
            return reply

    reply = await in_thread(client)
    assert reply.startswith(b"250"), reply
    assert xclient_proxy.store.get(code_id).use_count == 0


@pytest_twisted.ensureDeferred
async def test_silent_client_gets_421_after_the_login_timeout(postfix, tmp_path):
    harness = await start_proxy(
        tmp_path,
        listeners=[
            {
                "name": "plain",
                "protocol": "smtp",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": postfix.smtp_port,
                "tls": "none",
                "login": "xclient",
            }
        },
        auth={"login_timeout": "1s"},
    )
    try:

        def wait_for_close():
            with socket.create_connection(("127.0.0.1", harness.port("plain")), timeout=20) as s:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        data = await in_thread(wait_for_close)
    finally:
        await harness.stop()
    assert data.startswith(b"220") and b"\r\n421 4.4.2" in data


class Tap(portforward.ProxyServer):
    """Forwards one connection to Postfix and records what the proxy sent it."""

    def connectionMade(self) -> None:
        self.sent = bytearray()
        self.factory.connections.append(self.sent)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.sent += data
        super().dataReceived(data)


class TapFactory(portforward.ProxyFactory):
    protocol = Tap

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.connections: list[bytearray] = []  # what the proxy sent, one per connection


@pytest_twisted.async_yield_fixture(scope="module")
async def tapped_proxy(postfix, tmp_path_factory):
    """A proxy whose upstream connections pass through a recording tap to the real Postfix
    (in clear text, so the tap can read them)."""
    tap = TapFactory("127.0.0.1", postfix.smtp_port)
    port = reactor.listenTCP(0, tap, interface="127.0.0.1")
    harness = await start_proxy(
        tmp_path_factory.mktemp("smtp-tapped"),
        listeners=[
            {
                "name": "plain",
                "protocol": "smtp",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "smtp": {
                "host": "127.0.0.1",
                "port": port.getHost().port,
                "tls": "none",
                "login": "xclient",
            }
        },
    )
    yield harness, tap
    await harness.stop()
    await port.stopListening()


@pytest.mark.parametrize(
    "identity",
    [
        "[x\r\nMAIL FROM:<ceo@example.test>",  # a command in the proxy's trusted session
        "[x ADDR=10.0.0.1 LOGIN=alice",  # attributes of the attacker's choosing
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_upstream_identity_that_would_inject_is_refused_before_postfix(
    tapped_proxy, identity
):
    harness, tap = tapped_proxy
    users = harness.folder / "users.yaml"
    mallory = {"id": "key-mallory", "upstream": "printer1", "groups": ["legacy-mail"]}
    accounts = {**USERS["accounts"], "mallory": mallory}
    users.write_text(yaml.safe_dump({"accounts": accounts}))
    harness.service.directory.reload()
    try:
        _, code = harness.issue("mallory", scopes=("smtp",))
        # Later, the directory's value changes (an attribute its owner may edit, a bad import).
        accounts["mallory"] = {**mallory, "upstream": identity}
        users.write_text(yaml.safe_dump({"accounts": accounts}))
        harness.service.directory.reload()
        before = len(tap.connections)
        replies = await in_thread(
            session, harness.port("plain"), [b"EHLO x\r\n", auth_plain_line("mallory", code)]
        )
    finally:
        users.write_text(yaml.safe_dump(USERS))
        harness.service.directory.reload()
    assert replies[-1].startswith(b"535 5.7.8"), replies
    assert len(tap.connections) == before  # nothing reached Postfix
    (deny,) = [e for e in harness.audit_events("auth") if e["account"] == "key-mallory"][-1:]
    assert deny["result"] == "deny" and deny["reason"].startswith("upstream identity ")


@pytest_twisted.ensureDeferred
async def test_a_client_helo_that_starts_with_a_bracket_reaches_postfix_encoded(
    tapped_proxy, dovecot
):
    harness, tap = tapped_proxy
    _, code = harness.issue("printer1", scopes=("smtp",))
    token = str(uuid.uuid4())
    replies = await in_thread(
        session,
        harness.port("plain"),
        [
            b"EHLO [x+y=z]\r\n",  # one printable word: what the SMTP core accepts as a name
            auth_plain_line("printer1", code),
            b"MAIL FROM:<printer1@example.test>\r\n",
            b"RCPT TO:<printer1@example.test>\r\n",
            b"DATA\r\n",
            message(token, "printer1@example.test", "printer1@example.test") + b".\r\n",
        ],
    )
    assert replies[-1].startswith(b"250"), replies
    (xclient,) = [line for line in tap.connections[-1].split(b"\r\n") if b"XCLIENT" in line]
    assert b" HELO=[x+2By+3Dz] " in xclient and b" LOGIN=printer1 " in xclient
    msg = await in_thread(dovecot.wait_for_message, "printer1", token)
    assert "from [x+y=z] " in str(msg.get_all("Received"))
