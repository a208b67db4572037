"""serve.workers: 2 as real processes in front of a real Dovecot and Postfix: one port served by
both workers (told apart by which worker process holds each session's socket), a killed or hung
worker restarted, SIGHUP and SIGTERM passed on, revocation reaching both, a code verified once
for both, /metrics totals, and systemd hearing only the supervisor."""

from __future__ import annotations

import imaplib
import json
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.servers.common import free_port, port_accepts
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.support.process import APPPASS, PROMPTLY, Process, taken_port

pytestmark = pytest.mark.integration

# Sessions opened at most while waiting for both workers to hold one: the kernel hands each
# connection to whichever worker accepts first, so a few are enough unless one never does.
MAX_TRIES = 60

USERS = {"accounts": {"alice": {"id": "key-alice", "upstream": "alice", "groups": ["staff"]}}}


@dataclass
class Served:
    process: Process
    folder: Path
    config: Path
    ports: dict[str, int]  # listener name -> port

    def workers(self, count: int = 2) -> dict[int, int]:
        """Worker number -> pid of its latest process, once each has said it is ready."""
        deadline = time.monotonic() + PROMPTLY
        while True:
            text = self.process.stderr
            ready = {
                int(n): int(p) for n, p in re.findall(r"worker (\d+) \(pid (\d+)\) is ready", text)
            }
            if len(ready) == count and "serving with" in text:
                return ready
            assert self.process.popen.poll() is None, f"exited early; stderr:\n{text}"
            assert time.monotonic() < deadline, f"workers not ready; stderr:\n{text}"
            time.sleep(0.05)

    def wait_for_log(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + PROMPTLY
        while not (found := re.search(pattern, self.process.stderr)):
            assert time.monotonic() < deadline, f"no {pattern!r} in stderr:\n{self.process.stderr}"
            time.sleep(0.05)
        return found

    def issue(self) -> tuple[int, str]:
        made = subprocess.run(
            [
                str(APPPASS),
                "-c",
                str(self.config),
                "codes",
                "create",
                "alice",
                "--label=x",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        out = json.loads(made.stdout)
        return out["id"], out["code"]

    def metrics(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.ports['ops']}/metrics", timeout=10
        ) as r:
            return r.read().decode()


@pytest.fixture
def serve_workers(tmp_path, dovecot, postfix, test_ca) -> Iterator:
    started: list[Process] = []

    def start(cert: Path | None = None, env: dict[str, str] | None = None, **serve) -> Served:
        (tmp_path / "users.yaml").write_text(yaml.safe_dump(USERS))
        (tmp_path / "master").write_text(MASTER_PASSWORD + "\n")
        ports = {name: free_port() for name in ("imap", "imaps", "pop3", "smtp", "ops")}
        plain = {"tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}
        tls = {
            "tls": "implicit",
            "cert_file": str(cert or test_ca.cert),
            "key_file": str(test_ca.key),
        }
        master = {"master_user": MASTER_USER, "master_password_file": "master"}
        config = {
            "store": {"sqlite": "codes.db"},
            "directory": {"static": "users.yaml"},
            "codes": {"argon2": {"memory_kib": 8192, "time_cost": 1}},
            "auth": {"failure_delay": "0s"},
            "audit": {"file": "audit.jsonl"},
            "serve": {"workers": 2, "shutdown_grace": "1s", **serve},
            "listeners": [
                {"name": "imap", "protocol": "imap", "bind": f"127.0.0.1:{ports['imap']}", **plain},
                {"name": "imaps", "protocol": "imap", "bind": f"127.0.0.1:{ports['imaps']}", **tls},
                {"name": "pop3", "protocol": "pop3", "bind": f"127.0.0.1:{ports['pop3']}", **plain},
                {"name": "smtp", "protocol": "smtp", "bind": f"127.0.0.1:{ports['smtp']}", **plain},
            ],
            "upstream": {
                "imap": {"host": "127.0.0.1", "port": dovecot.imap_port, "tls": "none", **master},
                "pop3": {"host": "127.0.0.1", "port": dovecot.pop3_port, "tls": "none", **master},
                "smtp": {
                    "host": "127.0.0.1",
                    "port": postfix.smtp_port,
                    "tls": "none",
                    "login": "xclient",
                },
            },
            "web": {
                "listeners": [
                    {"bind": f"127.0.0.1:{ports['ops']}", "tls": "none", "serve": ["metrics"]}
                ]
            },
        }
        path = tmp_path / "apppass.yaml"
        path.write_text(yaml.safe_dump(config))
        process = Process(tmp_path / "serve", "-c", str(path), "serve", env=env)
        started.append(process)
        return Served(process, tmp_path, path, ports)

    yield start
    for process in started:
        process.kill()  # the supervisor; its workers drain when their link closes


# --- helpers -----------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def socket_owners(pids: list[int], port: int) -> dict[int, int]:
    """How many established connections to `port` each pid holds (from /proc)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes[f"socket:[{inode}]"] = 1
    held = {}
    for pid in pids:
        fds = Path(f"/proc/{pid}/fd")
        held[pid] = sum(1 for fd in fds.iterdir() if os.readlink(fd) in inodes)
    return held


def imap_session(port: int, code: str) -> tuple[socket.socket, object]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PROMPTLY)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"* OK")
    sock.sendall(f'a LOGIN alice "{code}"\r\n'.encode())
    reply = f.readline()
    while reply.startswith(b"*"):
        reply = f.readline()
    assert reply.startswith(b"a OK"), reply
    return sock, f


def sessions_in_both(
    served: Served, code: str, pids: list[int]
) -> list[tuple[socket.socket, object]]:
    """IMAP sessions opened one by one until each worker holds at least one."""
    sessions = []
    for _ in range(MAX_TRIES):
        sessions.append(imap_session(served.ports["imap"], code))
        held = socket_owners(pids, served.ports["imap"])
        if all(held.values()):
            return sessions
    pytest.fail(f"after {MAX_TRIES} sessions one worker held none: {held}")


def grants(metrics: str) -> float:
    return sum(
        float(value)
        for value in re.findall(
            r'^apppass_logins_total\{[^}]*outcome="grant"[^}]*\} (\S+)$', metrics, re.M
        )
    )


# --- serving -----------------------------------------------------------------------------------


def test_both_workers_serve_one_port_for_every_protocol_and_metrics_add_up(serve_workers, test_ca):
    served = serve_workers()
    pids = list(served.workers().values())
    _, code = served.issue()
    sessions = sessions_in_both(served, code, pids)
    pop = poplib.POP3("127.0.0.1", served.ports["pop3"], timeout=PROMPTLY)
    pop.user("alice")
    assert pop.pass_(code).startswith(b"+OK")
    pop.quit()
    with smtplib.SMTP("127.0.0.1", served.ports["smtp"], timeout=PROMPTLY) as smtp:
        assert smtp.login("alice", code)[0] == 235
    context = ssl.create_default_context(cafile=str(test_ca.ca))
    with imaplib.IMAP4_SSL(
        "127.0.0.1", served.ports["imaps"], ssl_context=context, timeout=PROMPTLY
    ) as imaps:
        assert imaps.login("alice", code)[0] == "OK"
    logins = len(sessions) + 3
    live = re.compile(rf'^apppass_sessions\{{protocol="imap"\}} {len(sessions)}\.0$', re.M)
    deadline = time.monotonic() + PROMPTLY  # the IMAPS session's end is counted a moment later
    while not (grants(text := served.metrics()) == logins and live.search(text)):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    for sock, _ in sessions:
        sock.close()


def test_a_killed_worker_is_restarted_and_the_port_answers_meanwhile(serve_workers):
    served = serve_workers()
    workers = served.workers()
    _, code = served.issue()
    os.kill(workers[1], signal.SIGKILL)
    sock, _ = imap_session(served.ports["imap"], code)  # worker 2 still accepts
    sock.close()
    served.wait_for_log(rf"worker 1 \(pid {workers[1]}\) was killed by SIGKILL; restarting it")
    again = served.wait_for_log(rf"worker 1 started \(pid (?!{workers[1]}\))(\d+)\)")
    new_pid = int(again.group(1))
    served.wait_for_log(rf"worker 1 \(pid {new_pid}\) is ready")
    for sock, _ in sessions_in_both(served, code, [new_pid, workers[2]]):
        sock.close()


def test_sighup_reaches_every_worker(serve_workers):
    served = serve_workers()
    served.workers()
    _, code = served.issue()
    sock, _ = imap_session(served.ports["imap"], code)
    sock.close()
    config = yaml.safe_load(served.config.read_text())
    config["policy"] = {"legacy_group": "legacy-mail"}  # alice is only in staff
    config["auth"]["failure_delay"] = "1s"  # read at start only
    served.config.write_text(yaml.safe_dump(config))
    served.process.signal(signal.SIGHUP)
    for number in (1, 2):
        served.wait_for_log(rf"worker {number}: reload applied: policy")
    # Said once, by the supervisor, not once per worker.
    assert served.process.stderr.count("reload: auth changed; that needs a restart") == 1
    for _ in range(10):  # whichever worker answers, the new policy holds
        with socket.create_connection(("127.0.0.1", served.ports["imap"]), timeout=PROMPTLY) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(f'a LOGIN alice "{code}"\r\n'.encode())
            assert f.readline().startswith(b"a NO [AUTHORIZATIONFAILED]")


def test_a_config_with_errors_is_reported_once_and_changes_nothing(serve_workers):
    served = serve_workers()
    served.workers()
    served.config.write_text(served.config.read_text() + "\npolicy: [not, a, mapping]\n")
    served.process.signal(signal.SIGHUP)
    for number in (1, 2):
        applied = served.wait_for_log(rf"worker {number}: reload applied: (.*)")
        assert "policy" not in applied.group(1)
    assert served.process.stderr.count("reload: the config has errors, none of it applied") == 1


def test_the_supervisor_takes_the_new_log_level_too(serve_workers):
    served = serve_workers()
    workers = served.workers()
    config = yaml.safe_load(served.config.read_text())
    config["log"] = {"level": "warning"}
    served.config.write_text(yaml.safe_dump(config))
    served.process.signal(signal.SIGHUP)
    served.wait_for_log(r"reloading \(SIGHUP\)")  # the level changes in the same step
    os.kill(workers[1], signal.SIGKILL)
    served.wait_for_log(rf"worker 1 \(pid {workers[1]}\) was killed by SIGKILL; restarting it")
    deadline = time.monotonic() + PROMPTLY
    while not (set(children(served.process.popen.pid)) - set(workers.values())):
        assert time.monotonic() < deadline, "worker 1 was not started again"
        time.sleep(0.05)
    # Its restart happened (a new child), but at level warning the info lines are not written.
    assert served.process.stderr.count("worker 1 started") == 1


def metric(text: str, name: str, labels: str) -> float:
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_code_verified_by_one_worker_is_not_verified_again_by_the_other(serve_workers):
    served = serve_workers()
    pids = list(served.workers().values())
    _, code = served.issue()
    first = imap_session(served.ports["imap"], code)  # argon2 in whichever worker took it
    deadline = time.monotonic() + PROMPTLY  # the entry goes on through the supervisor
    while (
        metric(served.metrics(), "apppass_verified_cache_shared_total", 'direction="received"') < 1
    ):
        assert time.monotonic() < deadline, served.metrics()
        time.sleep(0.05)
    sessions = [first, *sessions_in_both(served, code, pids)]
    text = served.metrics()
    assert metric(text, "apppass_login_phase_seconds_count", 'phase="argon2"') == 1
    assert metric(text, "apppass_verified_cache_shared_total", 'direction="sent"') == 1
    assert metric(text, "apppass_verified_cache_shared_total", 'direction="received"') == 1
    assert grants(text) == len(sessions)
    for sock, _ in sessions:
        sock.close()


def test_a_revoked_code_ends_idle_sessions_in_both_workers(serve_workers):
    served = serve_workers()
    pids = list(served.workers().values())
    code_id, code = served.issue()
    sessions = sessions_in_both(served, code, pids)
    for sock, f in sessions:
        sock.sendall(b"b SELECT INBOX\r\nc IDLE\r\n")
        while not f.readline().startswith(b"+"):
            pass
    revoked = subprocess.run(
        [str(APPPASS), "-c", str(served.config), "codes", "revoke", str(code_id)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    for sock, f in sessions:
        assert f.read().endswith(f"* BYE app password {code_id} revoked\r\n".encode())
        sock.close()
    assert time.monotonic() - started < 2.0


def test_sigterm_drains_every_worker_and_exits_0(serve_workers):
    served = serve_workers()
    workers = served.workers()
    pids = list(workers.values())
    _, code = served.issue()
    sessions = sessions_in_both(served, code, pids)
    environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
    (metrics_dir,) = [
        v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    ]
    assert Path(metrics_dir.decode()).is_dir()
    served.process.signal(signal.SIGTERM)
    for sock, f in sessions:
        sock.sendall(b"b NOOP\r\n")  # the grace: sessions still work
        assert f.readline().startswith(b"b OK")
    for sock, f in sessions:
        assert f.read().endswith(b"* BYE apppass is shutting down\r\n")
        sock.close()
    assert served.process.wait() == 0, served.process.stderr
    text = served.process.stderr
    for number, pid in workers.items():
        assert f"worker {number} (pid {pid}) exited with status 0" in text
    assert "Traceback" not in text
    assert not port_accepts(served.ports["imap"])
    assert not Path(metrics_dir.decode()).exists()  # the supervisor's private folder is gone


# --- cannot start ------------------------------------------------------------------------------


def test_a_port_in_use_is_the_same_prompt_error_as_with_one_process(serve_workers, tmp_path):
    with taken_port() as port:
        served = serve_workers()
        config = yaml.safe_load(served.config.read_text())
        config["listeners"][0]["bind"] = f"127.0.0.1:{port}"
        served.config.write_text(yaml.safe_dump(config))
        process = Process(tmp_path / "again", "-c", str(served.config), "serve")
        assert process.wait() == 1
    assert process.stderr.endswith(
        f"apppass: cannot start: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    )


def test_a_worker_that_dies_at_start_makes_the_supervisor_give_up(serve_workers, tmp_path):
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not a certificate\n")
    served = serve_workers(cert=bad)
    assert served.process.wait(timeout=60) == 1
    text = served.process.stderr
    assert "restarting it in 0.25s" in text and "restarting it in 0.5s" in text
    assert re.search(
        r"apppass: cannot start: worker \d exited with status 1 before it was ready, "
        r"5 times in a row \(its reason is above\)\n",
        text,
    ), text
    assert "apppass worker 1: cannot start:" in text
    assert "Traceback" not in text


# --- systemd -----------------------------------------------------------------------------------


def test_systemd_hears_the_supervisor_only_and_a_hung_worker_is_restarted(serve_workers, tmp_path):
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(address)
        systemd.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        systemd.settimeout(PROMPTLY)

        def heard() -> tuple[int, str]:
            """(sender's pid, message), skipping watchdog pings."""
            while True:
                data, ancillary, _, _ = systemd.recvmsg(4096, socket.CMSG_SPACE(12))
                ((_, _, creds),) = ancillary
                pid = struct.unpack("iII", creds[:12])[0]
                assert pid == served.process.popen.pid, data  # never a worker
                if data != b"WATCHDOG=1":
                    return pid, data.decode()

        env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
        served = serve_workers(env=env)
        _, message = heard()
        assert message.startswith("READY=1")
        workers = served.workers()  # both said so before READY=1 went out
        data = b""
        while data != b"WATCHDOG=1":
            data = systemd.recv(4096)
        os.kill(workers[2], signal.SIGSTOP)  # a hung worker
        served.wait_for_log(rf"worker 2 \(pid {workers[2]}\) has not answered for \d+s; killing it")
        served.wait_for_log(rf"worker 2 \(pid {workers[2]}\) was killed by SIGKILL; restarting it")
        served.wait_for_log(rf"worker 2 \(pid (?!{workers[2]}\))\d+\) is ready")
        served.process.signal(signal.SIGHUP)
        assert heard()[1] == "RELOADING=1\nSTATUS=reloading"
        assert heard()[1] == "READY=1\nSTATUS=reloaded"
        served.process.signal(signal.SIGTERM)
        assert heard()[1] == "STOPPING=1\nSTATUS=draining"
        assert served.process.wait() == 0, served.process.stderr
