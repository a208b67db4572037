"""The real proxy on a real PostgreSQL store, in front of the real Dovecot: a code made by the
CLI (another process) logs a client in; a revocation from the CLI reaches the live session;
while the database is down logins are refused as temporary, and once it is back they work
again without restarting the proxy."""

from __future__ import annotations

import imaplib
import json
import socket
import subprocess
import sys
import time

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.integration.harness import start_proxy
from tests.servers.common import wait_until
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.servers.postgres import APP_PASSWORD

pytestmark = pytest.mark.integration

# The store's timeouts in these tests (PgDatabase.config): connect 2 s, statement 2 s. A login
# refused because the store is down is answered within them, plus the proxy's own work.
REFUSED_WITHIN = 8.0
RECOVERY = 30.0


@pytest_twisted.async_yield_fixture
async def proxy(dovecot, test_ca, pg_database, tmp_path):
    harness = await start_proxy(
        tmp_path / "proxy",
        store=pg_database.config(),
        listeners=[
            {
                "name": "plain",
                "protocol": "imap",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
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


def cli(proxy, *args: str) -> subprocess.CompletedProcess:
    """`apppass -c apppass.yaml …` as its own process, on the same database as the proxy."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "-c", str(proxy.folder / "apppass.yaml"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def login_reply(port: int, login: str, code: str) -> tuple[bytes, float]:
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(f'a LOGIN {login} "{code}"\r\n'.encode())
        return f.readline(), time.monotonic() - began


@pytest_twisted.ensureDeferred
async def test_a_code_made_by_the_cli_logs_in_to_dovecot_through_the_postgres_store(proxy):
    assert proxy.settings.store.kind == "postgresql"
    made = cli(proxy, "codes", "create", "alice", "--label", "pg phone", "--json")
    assert made.returncode == 0, made.stderr
    code_id, code = json.loads(made.stdout)["id"], json.loads(made.stdout)["code"]

    def client():
        with imaplib.IMAP4("127.0.0.1", proxy.port("plain")) as imap:
            assert imap.login("alice", code)[0] == "OK"
            assert imap.select("INBOX")[0] == "OK"
            imap.logout()

    await threads.deferToThread(client)
    rec = proxy.store.get(code_id)
    assert (rec.use_count, rec.last_used_protocol) == (1, "imap")
    listed = cli(proxy, "codes", "list", "alice", "--json")
    assert listed.returncode == 0, listed.stderr
    assert APP_PASSWORD not in listed.stdout + listed.stderr + made.stderr
    assert code not in proxy.audit_text()


@pytest_twisted.ensureDeferred
async def test_a_code_revoked_from_the_cli_ends_its_idle_session_through_postgres(proxy):
    code_id, code = proxy.issue("printer1", label="idle phone")

    def client() -> tuple[bytes, float]:
        sock = socket.create_connection(("127.0.0.1", proxy.port("plain")), timeout=10)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(f'a LOGIN printer1 "{code}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        while not f.readline().startswith(b"+"):
            pass
        revoked = cli(proxy, "codes", "revoke", str(code_id))
        assert revoked.returncode == 0, revoked.stderr
        started = time.monotonic()
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
        sock.close()
        return rest, time.monotonic() - started

    rest, seconds = await threads.deferToThread(client)
    assert rest.endswith(f"* BYE app password {code_id} revoked\r\n".encode())
    assert seconds < 2.0


@pytest_twisted.ensureDeferred
async def test_logins_while_the_database_is_down_are_temporary_failures_then_work_again(
    proxy, postgres
):
    _, code = proxy.issue("alice", label="outage")
    reply, _ = await threads.deferToThread(login_reply, proxy.port("plain"), "alice", code)
    assert reply.startswith(b"a OK"), reply
    postgres.stop()
    try:
        replies = [
            await threads.deferToThread(login_reply, proxy.port("plain"), "alice", code)
            for _ in range(3)
        ]
    finally:
        postgres.start()
    for reply, seconds in replies:
        assert reply.startswith(b"a NO [UNAVAILABLE]"), reply  # never a grant
        assert seconds < REFUSED_WITHIN
    refused = [e for e in proxy.audit_events("auth") if e.get("result") == "deny"][-3:]
    assert len(refused) == 3 and all("store unavailable" in e["reason"] for e in refused)
    assert APP_PASSWORD not in proxy.audit_text()

    def logs_in() -> bool:
        reply, _ = login_reply(proxy.port("plain"), "alice", code)
        return reply.startswith(b"a OK")

    # The same proxy, not restarted: its store's pool reconnects by itself.
    await threads.deferToThread(
        wait_until, logs_in, RECOVERY, "logins through the proxy again", 0.2
    )


@pytest_twisted.ensureDeferred
async def test_readyz_is_not_ready_on_a_read_only_database(
    dovecot, test_ca, postgres, pg_database, tmp_path
):
    import urllib.error
    import urllib.request

    from tests.servers.common import free_port

    ops = free_port()
    harness = await start_proxy(
        tmp_path / "ops",
        store=pg_database.config(),
        listeners=[
            {
                "name": "plain",
                "protocol": "imap",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "none",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
        web={"listeners": [{"bind": f"127.0.0.1:{ops}", "tls": "none", "serve": ["health"]}]},
    )

    def ready() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ops}/readyz", timeout=15) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    try:
        assert (await threads.deferToThread(ready))[0] == 200
        with postgres.admin() as conn:  # a replica after failover
            conn.execute(
                f"ALTER DATABASE {pg_database.name} SET default_transaction_read_only = on"
            )
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_database.name,),
            )

        def not_ready() -> dict:
            deadline = time.monotonic() + RECOVERY
            while time.monotonic() < deadline:
                status, body = ready()
                if status == 503:
                    return body
                time.sleep(0.5)  # /readyz answers are reused for 2 s
            raise AssertionError("still ready on a read-only database")

        body = await threads.deferToThread(not_ready)
        assert body["checks"]["store"].startswith("failed")
    finally:
        with postgres.admin() as conn:
            conn.execute(f"ALTER DATABASE {pg_database.name} RESET default_transaction_read_only")
        await harness.stop()
