"""The benchmark stack: a private Dovecot as the upstream, `apppass serve` in front of it and the
nginx mail proxy beside it (its peer), all real processes on loopback, plus what the benchmarks
read from them (RSS, CPU time, descriptors).

    stack = Stack(users=40)                  # CA, Dovecot users b00..b39, the proxy's files
    stack.start()                            # Dovecot, then codes can be issued
    codes = stack.issue_codes(150)           # [(login, code)], hashed in parallel
    proxy = stack.proxy("plain")             # apppass -c plain/apppass.yaml serve
    proxy.start(); proxy.rss_kib(); proxy.cpu()
    nginx = stack.start_nginx()              # tests/servers/nginx.py: nginx + its auth_http
    stack.stop()

Dovecot comes from tests/servers/dovecot.py (reused, not copied) with settings for load
(NOTES.md): mail processes that serve many sessions each (`service_count = 0`,
`client_limit`), long-lived login processes ("high-performance mode"), no per-login auth log.
The proxy runs as its own process so its RSS and CPU time are its own, and the load generator
does not share its GIL. Both inherit the bench process's RLIMIT_NOFILE (raised by run.py).
"""

from __future__ import annotations

import os
import shutil
import ssl
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.servers.common import (  # noqa: E402
    LOOPBACK,
    ServerProcess,
    free_port,
    remove_tree,
    short_tempdir,
    wait_for_port,
)
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER, Dovecot  # noqa: E402
from tests.servers.nginx import NginxMail  # noqa: E402
from tests.support.ca import TestCA  # noqa: E402

APPPASS = REPO / ".venv" / "bin" / "apppass"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Dovecot sized for 10,000+ idle sessions: each imap process serves up to IMAP_CLIENTS sessions
# (all users share uid `mail`, so one process may serve several users), so 10,000 sessions are
# about 100 processes instead of 10,000. Login processes live long and take many connections
# (Dovecot's "high-performance mode"), which is what a tuned Dovecot does and what the direct
# comparison should be made against. auth_verbose off: one log line per login is not what a
# busy production server runs with.
IMAP_CLIENTS = 100
DOVECOT_EXTRA = f"""
# --- bench/stack.py: sized for load (NOTES.md) ---
auth_verbose = no
service imap {{
  service_count = 0
  client_limit = {IMAP_CLIENTS}
  process_limit = 500
}}
service imap-login {{
  service_count = 0
  process_min_avail = {os.cpu_count() or 2}
  client_limit = 4000
}}
"""

# The proxy's account for each Dovecot user: id, upstream identity, the legacy-mail group.
LEGACY_GROUP = "legacy-mail"


def user_name(i: int) -> str:
    return f"b{i:03d}"


def user_password(name: str) -> str:
    return f"{name}-Dovecot-pw"


@dataclass(frozen=True)
class Credential:
    login: str
    secret: str


class Stack:
    """Files, Dovecot and proxy processes of one benchmark session (see the module docstring)."""

    def __init__(self, users: int = 40) -> None:
        self.root = short_tempdir("apb-")
        self.ca = TestCA.create(self.root / "ca")
        self.users = [user_name(i) for i in range(users)]
        self.relay_user = "relay"
        dovecot_users = {u: user_password(u) for u in [*self.users, self.relay_user]}
        self.dovecot = Dovecot(self.ca, users=dovecot_users, extra_config=DOVECOT_EXTRA)
        self.proxies: dict[str, ProxyProcess] = {}
        self.nginx: NginxMail | None = None
        self._settings = None
        self._client_ssl: ssl.SSLContext | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.dovecot.start()
        self._write_directory()

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()
        if self.nginx is not None:
            self.nginx.stop()
        self.dovecot.stop()

    def cleanup(self) -> None:
        self.stop()
        if self.nginx is not None:
            remove_tree(self.nginx.root)
        remove_tree(self.dovecot.root)
        remove_tree(self.root)

    # -- the peer: nginx ---------------------------------------------------------------------

    def start_nginx(self) -> NginxMail:
        """nginx's mail proxy in front of the same Dovecot (plaintext upstream: nginx has no
        upstream TLS), logging in as USER*MASTER like apppass; its auth service knows every
        bench user with its Dovecot password. Raises ServerError when it cannot start."""
        if self.nginx is None:
            self.nginx = self._nginx()
        self.nginx.start()
        return self.nginx

    def nginx_variant(self, proxy_buffer: str) -> NginxMail:
        """Another nginx like start_nginx's but with `proxy_buffer` (not started; the caller
        stops it and removes its folder)."""
        return self._nginx(proxy_buffer=proxy_buffer)

    def _nginx(self, proxy_buffer: str | None = None) -> NginxMail:
        users = {u: user_password(u) for u in [*self.users, self.relay_user]}
        return NginxMail(
            self.ca,
            self.dovecot.imap_port,
            users,
            MASTER_USER,
            MASTER_PASSWORD,
            proxy_buffer=proxy_buffer,
        )

    # -- the proxy ---------------------------------------------------------------------------

    def _write_directory(self) -> None:
        accounts = {
            u: {"id": f"key-{u}", "upstream": u, "groups": [LEGACY_GROUP]}
            for u in [*self.users, self.relay_user]
        }
        (self.root / "users.yaml").write_text(yaml.safe_dump({"accounts": accounts}))
        secret = self.root / "dovecot-master"
        secret.write_text(MASTER_PASSWORD + "\n")
        secret.chmod(0o600)

    def proxy(
        self, name: str, upstream_tls: str = "none", workers: int | str | None = None
    ) -> ProxyProcess:
        """The proxy process `name` (created on first use; not started). All share one store
        and directory. Listeners: `plain` (no TLS, plaintext logins from 127.0.0.0/8), `starttls`
        and `tls` (implicit TLS). upstream_tls: none (Dovecot's imap port) or implicit (its imaps
        port). workers: `serve.workers`."""
        if name in self.proxies:
            return self.proxies[name]
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        plain_port, starttls_port, tls_port = free_port(), free_port(), free_port()
        upstream = {
            "host": LOOPBACK,
            "tls": upstream_tls,
            "login": "authzid",
            "master_user": MASTER_USER,
            "master_password_file": str(self.root / "dovecot-master"),
            "send_client_address": True,
        }
        if upstream_tls == "implicit":
            upstream.update(port=self.dovecot.imaps_port, ca_file=str(self.ca.ca))
        else:
            upstream.update(port=self.dovecot.imap_port)
        config = {
            "store": {"sqlite": str(self.root / "codes.db")},
            "directory": {"static": str(self.root / "users.yaml")},
            "policy": {"legacy_group": LEGACY_GROUP},
            # codes.argon2: the defaults of proxy/config.py (Argon2Settings), on purpose.
            # auth: the defaults except failure_delay (0 s: the benchmarks measure the proxy's
            # work, not a deliberate sleep; the storm's attempts would otherwise all wait 2 s).
            "auth": {"failure_delay": "0s"},
            # limits: every load comes from 127.0.0.1 as one account; the caps would cut the
            # memory measure (thousands of idle sessions) short of what one process holds.
            "limits": {
                "max_connections": 50_000,
                "max_preauth_per_address": 50_000,
                "max_sessions_per_account": 50_000,
            },
            "audit": {"file": str(folder / "audit.jsonl")},
            "listeners": [
                {
                    "name": "plain",
                    "protocol": "imap",
                    "bind": f"{LOOPBACK}:{plain_port}",
                    "tls": "none",
                    "plaintext_auth_from": ["127.0.0.0/8"],
                },
                {
                    "name": "starttls",
                    "protocol": "imap",
                    "bind": f"{LOOPBACK}:{starttls_port}",
                    "tls": "starttls",
                    "cert_file": str(self.ca.cert),
                    "key_file": str(self.ca.key),
                },
                {
                    "name": "tls",
                    "protocol": "imap",
                    "bind": f"{LOOPBACK}:{tls_port}",
                    "tls": "implicit",
                    "cert_file": str(self.ca.cert),
                    "key_file": str(self.ca.key),
                },
            ],
            "upstream": {"imap": upstream},
        }
        if workers is not None:
            config["serve"] = {"workers": workers}
        path = folder / "apppass.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        proxy = ProxyProcess(name, path, folder, plain_port, tls_port, starttls_port)
        self.proxies[name] = proxy
        return proxy

    @property
    def settings(self):
        """The proxy's settings (argon2 parameters, policy) as `apppass serve` will read them."""
        if self._settings is None:
            from proxy.config import load

            self._settings = load(self.proxy("plain").config)
        return self._settings

    # -- codes -------------------------------------------------------------------------------

    def issue_codes(
        self, count: int, label: str, users: list[str] | None = None, threads: int | None = None
    ) -> list[Credential]:
        """`count` new codes, spread round-robin over `users` (default: all bench users), issued
        with proxy.codes.issue.issue_code, so hashed with the configured argon2 parameters.
        argon2-cffi releases the GIL: accounts are split over `threads` threads (one account per
        thread, so two threads never pick a selector for the same account at once)."""
        from proxy.codes.hashing import CodeHasher
        from proxy.codes.issue import issue_code
        from proxy.codes.open import open_store
        from proxy.directory.open import open_directory

        settings = self.settings
        users = users or self.users
        per_user: dict[str, int] = defaultdict(int)
        for i in range(count):
            per_user[users[i % len(users)]] += 1
        cap = settings.codes.max_per_account
        if max(per_user.values(), default=0) > cap:
            raise ValueError(
                f"{count} codes over {len(users)} accounts exceed max_per_account={cap}"
            )
        directory = open_directory(settings.directory, settings.policy)
        store = open_store(settings.store)
        hasher = CodeHasher(settings.codes.argon2)
        issued: dict[str, list[str]] = {}
        lock = threading.Lock()

        def for_user(login: str, n: int) -> None:
            out = [
                issue_code(
                    settings, directory, store, hasher, login=login, label=f"{label} {j}"
                ).code.grouped()
                for j in range(n)
            ]
            with lock:
                issued[login] = out

        try:
            with ThreadPoolExecutor(threads or os.cpu_count() or 2) as pool:
                for f in [pool.submit(for_user, u, n) for u, n in per_user.items()]:
                    f.result()
        finally:
            store.close()
            directory.close()
        # Interleave accounts again, in the round-robin order asked for.
        order = [users[i % len(users)] for i in range(count)]
        taken: dict[str, int] = defaultdict(int)
        out = []
        for login in order:
            out.append(Credential(login, issued[login][taken[login]]))
            taken[login] += 1
        return out

    def dovecot_credentials(self, users: list[str] | None = None) -> list[Credential]:
        return [Credential(u, user_password(u)) for u in (users or self.users)]

    # -- TLS ---------------------------------------------------------------------------------

    @property
    def client_ssl(self) -> ssl.SSLContext:
        """One client context for the whole benchmark (NOTES.md: not one per connection)."""
        if self._client_ssl is None:
            self._client_ssl = self.ca.client_context()
        return self._client_ssl

    # -- Dovecot processes -------------------------------------------------------------------

    def dovecot_pids(self) -> list[int]:
        """Dovecot's master and its children (they stay in the master's process group)."""
        master = self.dovecot.process.pid
        return [pid for pid, st in _all_stats() if st["pgrp"] == master] if master else []

    def dovecot_cpu(self) -> float:
        """CPU seconds used by Dovecot so far: live processes plus the children the master
        already reaped (its cutime/cstime)."""
        master = self.dovecot.process.pid
        total = 0.0
        for pid, st in _all_stats():
            if st["pgrp"] == master:
                total += st["cpu"] + (st["ccpu"] if pid == master else 0.0)
        return total

    def dovecot_pss_kib(self) -> int:
        """Proportional set size of all Dovecot processes (shared pages counted once overall)."""
        return sum(_pss_kib(pid) for pid in self.dovecot_pids())


class ProxyProcess:
    """`apppass -c CONFIG serve` as a child process (its own session, stopped by PID)."""

    def __init__(
        self,
        name: str,
        config: Path,
        folder: Path,
        plain_port: int,
        tls_port: int,
        starttls_port: int,
    ) -> None:
        self.name = name
        self.config = config
        self.folder = folder
        self.plain_port = plain_port
        self.tls_port = tls_port
        self.starttls_port = starttls_port
        self.process = ServerProcess(
            f"apppass-{name}",
            [str(APPPASS), "-c", str(config), "serve"],
            output=folder / "output.log",
            cwd=folder,
            stop_grace=10.0,
        )

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None or not self.process.running:
            raise RuntimeError(f"proxy {self.name} is not running\n{self.process.log_tail()}")
        return pid

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()
        try:
            for port in (self.plain_port, self.starttls_port, self.tls_port):
                wait_for_port(port, LOOPBACK, timeout, self.process)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def rss_kib(self) -> int:
        """VmRSS from /proc/PID/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def nofile_limit(self) -> tuple[int, int]:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
        raise RuntimeError("no Max open files")

    def _processes(self) -> list[int]:
        """The serving process and, with `serve.workers`, its workers: its children (each
        worker runs in a session of its own, so the process group does not find them)."""
        pid = self.pid
        return [pid] + [other for other, st in _all_stats() if st["ppid"] == pid]

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of the whole process, of its main thread = the reactor). With
        `serve.workers`, the first figure covers the workers too, the second only the
        supervisor's reactor."""
        pid = self.pid
        return (
            sum(_stat(f"/proc/{other}/stat")["cpu"] for other in self._processes()),
            _stat(f"/proc/{pid}/task/{pid}/stat")["cpu"],
        )

    def pss_kib(self) -> int:
        """Proportional set size of the proxy's processes (shared pages counted once overall:
        comparable with nginx's master and workers)."""
        return sum(_pss_kib(other) for other in self._processes())

    def audit_lines(self) -> list[str]:
        try:
            return (self.folder / "audit.jsonl").read_text().splitlines()
        except FileNotFoundError:
            return []


# -- /proc helpers ----------------------------------------------------------------------------


def _stat(path: str) -> dict:
    text = Path(path).read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    # fields[0] is field 3 (state): ppid is field 4, pgrp 5, utime/stime 14/15, cutime/cstime 16/17.
    return {
        "ppid": int(fields[1]),
        "pgrp": int(fields[2]),
        "cpu": (int(fields[11]) + int(fields[12])) / CLK_TCK,
        "ccpu": (int(fields[13]) + int(fields[14])) / CLK_TCK,
    }


def _all_stats():
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                yield int(entry.name), _stat(f"/proc/{entry.name}/stat")
            except (OSError, ValueError, IndexError):
                continue


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_stat() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat: busy is user,
    nice, system, irq and softirq time on all CPUs; steal is time the hypervisor gave away."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


class CpuMeter:
    """CPU seconds used by the proxy (whole process and reactor thread), nginx and its auth
    service (when they run), Dovecot and this process between start() and stop(), as a share of
    one core over the wall time (100 = one core busy); `steal` is CPU time the hypervisor took
    away, summed over all CPUs."""

    def __init__(
        self, stack: Stack, proxy: ProxyProcess | None, nginx: NginxMail | None = None
    ) -> None:
        """nginx: the nginx to measure, when not the stack's own (which is measured whenever it
        runs)."""
        self.stack, self.proxy = stack, proxy
        nginx = nginx or stack.nginx
        self.nginx = nginx if nginx is not None and nginx.process.running else None

    def _sample(self) -> dict:
        ru = os.times()
        proxy_total, reactor = self.proxy.cpu() if self.proxy else (0.0, 0.0)
        return {
            "wall": time.perf_counter(),
            "proxy": proxy_total,
            "proxy_reactor": reactor,
            "nginx": self.nginx.cpu() if self.nginx else 0.0,
            "nginx_auth": self.nginx.auth_cpu() if self.nginx else 0.0,
            "dovecot": self.stack.dovecot_cpu(),
            "generator": ru.user + ru.system,
            "machine": _cpu_stat()[0],
            "steal": _cpu_stat()[1],
        }

    def start(self) -> CpuMeter:
        self._a = self._sample()
        return self

    def stop(self, extra_generator_cpu: float = 0.0) -> dict:
        """Percent of one core per part. `other`: the machine's busy time not used by the proxy,
        nginx, its auth service, Dovecot or the generator (kernel softirq work for loopback
        traffic, and anything else running on the machine: a high figure means the run was
        disturbed)."""
        b = self._sample()
        wall = b["wall"] - self._a["wall"]
        d = {k: b[k] - self._a[k] for k in b}
        d["generator"] += extra_generator_cpu
        d["other"] = d["machine"] - sum(
            d[k] for k in ("proxy", "nginx", "nginx_auth", "dovecot", "generator")
        )
        keys = ["proxy", "proxy_reactor", "nginx", "nginx_auth", "dovecot", "generator"]
        out = {k: round(100.0 * d[k] / wall, 1) for k in [*keys, "other", "steal"]}
        if not self.proxy:
            out.pop("proxy"), out.pop("proxy_reactor")
        if not self.nginx:
            out.pop("nginx"), out.pop("nginx_auth")
        return out


def append_message(host: str, port: int, login: str, password: str, size: int) -> int:
    """APPEND a text message of about `size` octets to login's INBOX, directly to Dovecot;
    returns its exact size."""
    import socket

    line = b"X" * 74 + b"\r\n"
    header = (
        f"From: bench@example.test\r\nTo: {login}@example.test\r\n"
        f"Subject: apppass relay benchmark\r\n\r\n"
    ).encode()
    body = line * ((size - len(header)) // len(line))
    message = header + body
    with socket.create_connection((host, port), timeout=60) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(f'a LOGIN "{login}" "{password}"\r\n'.encode())
        _expect_tagged(f, b"a")
        s.sendall(f"b APPEND INBOX {{{len(message)}+}}\r\n".encode() + message + b"\r\n")
        _expect_tagged(f, b"b")
        s.sendall(b"c LOGOUT\r\n")
    return len(message)


def _expect_tagged(f, tag: bytes) -> bytes:
    for _ in range(1000):
        line = f.readline()
        if not line:
            raise RuntimeError(f"connection closed waiting for {tag!r}")
        if line.startswith(tag + b" "):
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(f"{tag!r} failed: {line!r}")
            return line
    raise RuntimeError(f"no tagged reply for {tag!r}")


def dovecot_version() -> str:
    import subprocess

    exe = shutil.which("dovecot") or "/usr/sbin/dovecot"
    try:
        return subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"
