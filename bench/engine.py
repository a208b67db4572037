"""The login engine under the benchmarks' login loads (bench/load.py's `logins()`, `SessionPool`
and `storm()` drive it), and the `LoginResult` every generator fills: logins on non-blocking
sockets and one epoll loop (connect, greeting, LOGIN, tagged reply; then LOGOUT and close, or
keep the session), in plaintext or after STARTTLS, closed or open loop. A module of its own
because it is the part that must stay cheap: about 0.2 ms of CPU per plaintext login, several
times less than asyncio's transports and futures, so that the servers saturate first.

Latency is measured from connect() to the tagged reply of LOGIN. Every loop is bounded in
count and in time; only 127.0.0.0/8 is ever contacted.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import select
import socket
import ssl
import time
from dataclasses import dataclass, field

MAX_REPLY_LINES = 1000  # lines read while waiting for one reply before giving up


def check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"benchmarks only talk to loopback addresses, not {host}")


def quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class LoginResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful logins only
    ok: int = 0
    failed: int = 0
    errors: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # failure reply texts, counted
    elapsed: float = 0.0
    cpu: float = 0.0  # this process's CPU seconds during the run
    timed_out: bool = False
    sessions: list = field(default_factory=list)  # open transports (asyncio, keep=True)
    skipped: int = 0  # open loop: logins not started because too many were in flight
    by_kind: dict = field(default_factory=dict)  # classify(): latencies per kind of reply
    sending: float = 0.0  # seconds from the first login started to the last

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def count_reply(self, text: str) -> None:
        self.replies[text] = self.replies.get(text, 0) + 1


class LoginEngine:
    """Plaintext IMAP logins on non-blocking sockets driven by one epoll loop: several times
    cheaper per login than asyncio's transports and futures, so that on a small machine the
    generator leaves the cores to the servers. Closed loop (`concurrency` clients, each starting
    its next login when the last one ended) or open loop (`rate` new logins a second, whatever
    the replies, at most `max_in_flight` at once). Logged-in sessions can be kept open (`keep`).
    """

    GREETING, STARTTLS, HANDSHAKE, REPLY = 1, 2, 3, 4

    def __init__(
        self,
        host: str,
        port: int,
        *,
        source: str | None = None,
        timeout: float = 30.0,
        starttls: ssl.SSLContext | None = None,
    ) -> None:
        check_loopback(host)
        if source is not None:
            check_loopback(source)
        self.addr = (host, port)
        self.source = source
        self.timeout = timeout
        self.starttls = starttls
        self.kept: list[socket.socket] = []

    def run(
        self,
        creds: list,
        count: int,
        *,
        concurrency: int = 16,
        rate: float | None = None,
        max_in_flight: int = 1000,
        keep: bool = False,
        deadline_s: float = 120.0,
        classify_replies: bool = False,
        result: LoginResult | None = None,
    ) -> LoginResult:
        result = result or LoginResult()
        ep = select.epoll()
        conns: dict[int, list] = {}  # fd -> [socket, state, buffer, t0, credential]
        started = 0
        skipped = 0
        last_start = time.perf_counter()
        cpu0 = cpu_seconds()
        t_start = time.perf_counter()
        deadline = time.monotonic() + deadline_s
        next_sweep = time.monotonic() + 0.5
        by_kind: dict[str, list[float]] = {}

        def start_one() -> None:
            nonlocal started, last_start
            last_start = time.perf_counter()
            cred = creds[started % len(creds)]
            started += 1
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.source:
                sock.bind((self.source, 0))
            t0 = time.perf_counter()
            err = sock.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                fail(None, f"error: connect: {os.strerror(err)}")
                return
            conns[sock.fileno()] = [sock, self.GREETING, b"", t0, cred]
            ep.register(sock.fileno(), select.EPOLLIN)

        def fail(fd, text: str) -> None:
            result.errors += 1
            result.count_reply(text[:120])
            if fd is not None:
                end(fd)

        def end(fd, keep_open: bool = False) -> None:
            sock = conns.pop(fd)[0]
            ep.unregister(fd)
            if keep_open:
                self.kept.append(sock)
            else:
                sock.close()

        def failed_tls(fd, line: bytes) -> None:
            result.failed += 1
            result.count_reply("STARTTLS: " + line.decode(errors="replace")[:110])
            end(fd)

        def finished(fd, conn, line: bytes) -> None:
            latency = time.perf_counter() - conn[3]
            if classify_replies:
                kind = classify(line)
                by_kind.setdefault(kind, []).append(latency)
            if line.startswith(b"a OK"):
                result.ok += 1
                result.latencies.append(latency)
                if keep:
                    end(fd, keep_open=True)
                    return
                try:
                    conn[0].send(b"z LOGOUT\r\n")
                except OSError:
                    pass
            else:
                result.failed += 1
                result.count_reply(line.decode(errors="replace")[:120])
            end(fd)

        def wanted() -> int:
            if rate is None:
                return min(count - started, concurrency - len(conns))
            return min(count, int((time.perf_counter() - t_start) * rate) + 1) - started - skipped

        def send_login(conn) -> None:
            cred = conn[4]
            conn[1] = self.REPLY
            conn[0].send(f"a LOGIN {quote(cred.login)} {quote(cred.secret)}\r\n".encode())

        def handshake(fd, conn) -> None:
            """One step of the client's TLS handshake; LOGIN once it is done."""
            try:
                conn[0].do_handshake()
            except ssl.SSLWantReadError:
                return  # epoll wakes us when the server's next flight arrives
            except (OSError, ValueError) as exc:  # SSLError and SSLWantWriteError included
                fail(fd, f"error: TLS handshake: {type(exc).__name__}: {exc}")
                return
            send_login(conn)

        def read(sock) -> bytes:
            """What the server sent; for TLS all the plaintext OpenSSL has decrypted."""
            data = sock.recv(65536)
            if data and isinstance(sock, ssl.SSLSocket):
                while sock.pending():
                    data += sock.recv(65536)
            return data

        while time.monotonic() < deadline:
            n = wanted()
            for _ in range(max(0, n)):
                if rate is not None and len(conns) >= max_in_flight:
                    skipped += 1
                    continue
                start_one()
            if not conns and started + skipped >= count:
                break
            for fd, _events in ep.poll(0.002 if rate is not None else 0.5):
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn[1] == self.HANDSHAKE:
                    handshake(fd, conn)
                    continue
                try:
                    data = read(conn[0])
                except ssl.SSLWantReadError:
                    continue  # a TLS record not yet complete, or only a session ticket
                except OSError as exc:
                    fail(fd, f"error: {type(exc).__name__}: {exc}")
                    continue
                if not data:
                    fail(fd, "error: closed by the server")
                    continue
                buf = conn[2] + data
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    line = line.rstrip(b"\r")
                    if conn[1] == self.GREETING and line.startswith(b"* "):
                        if self.starttls is None:
                            send_login(conn)
                        else:
                            conn[1] = self.STARTTLS
                            conn[0].send(b"s STARTTLS\r\n")
                    elif conn[1] == self.STARTTLS and line.startswith(b"s "):
                        if not line.startswith(b"s OK"):
                            failed_tls(fd, line)
                        else:
                            # Whatever else came in plaintext is dropped (RFC 9051 §6.2.1).
                            assert self.starttls is not None  # the STARTTLS state needs it
                            conn[0] = self.starttls.wrap_socket(
                                conn[0], server_hostname="localhost", do_handshake_on_connect=False
                            )
                            conn[1], conn[2] = self.HANDSHAKE, b""
                            handshake(fd, conn)
                        buf = None
                        break
                    elif conn[1] == self.REPLY and line.startswith(b"a "):
                        finished(fd, conn, line)
                        buf = None
                        break
                if buf is not None:
                    conn[2] = buf
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + 0.5
                too_old = time.perf_counter() - self.timeout
                for fd in [fd for fd, c in conns.items() if c[3] < too_old]:
                    fail(fd, "error: timeout")
        for fd in list(conns):
            fail(fd, "error: benchmark deadline")
        ep.close()
        result.elapsed = time.perf_counter() - t_start
        result.cpu += cpu_seconds() - cpu0
        result.timed_out = started + skipped < count
        result.skipped = skipped
        result.by_kind = by_kind
        result.sending = last_start - t_start
        return result

    def close_kept(self) -> None:
        for sock in self.kept:
            sock.close()
        self.kept.clear()


def classify(reply: bytes) -> str:
    if b"[AUTHENTICATIONFAILED]" in reply:
        return "checked"  # went through the Authenticator: a verification was spent
    if b"Too many login attempts" in reply:
        return "limited"  # refused unseen by the per-address failure limiter
    if b"[UNAVAILABLE]" in reply:
        return "temporary"  # e.g. the argon2 pool's queue was full
    if reply.startswith(b"a OK"):
        return "granted"
    return "other"


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-p * len(ordered) // 100)))
    return ordered[int(rank) - 1]
