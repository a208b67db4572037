"""POP3 through apppass to a real Dovecot: old clients fetch with app passwords."""

from __future__ import annotations

import base64
import imaplib
import poplib
import socket
import subprocess
import uuid

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.integration


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy(dovecot, test_ca, tmp_path_factory):
    cert = {"cert_file": str(test_ca.cert), "key_file": str(test_ca.key)}
    harness = await start_proxy(
        tmp_path_factory.mktemp("pop3-proxy"),
        listeners=[
            {
                "name": "plain",
                "protocol": "pop3",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            },
            {"name": "stls", "protocol": "pop3", "tls": "starttls", **cert},
            {"name": "implicit", "protocol": "pop3", "tls": "implicit", **cert},
        ],
        upstream={
            "pop3": {
                "host": "127.0.0.1",
                "port": dovecot.pop3_port,
                "tls": "starttls",
                "ca_file": str(test_ca.ca),
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    yield harness
    await harness.stop()


def in_thread(fn, *args, **kwargs):
    return threads.deferToThread(fn, *args, **kwargs)


def put_message(dovecot, user: str) -> str:
    token = str(uuid.uuid4())
    with imaplib.IMAP4("127.0.0.1", dovecot.imap_port) as imap:
        imap.login(dovecot.master_login(user), MASTER_PASSWORD)
        imap.append("INBOX", None, None, f"Subject: {token}\r\n\r\npop me\r\n".encode())
    return token


def find(pop: poplib.POP3, token: str) -> int:
    count, _ = pop.stat()
    for n in range(count, 0, -1):
        if token.encode() in b"\n".join(pop.top(n, 0)[1]):
            return n
    raise AssertionError(f"{token} not in the mailbox")


@pytest_twisted.ensureDeferred
async def test_user_pass_retr_dele(proxy, dovecot):
    code_id, code = proxy.issue("alice", label="poplib", scopes=("pop3",))
    token = await in_thread(put_message, dovecot, "alice")

    def client():
        pop = poplib.POP3("127.0.0.1", proxy.port("plain"), timeout=15)
        assert pop.user("alice").startswith(b"+OK")
        assert pop.pass_(code).startswith(b"+OK")
        n = find(pop, token)
        assert token.encode() in b"\n".join(pop.retr(n)[1])
        assert pop.dele(n).startswith(b"+OK")
        pop.quit()
        pop = poplib.POP3("127.0.0.1", proxy.port("plain"), timeout=15)
        pop.user("alice")
        pop.pass_(code)
        with pytest.raises(AssertionError):
            find(pop, token)
        pop.quit()

    await in_thread(client)
    rec = proxy.store.get(code_id)
    assert (rec.use_count, rec.last_used_protocol) == (2, "pop3")


@pytest_twisted.ensureDeferred
async def test_auth_plain_with_initial_response(proxy):
    _, code = proxy.issue("alice", scopes=("pop3",))

    def client():
        with socket.create_connection(("127.0.0.1", proxy.port("plain")), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(
                b"AUTH PLAIN " + base64.b64encode(f"\0alice\0{code}".encode()) + b"\r\nSTAT\r\n"
            )
            return f.readline(), f.readline()

    ok, stat = await in_thread(client)
    assert ok.startswith(b"+OK") and stat.startswith(b"+OK")


def curl(*args):
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "options", [[], ["--login-options", "AUTH=PLAIN"], ["--login-options", "AUTH=LOGIN"]]
)
@pytest_twisted.ensureDeferred
async def test_curl_lists_messages(proxy, dovecot, options):
    _, code = proxy.issue("alice", scopes=("pop3",))
    await in_thread(put_message, dovecot, "alice")
    result = await in_thread(
        curl, *options, "-u", f"alice:{code}", f"pop3://127.0.0.1:{proxy.port('plain')}/"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().split("\n")[0].split()[0] == "1"


@pytest_twisted.ensureDeferred
async def test_stls_then_login_and_implicit_tls(proxy, test_ca):
    _, code = proxy.issue("alice", scopes=("pop3",))

    def client():
        pop = poplib.POP3("127.0.0.1", proxy.port("stls"), timeout=15)
        caps = pop.capa()
        assert "STLS" in caps and "USER" not in caps
        pop.stls(context=test_ca.client_context())
        assert "USER" in pop.capa()
        pop.user("alice")
        assert pop.pass_(code).startswith(b"+OK")
        pop.quit()
        pop = poplib.POP3_SSL(
            "127.0.0.1", proxy.port("implicit"), context=test_ca.client_context(), timeout=15
        )
        pop.user("alice")
        assert pop.pass_(code).startswith(b"+OK")
        pop.quit()

    await in_thread(client)


def pass_reply(port: int, login: str, code: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(f"USER {login}\r\n".encode())
        user_reply = f.readline()
        if not user_reply.startswith(b"+OK"):
            return user_reply
        s.sendall(f"PASS {code}\r\n".encode())
        return f.readline()


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("wrong", b"-ERR [AUTH]"),
        ("unknown", b"-ERR [AUTH]"),
        ("revoke", b"-ERR [AUTH]"),
        ("disable", b"-ERR [AUTH]"),
        ("expire", b"-ERR [AUTH]"),
        ("use_up", b"-ERR [AUTH]"),
        ("smtp_only", b"-ERR [AUTH]"),
        ("plaintext", b"-ERR [AUTH]"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_failure_gets_its_reply(proxy, setup, expected):
    kw = {"smtp_only": {"scopes": ("smtp",)}, "use_up": {"max_uses": 1, "scopes": ("pop3",)}}.get(
        setup, {"scopes": ("pop3",)}
    )
    rec_id, code = proxy.issue("alice", **kw)
    login, port = "alice", proxy.port("plain")
    if setup == "wrong":
        code = code[:5] + ("A" if code[5] != "A" else "B") + code[6:]
    elif setup == "unknown":
        login = "nobody"
    elif setup == "revoke":
        proxy.store.revoke(rec_id)
    elif setup == "disable":
        proxy.store.set_disabled(rec_id, True)
    elif setup == "expire":
        proxy.store.run("UPDATE codes SET expires_at = 1 WHERE id = ?", (rec_id,))
    elif setup == "use_up":
        assert (await in_thread(pass_reply, port, login, code)).startswith(b"+OK")
    elif setup == "plaintext":
        port = proxy.port("stls")
    reply = await in_thread(pass_reply, port, login, code)
    assert reply.startswith(expected), reply


@pytest_twisted.ensureDeferred
async def test_upstream_down_gives_sys_temp(proxy, dovecot):
    _, code = proxy.issue("alice", scopes=("pop3",))
    await in_thread(dovecot.stop)
    try:
        reply = await in_thread(pass_reply, proxy.port("plain"), "alice", code)
    finally:
        await in_thread(dovecot.start)
    assert reply.startswith(b"-ERR [SYS/TEMP]"), reply


@pytest_twisted.ensureDeferred
async def test_stls_command_injection_is_defeated(proxy, test_ca):
    code_id, code = proxy.issue("alice", scopes=("pop3",))

    def client():
        with socket.create_connection(("127.0.0.1", proxy.port("stls")), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(f"STLS\r\nUSER alice\r\nPASS {code}\r\n".encode())
            assert f.readline().startswith(b"+OK")
            tls = test_ca.client_context().wrap_socket(s, server_hostname="localhost")
            tls.sendall(b"STAT\r\n")
            reply = tls.recv(4096)
            tls.close()
            return reply

    reply = await in_thread(client)
    assert reply.startswith(b"-ERR"), reply  # not logged in: the injected USER/PASS were dropped
    assert proxy.store.get(code_id).use_count == 0
