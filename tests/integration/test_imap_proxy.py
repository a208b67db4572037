"""IMAP through apppass to a real Dovecot: real clients log in with app passwords."""

from __future__ import annotations

import base64
import imaplib
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.integration


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy(dovecot, test_ca, tmp_path_factory):
    harness = await start_proxy(
        tmp_path_factory.mktemp("imap-proxy"),
        listeners=[
            {
                "name": "plain",
                "protocol": "imap",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            },
            {
                "name": "starttls",
                "protocol": "imap",
                "tls": "starttls",
                "cert_file": str(test_ca.cert),
                "key_file": str(test_ca.key),
            },
            {
                "name": "implicit",
                "protocol": "imap",
                "tls": "implicit",
                "cert_file": str(test_ca.cert),
                "key_file": str(test_ca.key),
            },
        ],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "starttls",
                "ca_file": str(test_ca.ca),
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    yield harness
    await harness.stop()


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


def raw(port: int, script: list[bytes | None], timeout: float = 10.0) -> bytes:
    """Talk to the proxy over plain TCP: each bytes item is sent after reading the reply to the
    previous one (None: just read); returns everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        received = b""
        f = s.makefile("rb")
        received += f.readline()  # greeting
        for item in script:
            if item is not None:
                s.sendall(item)
            received += f.readline()
        return received


def login_reply(port: int, login: str, code: str) -> bytes:
    return raw(port, [f'a LOGIN "{login}" "{code}"\r\n'.encode()]).splitlines()[-1]


# -- logging in --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_imaplib_login_select_fetch_append_logout(proxy, dovecot):
    code_id, code = proxy.issue("alice", label="imaplib")
    subject = f"through apppass {uuid.uuid4()}"

    def client():
        with imaplib.IMAP4("127.0.0.1", proxy.port("plain")) as imap:
            typ, _data = imap.login("alice", code)
            assert typ == "OK"
            assert (
                b"IMAP4rev1" in imap.capabilities[0:1][0].encode()
                or "IMAP4REV1" in imap.capabilities
            )
            typ, _ = imap.append(
                "INBOX", None, None, f"Subject: {subject}\r\n\r\nhello\r\n".encode()
            )
            assert typ == "OK"
            typ, _data = imap.select("INBOX")
            assert typ == "OK"
            typ, found = imap.search(None, "SUBJECT", f'"{subject}"')
            num = found[0].split()[-1]
            typ, fetched = imap.fetch(num, "(BODY[HEADER.FIELDS (SUBJECT)])")
            assert subject.encode() in fetched[0][1]
            assert imap.logout()[0] == "BYE"

    await in_thread(client)
    rec = proxy.store.get(code_id)
    assert (rec.use_count, rec.last_used_ip, rec.last_used_protocol) == (1, "127.0.0.1", "imap")
    assert any(subject in m.get("Subject", "") for m in dovecot.messages("alice"))


@pytest_twisted.ensureDeferred
async def test_login_with_synchronizing_literals_gets_continuations(proxy):
    _, code = proxy.issue("alice")
    c = code.encode()
    out = await in_thread(
        raw, proxy.port("plain"), [b"a LOGIN {5}\r\n", b"alice {%d}\r\n" % len(c), c + b"\r\n"]
    )
    lines = out.splitlines()
    assert lines[1].startswith(b"+") and lines[2].startswith(b"+")
    assert lines[3].startswith(b"a OK [CAPABILITY IMAP4rev1")


@pytest_twisted.ensureDeferred
async def test_login_with_non_synchronizing_literals(proxy):
    _, code = proxy.issue("alice")
    c = code.encode()
    out = await in_thread(
        raw, proxy.port("plain"), [b"a LOGIN {5+}\r\nalice {%d+}\r\n%s\r\n" % (len(c), c)]
    )
    assert out.splitlines()[-1].startswith(b"a OK [CAPABILITY")


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "mechanism,sasl_ir", [("PLAIN", True), ("PLAIN", False), ("LOGIN", False), ("LOGIN", True)]
)
@pytest_twisted.ensureDeferred
async def test_curl_authenticate(proxy, mechanism, sasl_ir):
    _, code = proxy.issue("alice", label=f"curl {mechanism}")
    args = [
        "-u",
        f"alice:{code}",
        "--login-options",
        f"AUTH={mechanism}",
        f"imap://127.0.0.1:{proxy.port('plain')}/INBOX",
        "-X",
        "EXAMINE INBOX",
    ]
    if sasl_ir:
        args.insert(0, "--sasl-ir")
    result = await in_thread(curl, *args)
    assert result.returncode == 0, result.stderr
    assert "EXISTS" in result.stdout


@pytest_twisted.ensureDeferred
async def test_authenticate_plain_with_initial_response_by_hand(proxy):
    _, code = proxy.issue("alice")
    ir = base64.b64encode(b"\0alice\0" + code.encode()).decode()
    out = await in_thread(raw, proxy.port("plain"), [f"a AUTHENTICATE PLAIN {ir}\r\n".encode()])
    assert out.splitlines()[-1].startswith(b"a OK [CAPABILITY")


@pytest_twisted.ensureDeferred
async def test_idle_sees_new_mail(proxy, dovecot):
    _, code = proxy.issue("alice")

    def client():
        with socket.create_connection(("127.0.0.1", proxy.port("plain")), timeout=15) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(f'a LOGIN alice "{code}"\r\nb SELECT INBOX\r\n'.encode())
            while not f.readline().startswith(b"b OK"):
                pass
            s.sendall(b"c IDLE\r\n")
            assert f.readline().startswith(b"+")
            with imaplib.IMAP4(
                "127.0.0.1", dovecot.imap_port
            ) as other:  # new mail arrives directly
                other.login(dovecot.master_login("alice"), MASTER_PASSWORD)
                other.append("INBOX", None, None, b"Subject: idle\r\n\r\nping\r\n")
            line = f.readline()
            while b"EXISTS" not in line:
                line = f.readline()
            s.sendall(b"DONE\r\n")
            while not (line := f.readline()).startswith(b"c "):
                pass
            assert line.startswith(b"c OK")

    await in_thread(client)


@pytest_twisted.ensureDeferred
async def test_imaplib_sees_idle_before_login_as_dovecot_offers_it_and_idle_works(proxy, dovecot):
    """imaplib reads the capabilities once, before login (and so do several old clients): they
    must hold what Dovecot offers (IDLE, ENABLE) as they would without apppass."""
    _, code = proxy.issue("demo", label="imaplib idle")

    def capabilities_of(port: int) -> tuple[str, ...]:
        with imaplib.IMAP4("127.0.0.1", port) as imap:
            return imap.capabilities

    def client():
        with imaplib.IMAP4("127.0.0.1", proxy.port("plain")) as imap:
            before = imap.capabilities
            assert imap.login("demo", code)[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"
            imap.send(b"I1 IDLE\r\n")  # imaplib has idle() only from Python 3.14
            continuation = imap.readline()
            imap.send(b"DONE\r\n")
            while not (done := imap.readline()).startswith(b"I1 "):
                pass
            return before, continuation, done

    before, continuation, done = await in_thread(client)
    assert {"IDLE", "ENABLE"} <= set(before)
    assert {"IDLE", "ENABLE"} <= set(await in_thread(capabilities_of, dovecot.imap_port))
    assert "AUTH=PLAIN" in before and "LOGINDISABLED" not in before and "STARTTLS" not in before
    assert len(before) == len(set(before))
    assert continuation.startswith(b"+") and done.startswith(b"I1 OK")


# -- TLS -----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_starttls_then_login(proxy, test_ca):
    _, code = proxy.issue("alice")

    def client():
        with imaplib.IMAP4("127.0.0.1", proxy.port("starttls")) as imap:
            assert "LOGINDISABLED" in imap.capabilities and "STARTTLS" in imap.capabilities
            imap.starttls(ssl_context=test_ca.client_context())
            assert "AUTH=PLAIN" in imap.capabilities and "STARTTLS" not in imap.capabilities
            assert imap.login("alice", code)[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"

    await in_thread(client)


@pytest_twisted.ensureDeferred
async def test_implicit_tls_login(proxy, test_ca):
    _, code = proxy.issue("alice")

    def client():
        with imaplib.IMAP4_SSL(
            "127.0.0.1", proxy.port("implicit"), ssl_context=test_ca.client_context()
        ) as imap:
            assert imap.login("alice", code)[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"

    await in_thread(client)


@pytest.mark.parametrize("listener", ["plain", "starttls", "implicit"])
@pytest_twisted.ensureDeferred
async def test_both_sockets_of_a_session_send_at_once(proxy, test_ca, listener):
    """TCP_NODELAY on the client's socket and the upstream's: without it a STARTTLS login's
    reply waits behind the TLS session tickets for the client's delayed ACK."""
    from twisted.internet import defer, reactor

    code_id, code = proxy.issue("alice")
    logged_in: defer.Deferred = defer.Deferred()
    checked = threading.Event()

    def client():
        context = test_ca.client_context()
        port = proxy.port(listener)
        if listener == "implicit":
            imap = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context)
        else:
            imap = imaplib.IMAP4("127.0.0.1", port)
            if listener == "starttls":
                imap.starttls(ssl_context=context)
        with imap:
            assert imap.login("alice", code)[0] == "OK"
            reactor.callFromThread(logged_in.callback, None)
            assert checked.wait(30)

    done = in_thread(client)
    try:
        await logged_in
        sessions = [s for s in proxy.service.sessions if s.upstream is not None]
        assert len(sessions) == 1
        assert sessions[0].transport.getTcpNoDelay()
        assert sessions[0].upstream.transport.getTcpNoDelay()
    finally:
        checked.set()
    await done
    proxy.store.revoke(code_id)  # the module's alice stays under the cap on live codes


@pytest_twisted.ensureDeferred
async def test_plaintext_login_refused_outside_plaintext_auth_from(proxy):
    _, code = proxy.issue("alice")
    out = await in_thread(
        raw,
        proxy.port("starttls"),
        [f'a LOGIN alice "{code}"\r\n'.encode(), b"b AUTHENTICATE PLAIN\r\n"],
    )
    lines = out.splitlines()
    assert b"LOGINDISABLED" in lines[0]
    assert lines[1].startswith(b"a NO [PRIVACYREQUIRED]")
    assert lines[2].startswith(b"b NO [PRIVACYREQUIRED]")


@pytest_twisted.ensureDeferred
async def test_starttls_command_injection_is_defeated(proxy, test_ca):
    code_id, code = proxy.issue("alice")

    def client():
        with socket.create_connection(("127.0.0.1", proxy.port("starttls")), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            # A man in the middle appends a LOGIN after STARTTLS, in the same packet.
            s.sendall(f'a STARTTLS\r\nb LOGIN alice "{code}"\r\n'.encode())
            assert f.readline().startswith(b"a OK")
            tls = test_ca.client_context().wrap_socket(s, server_hostname="localhost")
            tls.sendall(b"c NOOP\r\n")
            reply = tls.recv(4096)
            tls.close()
            return reply

    reply = await in_thread(client)
    assert reply.startswith(b"c OK"), reply
    assert proxy.store.get(code_id).use_count == 0


# -- refusals ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wrong_code_and_unknown_user_get_authenticationfailed(proxy):
    code_id, code = proxy.issue("alice")
    wrong = code[:5] + ("A" if code[5] != "A" else "B") + code[6:]
    assert (await in_thread(login_reply, proxy.port("plain"), "alice", wrong)).startswith(
        b"a NO [AUTHENTICATIONFAILED]"
    )
    assert (await in_thread(login_reply, proxy.port("plain"), "nobody", code)).startswith(
        b"a NO [AUTHENTICATIONFAILED]"
    )
    assert proxy.store.get(code_id).failed_count == 1


@pytest.mark.parametrize(
    "setup,expected",
    [
        ("revoke", b"a NO [EXPIRED]"),
        ("disable", b"a NO [AUTHORIZATIONFAILED]"),
        ("expire", b"a NO [EXPIRED]"),
        ("use_up", b"a NO [EXPIRED]"),
        ("smtp_only", b"a NO [AUTHORIZATIONFAILED]"),
        ("other_network", b"a NO [AUTHORIZATIONFAILED]"),
        ("not_legacy", b"a NO [AUTHORIZATIONFAILED]"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_refusal_gets_its_reply(proxy, setup, expected):
    kw = {
        "smtp_only": {"scopes": ("smtp",)},
        "other_network": {"networks": ("10.0.0.0/8",)},
        "use_up": {"max_uses": 1},
    }.get(setup, {})
    login = "alice"
    if setup == "not_legacy":
        login = "bob"
        rec_id, code = proxy.issue("alice", **kw)  # bob may not get codes: give him alice's
    else:
        rec_id, code = proxy.issue(login, **kw)
    if setup == "revoke":
        proxy.store.revoke(rec_id)
    elif setup == "disable":
        proxy.store.set_disabled(rec_id, True)
    elif setup == "expire":
        proxy.store.run("UPDATE codes SET expires_at = 1 WHERE id = ?", (rec_id,))
    elif setup == "use_up":
        assert (await in_thread(login_reply, proxy.port("plain"), login, code)).startswith(b"a OK")
    reply = await in_thread(login_reply, proxy.port("plain"), login, code)
    if setup == "not_legacy":
        expected = b"a NO [AUTHENTICATIONFAILED]"  # alice's code is not bob's: nothing is revealed
    assert reply.startswith(expected), reply


@pytest_twisted.ensureDeferred
async def test_account_losing_legacy_permission_gets_authorizationfailed(proxy):
    _, code = proxy.issue("printer1")
    directory = proxy.service.directory
    directory.legacy_group = "no-such-group"
    directory.reload()
    try:
        reply = await in_thread(login_reply, proxy.port("plain"), "printer1", code)
    finally:
        directory.legacy_group = "legacy-mail"
        directory.reload()
    assert reply.startswith(b"a NO [AUTHORIZATIONFAILED]"), reply


@pytest_twisted.ensureDeferred
async def test_upstream_refusing_the_user_is_unavailable(proxy):
    _, code = proxy.issue("ghost")  # exists in apppass's directory, not in Dovecot
    reply = await in_thread(login_reply, proxy.port("plain"), "ghost", code)
    assert reply.startswith(b"a NO [UNAVAILABLE]"), reply
    assert proxy.audit_events("upstream")[-1]["result"] == "fail"


@pytest_twisted.ensureDeferred
async def test_failures_then_bye_and_audit_never_holds_a_code(proxy):
    _, code = proxy.issue("alice")
    wrong = "AAAA-BBBB-CCCC-DDDD"
    out = await in_thread(
        raw,
        proxy.port("plain"),
        [f'{t} LOGIN alice "{wrong}"\r\n'.encode() for t in "abc"] + [None],
    )
    assert out.count(b"NO [AUTHENTICATIONFAILED]") == 3
    assert b"* BYE" in out
    text = proxy.audit_text() + (proxy.folder / "audit.jsonl").read_text()
    assert code not in text and code.replace("-", "") not in text and wrong not in text


@pytest_twisted.ensureDeferred
async def test_dovecot_logs_the_real_client_address(proxy, dovecot):
    _, code = proxy.issue("alice")
    mark = dovecot.log_mark()
    assert (await in_thread(login_reply, proxy.port("plain"), "alice", code)).startswith(b"a OK")
    await in_thread(dovecot.wait_for_log, "session=", mark)
    assert "rip=127.0.0.1" in dovecot.log_since(mark)


@pytest_twisted.ensureDeferred
async def test_session_end_is_audited_with_byte_counts(proxy):
    code_id, code = proxy.issue("alice")

    def client():
        with imaplib.IMAP4("127.0.0.1", proxy.port("plain")) as imap:
            imap.login("alice", code)
            imap.select("INBOX")
            imap.logout()

    await in_thread(client)

    def ended():
        return [e for e in proxy.audit_events("session") if e.get("code") == code_id]

    deadline = time.monotonic() + 10
    while not ended():
        assert time.monotonic() < deadline, "no session event"
        await in_thread(lambda: None)
    ev = ended()[0]
    assert ev["bytes_up"] > 0 and ev["bytes_down"] > 0 and ev["account"] == "key-alice"


@pytest_twisted.ensureDeferred
async def test_upstream_down_gives_unavailable(proxy, dovecot):
    _, code = proxy.issue("alice")
    await in_thread(dovecot.stop)
    try:
        reply = await in_thread(login_reply, proxy.port("plain"), "alice", code)
    finally:
        await in_thread(dovecot.start)
    assert reply.startswith(b"a NO [UNAVAILABLE]"), reply


# -- flow control --------------------------------------------------------------------------------

BIG = 50 * 1024 * 1024


def proxy_held_bytes(transport) -> int:
    """Octets a plain TCP transport holds in user space waiting to be sent."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


@pytest_twisted.ensureDeferred
async def test_big_fetch_read_slowly_keeps_proxy_buffers_bounded(proxy, dovecot):
    from twisted.internet import reactor, task

    from proxy.relay import BUFFER_BOUND_TCP

    code_id, code = proxy.issue("alice", label="big fetch")
    subject = f"big {uuid.uuid4()}"
    body = (b"x" * 998 + b"\r\n") * (BIG // 1000)

    def append_directly():
        with imaplib.IMAP4("127.0.0.1", dovecot.imap_port) as other:
            other.login(dovecot.master_login("alice"), MASTER_PASSWORD)
            other.append("INBOX", None, None, f"Subject: {subject}\r\n\r\n".encode() + body)

    await in_thread(append_directly)
    sock = socket.create_connection(("127.0.0.1", proxy.port("plain")), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    f = sock.makefile("rb")

    def login_and_fetch():
        f.readline()
        sock.sendall(
            f'a LOGIN alice "{code}"\r\nb SELECT INBOX\r\nc SEARCH SUBJECT "{subject}"\r\n'.encode()
        )
        num = None
        while True:
            line = f.readline()
            if line.startswith(b"* SEARCH"):
                num = line.split()[-1]
            if line.startswith(b"c "):
                break
        sock.sendall(b"d FETCH " + num + b" BODY[]\r\n")

    await in_thread(login_and_fetch)
    session = next(s for s in proxy.service.sessions if s.grant and s.grant.code_id == code_id)
    client_transport = session.transport
    peak = [0]

    def sample():
        peak[0] = max(peak[0], proxy_held_bytes(client_transport))

    sampler = task.LoopingCall(sample)
    sampler.start(0.005)
    # The client reads nothing until back-pressure has reached Dovecot's side of the relay.
    deadline = time.monotonic() + 30
    while not session.relay.peer.reading_paused:
        assert time.monotonic() < deadline, "relay never paused the upstream"
        await task.deferLater(reactor, 0.01, lambda: None)
    paused_at = proxy_held_bytes(client_transport)

    def read_all():
        total = 0
        while True:
            line = f.readline()
            total += len(line)
            if line.startswith(b"d OK"):
                return total
            if line.startswith(b"d "):
                raise AssertionError(line)

    received = await in_thread(read_all)
    sampler.stop()
    sock.close()
    assert received > len(body)
    assert paused_at <= BUFFER_BOUND_TCP
    assert peak[0] <= BUFFER_BOUND_TCP, f"proxy held {peak[0]} bytes for one slow client"


@pytest_twisted.ensureDeferred
async def test_revoking_a_code_ends_its_live_sessions(proxy):
    code_id, code = proxy.issue("alice", label="to be revoked")

    def client():
        imap = imaplib.IMAP4("127.0.0.1", proxy.port("plain"))
        imap.login("alice", code)
        imap.select("INBOX")
        proxy.store.revoke(code_id)
        imap.sock.settimeout(15)
        deadline = time.monotonic() + 15
        try:
            while time.monotonic() < deadline:  # until the proxy closes: NOOP fails or reads EOF
                imap.noop()
            return "still open"
        except (imaplib.IMAP4.abort, OSError):
            return "closed"
        finally:
            imap.shutdown()

    assert await in_thread(client) == "closed"
    assert any(e.get("code") == code_id for e in proxy.audit_events("session_ended"))


def held_until_closed(imap: imaplib.IMAP4, seconds: float = 15) -> str:
    """NOOP until the proxy closes the session ("closed") or the time is up ("still open")."""
    imap.sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            imap.noop()
        return "still open"
    except (imaplib.IMAP4.abort, OSError):
        return "closed"
    finally:
        imap.shutdown()


@pytest_twisted.ensureDeferred
async def test_disabling_a_used_up_code_ends_its_live_session(proxy):
    code_id, code = proxy.issue("alice", label="one shot", max_uses=1)

    def client():
        imap = imaplib.IMAP4("127.0.0.1", proxy.port("plain"))
        imap.login("alice", code)
        imap.select("INBOX")
        proxy.store.set_disabled(code_id, True)
        return held_until_closed(imap)

    assert await in_thread(client) == "closed"
    (ended,) = [e for e in proxy.audit_events("session_ended") if e.get("code") == code_id]
    assert ended["reason"] == f"app password {code_id} disabled"


@pytest_twisted.ensureDeferred
async def test_an_account_disabled_in_the_directory_loses_its_live_sessions(proxy):
    users = proxy.folder / "users.yaml"
    original = users.read_text()
    _, code = proxy.issue("printer1", label="scanner")

    def client():
        imap = imaplib.IMAP4("127.0.0.1", proxy.port("plain"))
        imap.login("printer1", code)
        imap.select("INBOX")
        disabled = original.replace("printer1:\n", "printer1:\n    enabled: false\n", 1)
        assert disabled != original
        users.write_text(disabled)
        return held_until_closed(imap)

    try:
        assert await in_thread(client) == "closed"
    finally:
        users.write_text(original)
        proxy.service.directory.reload()
    (ended,) = [
        e for e in proxy.audit_events("session_ended") if e.get("account") == "key-printer1"
    ]
    assert ended["reason"] == "account disabled"


@pytest_twisted.ensureDeferred
async def test_a_code_revoked_from_the_cli_ends_its_idle_session_within_two_seconds(proxy):
    code_id, code = proxy.issue("printer1", label="idle phone")

    def client() -> tuple[bytes, float]:
        sock = socket.create_connection(("127.0.0.1", proxy.port("plain")), timeout=10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(f'a LOGIN printer1 "{code}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        while not f.readline().startswith(b"+"):
            pass
        revoked = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "-c",
                str(proxy.folder / "apppass.yaml"),
                "codes",
                "revoke",
                str(code_id),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
        sock.close()
        return rest, time.monotonic() - started

    rest, seconds = await in_thread(client)
    assert rest.endswith(f"* BYE app password {code_id} revoked\r\n".encode())
    assert seconds < 2.0
