"""Load generators for the benchmarks: IMAP clients on loopback, light enough that the servers
saturate first (every test reports the generator's CPU share next to the servers').

* `logins()`: plaintext and STARTTLS logins run on bench/engine.py's `LoginEngine` (non-blocking
  sockets and one epoll loop; `starttls=` a client SSLContext: a full handshake each, no
  session resumption), closed loop (`concurrency` clients).
* `logins(..., ssl_ctx=...)` and TLS `SessionPool`s: asyncio (only the memory test needs many
  TLS sessions; their CPU cost does not matter there). One SSLContext for all connections.
* `SessionPool`: idle logged-in sessions, grown in steps (memory test).
* `fetch()`: a blocking client that FETCHes one big message again and again (relay test).
* `legit_logins()`: one login a second from a given source address (storm test), blocking.
* `storm()`: open-loop wrong-code logins at a fixed rate, one connection each. Run it in its
  own process (`python bench/load.py storm ...` prints JSON) so that it shares no GIL and no
  event loop with the client whose latency is measured.

Latency is measured from connect() to the tagged reply of LOGIN. Every loop is bounded in
count and in time; only 127.0.0.0/8 is ever contacted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script (the storm generator's own process), the repository is not on sys.path yet.
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.engine import (  # noqa: E402
    MAX_REPLY_LINES,
    LoginEngine,
    LoginResult,
    check_loopback,
    cpu_seconds,
    percentile,
    quote,
)


class ImapClient(asyncio.Protocol):
    """Just enough IMAP for logging in: collects lines, wakes whoever waits for a prefix."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self._lines: list[bytes] = []
        self._want: bytes | None = None
        self._waiter: asyncio.Future | None = None
        self._lost: Exception | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if b"\n" not in data:
            return
        *lines, self._buf = self._buf.split(b"\n")
        self._lines.extend(lines)
        self._check()

    def connection_lost(self, exc) -> None:
        self._lost = exc or ConnectionError("connection closed")
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(self._lost)

    def _check(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        for i, line in enumerate(self._lines):
            if line.startswith(self._want):
                del self._lines[: i + 1]
                self._waiter.set_result(line.rstrip(b"\r"))
                return
        if len(self._lines) > MAX_REPLY_LINES:
            self._waiter.set_exception(ConnectionError("too many lines without the reply"))

    async def line(self, prefix: bytes) -> bytes:
        """The next line starting with prefix (earlier lines are dropped)."""
        if self._lost is not None:
            raise self._lost
        self._want = prefix
        self._waiter = asyncio.get_running_loop().create_future()
        self._check()
        return await self._waiter


async def login_once(
    host: str,
    port: int,
    login: str,
    secret: str,
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    source: str | None = None,
    keep: bool = False,
    timeout: float = 30.0,
):
    """(latency seconds, tagged reply line, transport if kept and logged in)."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    transport, client = await asyncio.wait_for(
        loop.create_connection(
            ImapClient,
            host,
            port,
            ssl=ssl_ctx,
            server_hostname="localhost" if ssl_ctx else None,
            local_addr=(source, 0) if source else None,
        ),
        timeout,
    )
    try:
        await asyncio.wait_for(client.line(b"* "), timeout)
        transport.write(f"a LOGIN {quote(login)} {quote(secret)}\r\n".encode())
        reply = await asyncio.wait_for(client.line(b"a "), timeout)
        latency = time.perf_counter() - t0
    except BaseException:
        transport.abort()
        raise
    if keep and reply.startswith(b"a OK"):
        return latency, reply, transport
    if reply.startswith(b"a OK"):
        transport.write(b"z LOGOUT\r\n")
    transport.close()
    return latency, reply, None


async def _run_logins(
    host,
    port,
    creds,
    count,
    concurrency,
    *,
    ssl_ctx=None,
    source=None,
    keep=False,
    deadline_s=120.0,
    result=None,
) -> LoginResult:
    result = result or LoginResult()
    issued = 0
    deadline = time.monotonic() + deadline_s
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()

    async def worker():
        nonlocal issued
        while issued < count and time.monotonic() < deadline:
            cred = creds[issued % len(creds)]
            issued += 1
            try:
                latency, reply, transport = await login_once(
                    host,
                    port,
                    cred.login,
                    cred.secret,
                    ssl_ctx=ssl_ctx,
                    source=source,
                    keep=keep,
                    timeout=max(1.0, deadline - time.monotonic()),
                )
            except (OSError, TimeoutError, ConnectionError, ssl.SSLError) as exc:
                result.errors += 1
                result.count_reply(f"error: {type(exc).__name__}: {exc}"[:120])
                continue
            if reply.startswith(b"a OK"):
                result.ok += 1
                result.latencies.append(latency)
                if transport is not None:
                    result.sessions.append(transport)
            else:
                result.failed += 1
                result.count_reply(reply.decode(errors="replace")[:120])

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    result.elapsed = time.perf_counter() - t0
    result.cpu = cpu_seconds() - cpu0
    result.timed_out = issued < count
    return result


def logins(
    host: str,
    port: int,
    creds: list,
    count: int,
    concurrency: int,
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    starttls: ssl.SSLContext | None = None,
    source: str | None = None,
    deadline_s: float = 120.0,
) -> LoginResult:
    """`count` logins cycling through `creds` (objects with .login and .secret) by
    `concurrency` clients, each waiting for its reply before the next login (closed loop).
    ssl_ctx: implicit TLS (asyncio); starttls: STARTTLS before LOGIN (the epoll engine)."""
    check_loopback(host)
    if ssl_ctx is None:
        return LoginEngine(host, port, source=source, starttls=starttls).run(
            creds, count, concurrency=concurrency, deadline_s=deadline_s
        )
    return asyncio.run(
        _run_logins(
            host,
            port,
            creds,
            count,
            concurrency,
            ssl_ctx=ssl_ctx,
            source=source,
            deadline_s=deadline_s,
        )
    )


class SessionPool:
    """Idle logged-in sessions kept open, grown in steps (memory test). Plaintext sessions are
    plain sockets (LoginEngine, keep=True); TLS sessions live on an asyncio loop."""

    def __init__(
        self,
        host: str,
        port: int,
        creds: list,
        concurrency: int = 64,
        *,
        ssl_ctx: ssl.SSLContext | None = None,
    ) -> None:
        check_loopback(host)
        self.host, self.port, self.creds, self.concurrency = host, port, creds, concurrency
        self.ssl_ctx = ssl_ctx
        self.engine = LoginEngine(host, port) if ssl_ctx is None else None
        self.loop = asyncio.new_event_loop() if ssl_ctx is not None else None
        self.result = LoginResult()

    @property
    def open(self) -> int:
        return len(self.engine.kept) if self.engine else len(self.result.sessions)

    def grow_to(self, total: int, deadline_s: float = 300.0) -> LoginResult:
        want = total - self.open
        if want <= 0:
            return self.result
        if self.engine is not None:
            return self.engine.run(
                self.creds,
                want,
                concurrency=self.concurrency,
                keep=True,
                deadline_s=deadline_s,
                result=self.result,
            )
        return self.loop.run_until_complete(
            _run_logins(
                self.host,
                self.port,
                self.creds,
                want,
                self.concurrency,
                ssl_ctx=self.ssl_ctx,
                keep=True,
                deadline_s=deadline_s,
                result=self.result,
            )
        )

    def idle(self, seconds: float) -> None:
        """Wait, letting the TLS sessions' loop run meanwhile."""
        if self.loop is not None:
            self.loop.run_until_complete(asyncio.sleep(seconds))
        else:
            time.sleep(seconds)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close_kept()
            return
        for transport in self.result.sessions:
            transport.abort()
        self.result.sessions.clear()
        self.loop.run_until_complete(asyncio.sleep(0.2))
        self.loop.close()


# -- relay: FETCH one big message ------------------------------------------------------------


@dataclass
class FetchResult:
    octets: int  # octets received per FETCH: the message and the reply's framing
    seconds: list[float]  # per fetch, FETCH sent to tagged OK
    cpu: float  # this thread's CPU seconds during the timed fetches

    @property
    def mb_per_s(self) -> float:
        return self.octets * len(self.seconds) / sum(self.seconds) / 1e6


def fetch(
    host: str,
    port: int,
    login: str,
    secret: str,
    min_seconds: float,
    max_repeats: int = 100,
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    timeout: float = 60.0,
) -> FetchResult:
    """Log in, SELECT INBOX, FETCH message 1 (BODY.PEEK[]) once to warm up, then again and
    again, timed, until `min_seconds` have passed (at least twice, at most `max_repeats`).
    Reads into a preallocated buffer and looks only at each chunk's tail."""
    check_loopback(host)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if ssl_ctx is not None:
        sock = ssl_ctx.wrap_socket(sock, server_hostname="localhost")
    view = memoryview(bytearray(4 << 20))

    def until_tagged(tag: bytes) -> tuple[int, bytes]:
        """Octets read until the tagged reply (the last line the server sends), and that line."""
        total, tail = 0, b"\r\n"  # as if a line had just ended, so a lone reply line matches
        needle = b"\r\n" + tag + b" "
        stop = time.monotonic() + timeout
        while time.monotonic() < stop:
            n = sock.recv_into(view)
            if n == 0:
                raise ConnectionError(f"closed while waiting for {tag!r}")
            total += n
            tail = (tail + bytes(view[max(0, n - 1024) : n]))[-1024:]
            i = tail.rfind(needle)
            if i >= 0 and tail.endswith(b"\r\n"):
                return total, tail[i + 2 : -2]
        raise TimeoutError(f"no tagged reply for {tag!r} within {timeout}s")

    def command(tag: bytes, text: bytes) -> tuple[int, bytes]:
        sock.sendall(tag + b" " + text + b"\r\n")
        got, reply = until_tagged(tag)
        if not reply.startswith(tag + b" OK"):
            raise RuntimeError(f"{text[:20]!r} failed: {reply!r}")
        return got, reply

    try:
        _read_line(sock)  # greeting
        command(b"a", f"LOGIN {quote(login)} {quote(secret)}".encode())
        command(b"s", b"SELECT INBOX")
        octets, _ = command(b"w", b"FETCH 1 BODY.PEEK[]")  # warm-up, untimed
        seconds = []
        cpu0 = time.thread_time()
        for i in range(max_repeats):
            if i >= 2 and sum(seconds) >= min_seconds:
                break
            t0 = time.perf_counter()
            got, _ = command(f"f{i}".encode(), b"FETCH 1 BODY.PEEK[]")
            seconds.append(time.perf_counter() - t0)
            if abs(got - octets) > 64:  # the same message; only the tag differs
                raise RuntimeError(f"FETCH {i}: {got} octets, the warm-up had {octets}")
        cpu = time.thread_time() - cpu0
        sock.sendall(b"z LOGOUT\r\n")
    finally:
        sock.close()
    return FetchResult(octets, seconds, cpu)


def _read_line(sock) -> bytes:
    data = b""
    while not data.endswith(b"\n") and len(data) < 65536:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed before the greeting")
        data += chunk
    return data


# -- storm: a legitimate client, and a flood of wrong codes ----------------------------------


def legit_logins(
    host: str,
    port: int,
    login: str,
    secret: str,
    seconds: float,
    *,
    source: str,
    interval: float = 1.0,
) -> LoginResult:
    """One login every `interval` seconds for `seconds`, from `source` (a loopback address),
    each on a new connection; blocking sockets, so nothing else in this process delays it."""
    check_loopback(host)
    check_loopback(source)
    result = LoginResult()
    result.samples = []  # (seconds since the first login started, latency or None)
    cpu0 = cpu_seconds()
    start = time.perf_counter()
    for k in range(max(1, int(seconds / interval))):
        target = start + k * interval
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        try:
            with socket.create_connection(
                (host, port), timeout=30, source_address=(source, 0)
            ) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(f"a LOGIN {quote(login)} {quote(secret)}\r\n".encode())
                reply = b""
                for _ in range(MAX_REPLY_LINES):
                    reply = f.readline()
                    if not reply or reply.startswith(b"a "):
                        break
                latency = time.perf_counter() - t0
                if reply.startswith(b"a OK"):
                    s.sendall(b"z LOGOUT\r\n")
                    result.ok += 1
                    result.latencies.append(latency)
                    result.samples.append((t0 - start, latency))
                else:
                    result.failed += 1
                    result.count_reply(reply.decode(errors="replace").strip()[:120])
                    result.samples.append((t0 - start, None))
        except OSError as exc:
            result.samples.append((t0 - start, None))
            result.errors += 1
            result.count_reply(f"error: {type(exc).__name__}: {exc}"[:120])
    result.elapsed = time.perf_counter() - start
    result.cpu = cpu_seconds() - cpu0
    return result


@dataclass(frozen=True)
class _Guess:
    login: str
    secret: str


def storm(
    host: str,
    port: int,
    rate: float,
    seconds: float,
    source: str,
    login: str,
    max_in_flight: int = 1000,
) -> dict:
    """`rate` logins a second for `seconds` from `source`, each on a new connection, each with
    a random 16-character code in the code alphabet (what a guesser sends): open loop."""
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"
    guesses = [
        _Guess(login, "".join(secrets.choice(alphabet) for _ in range(16)))
        for _ in range(min(5000, int(rate * seconds)) or 1)
    ]
    engine = LoginEngine(host, port, source=source)
    r = engine.run(
        guesses,
        int(rate * seconds),
        rate=rate,
        max_in_flight=max_in_flight,
        deadline_s=seconds + 35,
        classify_replies=True,
    )
    counts = {k: len(v) for k, v in r.by_kind.items()}
    for k in ("checked", "limited", "temporary", "granted", "other"):
        counts.setdefault(k, 0)
    counts["error"] = r.errors
    attempts = int(rate * seconds) - r.skipped
    return {
        "target_rate": rate,
        "seconds": round(r.sending, 3),
        "attempts": attempts,
        "skipped_in_flight_cap": r.skipped,
        "rate": round(attempts / r.sending, 1) if r.sending else 0.0,
        "outcomes": counts,
        "errors": {k: v for k, v in r.replies.items() if k.startswith("error")},
        "latency_ms_p50": {k: round(1000 * percentile(v, 50), 2) for k, v in r.by_kind.items()},
        "latency_ms_p99": {k: round(1000 * percentile(v, 99), 2) for k, v in r.by_kind.items()},
        "generator_cpu_s": round(r.cpu, 3),
        "generator_cpu_pct": round(100 * r.cpu / r.elapsed, 1),
    }


# -- command line: the storm generator's own process -----------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="bench load generator (run by bench/run.py)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("storm", help="wrong-code logins at a fixed rate; prints JSON")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--rate", type=float, default=500)
    s.add_argument("--seconds", type=float, default=10)
    s.add_argument("--source", default="127.0.0.10")
    s.add_argument("--login", required=True)
    a = p.parse_args(argv)
    if a.cmd == "storm":
        print(json.dumps(storm(a.host, a.port, a.rate, a.seconds, a.source, a.login)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
