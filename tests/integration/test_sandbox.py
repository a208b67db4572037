"""The sandbox upstream of `apppass demo`, driven by real clients (imaplib, poplib, smtplib, curl)
in threads while the reactor serves it: it accepts exactly what the proxy sends upstream."""

import imaplib
import poplib
import smtplib
import socket
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from proxy.demo.sandbox import Sandbox
from proxy.sasl import client_plain

pytestmark = pytest.mark.integration

MASTER, MASTER_PASSWORD = "master", "master-secret"
HOST = "127.0.0.1"


@pytest.fixture
def sandbox():
    sb = Sandbox({"demo": None, "alice": "alice-password"}, MASTER, MASTER_PASSWORD)
    ports = sb.listen(reactor)
    yield sb, ports
    pytest_twisted.blockon(sb.stop())


def plain(authzid, authcid, password) -> bytes:
    return f"{authzid}\0{authcid}\0{password}".encode()


class Lines:
    """A bare line client for dialogues that client libraries do not speak (ID, SASL-IR, IDLE)."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode() + b"\r\n")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def until(self, prefix: bytes) -> list[bytes]:
        lines = [self.line()]
        while not lines[-1].startswith(prefix):
            lines.append(self.line())
        return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def imap_dialogue(port, *commands):
    """Greeting, then each (tag, command) with every reply line up to its tagged one."""
    c = Lines(port)
    try:
        out = [c.line()]
        for tag, command in commands:
            c.send(f"{tag} {command}")
            out.append(c.until(tag.encode() + b" "))
        return out
    finally:
        c.close()


# --- IMAP -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_imap_greeting_says_sandbox_and_offers_plain_with_initial_response(sandbox):
    _, ports = sandbox
    (greeting,) = yield threads.deferToThread(imap_dialogue, ports.imap)
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b"for trying apppass out only" in greeting and b"no TLS" in greeting
    for cap in (b"AUTH=PLAIN", b"SASL-IR", b"ID", b"IDLE"):
        assert cap in greeting.split(b"]")[0].split()


@pytest_twisted.inlineCallbacks
def test_imap_proxy_dialogue_id_then_authenticate_plain_with_initial_response(sandbox):
    _, ports = sandbox
    response = client_plain("demo", MASTER, MASTER_PASSWORD)
    _, ident, login = yield threads.deferToThread(
        imap_dialogue,
        ports.imap,
        ("I", 'ID ("x-originating-ip" "1.2.3.4" "x-originating-port" "5678")'),
        ("L", f"AUTHENTICATE PLAIN {response}"),
    )
    assert ident[0].startswith(b"* ID (") and ident[-1].startswith(b"I OK")
    assert login[-1].startswith(b"L OK [CAPABILITY IMAP4rev1 ")
    after = login[-1].split(b"[CAPABILITY ")[1].split(b"]")[0].split()
    assert b"IDLE" in after and not any(c.startswith(b"AUTH=") for c in after)


@pytest_twisted.inlineCallbacks
def test_imaplib_authzid_login_selects_fetches_welcome_and_appends(sandbox):
    sb, ports = sandbox

    def client():
        with imaplib.IMAP4(HOST, ports.imap) as imap:
            # imaplib sends no initial response: this is the continuation ("+ ") path.
            auth = imap.authenticate("PLAIN", lambda _: plain("demo", MASTER, MASTER_PASSWORD))
            typ, exists = imap.select("INBOX")
            selected = typ, list(exists)  # imaplib keeps adding later EXISTS to that list
            _, fetched = imap.fetch("1", "(BODY[])")
            appended = imap.append("INBOX", None, None, b"Subject: note to self\r\n\r\nhello\r\n")
            _, subjects = imap.fetch("1:*", "(BODY[HEADER.FIELDS (SUBJECT)])")
            return auth, selected, fetched, appended, subjects

    auth, selected, fetched, appended, subjects = yield threads.deferToThread(client)
    assert auth[0] == "OK" and b"[CAPABILITY IMAP4rev1" in auth[1][0]
    assert selected == ("OK", [b"1"])
    assert b"Subject: Welcome to the apppass sandbox" in fetched[0][1]
    assert appended[0] == "OK"
    assert [s[1].strip() for s in subjects if isinstance(s, tuple)] == [
        b"Subject: Welcome to the apppass sandbox",
        b"Subject: note to self",
    ]
    assert sb.mailbox("demo").messages[-1].raw == b"Subject: note to self\r\n\r\nhello\r\n"


@pytest.mark.parametrize(
    "authzid, authcid, password",
    [
        ("demo", MASTER, "wrong"),  # wrong master password
        ("nobody", MASTER, MASTER_PASSWORD),  # authzid names no user
        ("", MASTER, MASTER_PASSWORD),  # the master account is no mailbox of its own
        ("alice", "demo", ""),  # only the master may speak for another user
        ("", "demo", ""),  # demo has no password of its own
    ],
)
@pytest_twisted.inlineCallbacks
def test_imap_authenticate_plain_refuses_anything_but_master_for_a_known_user(
    sandbox, authzid, authcid, password
):
    _, ports = sandbox
    _, login = yield threads.deferToThread(
        imap_dialogue,
        ports.imap,
        ("L", f"AUTHENTICATE PLAIN {client_plain(authzid, authcid, password)}"),
    )
    assert login[-1] == b"L NO [AUTHENTICATIONFAILED] Authentication failed."


@pytest.mark.parametrize(
    "login, ok",
    [
        ("alice alice-password", True),
        ('demo ""', False),  # demo has no password of its own
        ("alice wrong", False),
        (f"{MASTER} {MASTER_PASSWORD}", False),  # the master account is no mailbox
    ],
)
@pytest_twisted.inlineCallbacks
def test_imap_login_works_only_for_a_user_with_a_password(sandbox, login, ok):
    _, ports = sandbox
    _, reply = yield threads.deferToThread(imap_dialogue, ports.imap, ("A", f"LOGIN {login}"))
    if ok:
        assert reply[-1].startswith(b"A OK [CAPABILITY IMAP4rev1 ")
    else:
        assert reply[-1] == b"A NO [AUTHENTICATIONFAILED] Authentication failed."


@pytest_twisted.inlineCallbacks
def test_imap_idle_announces_a_message_delivered_over_smtp(sandbox):
    _, ports = sandbox

    def client():
        imap = Lines(ports.imap)
        try:
            imap.line()
            imap.send(f"L AUTHENTICATE PLAIN {client_plain('demo', MASTER, MASTER_PASSWORD)}")
            imap.until(b"L ")
            imap.send("S SELECT INBOX")
            imap.until(b"S ")
            imap.send("I IDLE")
            continuation = imap.line()
            with smtplib.SMTP(HOST, ports.smtp) as s:
                s.docmd("XCLIENT", "LOGIN=demo")
                s.ehlo()
                s.sendmail(
                    "demo@example.test", ["demo@example.test"], b"Subject: ping\r\n\r\nping\r\n"
                )
            pushed = imap.line()
            imap.send("DONE")
            return continuation, pushed, imap.line()
        finally:
            imap.close()

    continuation, pushed, done = yield threads.deferToThread(client)
    assert continuation.startswith(b"+ ")
    assert pushed == b"* 2 EXISTS"
    assert done.startswith(b"I OK")


@pytest.mark.parametrize("scheme, path", [("imap", "/INBOX/;UID=1"), ("pop3", "/1")])
@pytest_twisted.inlineCallbacks
def test_curl_with_sasl_authzid_reads_the_welcome_message(sandbox, scheme, path):
    _, ports = sandbox
    port = ports.imap if scheme == "imap" else ports.pop3
    result = yield threads.deferToThread(
        subprocess.run,
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--sasl-ir",
            "--user",
            f"{MASTER}:{MASTER_PASSWORD}",
            "--sasl-authzid",
            "demo",
            f"{scheme}://{HOST}:{port}{path}",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "Subject: Welcome to the apppass sandbox" in result.stdout


# --- POP3 -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_pop3_auth_plain_with_authzid_retrieves_and_deletes(sandbox):
    sb, ports = sandbox
    welcome_size = sb.mailbox("demo").messages[0].getSize()

    def client():
        pop = poplib.POP3(HOST, ports.pop3)
        greeting = pop.getwelcome()
        capa = pop.capa()
        auth = pop._shortcmd("AUTH PLAIN " + client_plain("demo", MASTER, MASTER_PASSWORD))
        stat = pop.stat()
        _, lines, _ = pop.retr(1)
        pop.dele(1)
        pop.quit()
        return greeting, capa, auth, stat, lines

    greeting, capa, auth, stat, lines = yield threads.deferToThread(client)
    assert b"for trying apppass out only" in greeting
    assert capa["SASL"] == ["PLAIN"]
    assert auth.startswith(b"+OK")
    assert stat == (1, welcome_size)
    assert b"Subject: Welcome to the apppass sandbox" in lines
    assert sb.mailbox("demo").messages == []  # deleted at QUIT


@pytest_twisted.inlineCallbacks
def test_pop3_auth_plain_by_continuation_and_refusals(sandbox):
    _, ports = sandbox

    def client():
        c = Lines(ports.pop3)
        try:
            c.line()
            c.send("AUTH PLAIN")
            continuation = c.line()
            c.send(client_plain("demo", MASTER, "wrong"))
            wrong = c.line()
            c.send("AUTH PLAIN " + client_plain("nobody", MASTER, MASTER_PASSWORD))
            unknown = c.line()
            c.send("USER alice")
            c.line()
            c.send("PASS alice-password")
            return continuation, wrong, unknown, c.line()
        finally:
            c.close()

    continuation, wrong, unknown, alice = yield threads.deferToThread(client)
    assert continuation == b"+ "
    assert wrong == unknown == b"-ERR [AUTH] Authentication failed"
    assert alice.startswith(b"+OK")


# --- SMTP -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_smtp_xclient_login_then_ehlo_delivers_to_own_inbox_visible_over_imap(sandbox):
    _, ports = sandbox

    def client():
        with smtplib.SMTP(HOST, ports.smtp) as s:
            s.ehlo()
            features = dict(s.esmtp_features)
            xclient = s.docmd(
                "XCLIENT", "LOGIN=demo ADDR=1.2.3.4 NAME=[UNAVAILABLE] HELO=client+2Eexample"
            )
            s.ehlo()
            refused = s.sendmail(
                "demo@example.test",
                ["demo@example.test"],
                b"Subject: hello from smtp\r\n\r\n.leading dot\r\nbody\r\n",
            )
        with imaplib.IMAP4(HOST, ports.imap) as imap:
            imap.authenticate("PLAIN", lambda _: plain("demo", MASTER, MASTER_PASSWORD))
            imap.select("INBOX")
            _, fetched = imap.fetch("2", "(BODY[])")
        return features, xclient, refused, fetched[0][1]

    features, xclient, refused, message = yield threads.deferToThread(client)
    assert features["size"] == "10240000"
    assert features["xclient"].split() == ["LOGIN", "NAME", "ADDR", "HELO", "PROTO"]
    assert features["auth"].split() == ["PLAIN"]
    for ext in ("8bitmime", "pipelining", "enhancedstatuscodes"):
        assert ext in features
    assert xclient[0] == 220 and b"for trying apppass out only" in xclient[1]
    assert refused == {}
    assert message.startswith(
        b"Received: from client.example ([1.2.3.4])\r\n\t(Authenticated sender: demo)"
    )
    assert b"\r\nSubject: hello from smtp\r\n\r\n.leading dot\r\nbody\r\n" in message


@pytest_twisted.inlineCallbacks
def test_smtp_without_authentication_is_refused_with_530(sandbox):
    sb, ports = sandbox

    def client():
        with smtplib.SMTP(HOST, ports.smtp) as s:
            s.ehlo()
            return s.docmd("MAIL", "FROM:<demo@example.test>")

    reply = yield threads.deferToThread(client)
    assert reply == (530, b"5.7.0 Authentication required")
    assert len(sb.mailbox("demo").messages) == 1


@pytest_twisted.inlineCallbacks
def test_smtp_auth_plain_with_authzid_and_local_recipients_only(sandbox):
    sb, ports = sandbox

    def client():
        with smtplib.SMTP(HOST, ports.smtp) as s:
            s.ehlo()
            wrong = s.docmd("AUTH", "PLAIN " + client_plain("demo", MASTER, "wrong"))
            good = s.docmd("AUTH", "PLAIN " + client_plain("demo", MASTER, MASTER_PASSWORD))
            refused = s.sendmail(
                "demo@example.test",
                ["someone@elsewhere.test", "alice@example.test"],
                b"Subject: hi alice\r\n\r\nhi\r\n",
            )
        return wrong, good, refused

    wrong, good, refused = yield threads.deferToThread(client)
    assert wrong[0] == 535 and wrong[1].startswith(b"5.7.8")
    assert good[0] == 235 and good[1].startswith(b"2.7.0")
    assert (
        list(refused) == ["someone@elsewhere.test"] and refused["someone@elsewhere.test"][0] == 550
    )
    assert b"Subject: hi alice" in sb.mailbox("alice").messages[-1].raw
    assert b"(Authenticated sender: demo)" in sb.mailbox("alice").messages[-1].raw
