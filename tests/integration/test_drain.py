"""SIGTERM drains a real `apppass serve` in front of a real Dovecot: no new connections, live
sessions go on for serve.shutdown_grace, then hear the protocol's goodbye."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
import yaml

from tests.servers.common import free_port, port_accepts
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.support.process import APPPASS, PROMPTLY, Process

pytestmark = pytest.mark.integration

GRACE = 2.0


def test_sigterm_lets_sessions_finish_their_grace_then_says_bye(dovecot, tmp_path):
    (tmp_path / "users.yaml").write_text("accounts: {alice: {id: key-alice, upstream: alice}}\n")
    (tmp_path / "master").write_text(MASTER_PASSWORD + "\n")
    port = free_port()
    config = tmp_path / "apppass.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "store": {"sqlite": "codes.db"},
                "directory": {"static": "users.yaml"},
                "audit": {"file": "audit.jsonl"},
                "serve": {"shutdown_grace": f"{int(GRACE)}s"},
                "listeners": [
                    {
                        "protocol": "imap",
                        "bind": f"127.0.0.1:{port}",
                        "tls": "none",
                        "plaintext_auth_from": ["127.0.0.0/8"],
                    }
                ],
                "upstream": {
                    "imap": {
                        "host": "127.0.0.1",
                        "port": dovecot.imap_port,
                        "tls": "none",
                        "master_user": MASTER_USER,
                        "master_password_file": "master",
                    }
                },
            }
        )
    )
    made = subprocess.run(
        [str(APPPASS), "-c", str(config), "codes", "create", "alice", "--label", "x", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    code = json.loads(made.stdout)["code"]
    process = Process(tmp_path / "serve", "-c", str(config), "serve")
    try:
        process.wait_for_port(port)
        sock = socket.create_connection(("127.0.0.1", port), timeout=PROMPTLY)
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(f'a LOGIN alice "{code}"\r\n'.encode())
        assert f.readline().startswith(b"a OK")
        process.signal(signal.SIGTERM)
        signalled = time.monotonic()
        deadline = signalled + PROMPTLY
        while port_accepts(port):  # no new connections once draining
            assert time.monotonic() < deadline, "still accepting connections"
            time.sleep(0.05)
        sock.sendall(b"b NOOP\r\n")  # the session still works during the grace
        assert f.readline().startswith(b"b OK")
        rest = f.read()  # until the proxy closes the session
        ended_after = time.monotonic() - signalled
        assert process.wait() == 0, process.stderr
    finally:
        process.kill()
    assert rest == b"* BYE apppass is shutting down\r\n"
    assert GRACE - 0.5 <= ended_after < GRACE + PROMPTLY
    assert "Traceback" not in process.stderr
