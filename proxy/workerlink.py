"""A worker process's side of serve.workers (proxy/workers.py is the supervisor): which worker it
is, the listening sockets the supervisor bound and passed on, and the link to the supervisor.

The link stands in for systemd's notifications (proxy/sdnotify.py has the same methods): a
worker tells the supervisor that it is ready, reloading or stopping and, while its reactor
turns, that it is alive; only the supervisor speaks to systemd. When the link closes the
supervisor is gone, and the worker drains as on SIGTERM rather than serve on unsupervised.

It also carries the verified-credential cache between workers (auth/cache.py): the supervisor's
first line is the key they all use, and each entry a worker verified goes to the supervisor,
which passes it on to the others. An entry is an HMAC digest, a code id, a label and a sending
policy: never a code.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, task

from proxy.auth.cache import VerifiedCache
from proxy.codes.sending import SendingPolicy

# How often a ready worker tells the supervisor it is alive: the supervisor restarts one that
# stays silent for systemd's watchdog interval (30 s in systemd/apppass.service).
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told a worker on its command line."""

    number: int  # 1 … count, shown in its log lines
    count: int  # how many workers share the listeners (each holds its part of the caps)
    link: int  # file descriptor of its end of the link
    sockets: dict[str, int] = field(default_factory=dict)  # listener name -> listening socket

    @classmethod
    def parse(cls, number: int, count: int, link: int, listen: list[str]) -> WorkerRole:
        sockets = {}
        for item in listen:
            name, _, fd = item.rpartition("=")
            sockets[name] = int(fd)
        return cls(number, count, link, sockets)

    def argv(self) -> list[str]:
        """The `apppass serve` options that give a worker this role."""
        out = ["--worker", str(self.number), "--workers", str(self.count), "--link", str(self.link)]
        for name, fd in self.sockets.items():
            out += ["--listen", f"{name}={fd}"]
        return out


# Lines on the link besides the Notifier's words. Supervisor to worker: KEY (first, the cache's
# HMAC key in hex) and VERIFIED; worker to supervisor: VERIFIED, which the supervisor passes on.
KEY = b"key "
VERIFIED = b"verified "

# A line longer than this is not ours: dropped (an entry is a few hundred octets).
MAX_LINE = 64 * 1024


def verified_line(
    digest: bytes, code_id: int, label: str, ttl: float, sending: SendingPolicy
) -> bytes:
    """One cache entry as a line (JSON escapes any newline in the label)."""
    entry = {
        "digest": digest.hex(),
        "code": code_id,
        "label": label,
        "ttl": ttl,
        "sending": [list(sending.mail_from), list(sending.rcpt_domains), sending.max_per_day],
    }
    return VERIFIED + json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def read_verified(line: bytes) -> tuple[bytes, int, str, float, SendingPolicy] | None:
    """The entry of a VERIFIED line, or None if it is not one."""
    try:
        entry = json.loads(line[len(VERIFIED) :])
        mail_from, rcpt_domains, max_per_day = entry["sending"]
        return (
            bytes.fromhex(entry["digest"]),
            int(entry["code"]),
            str(entry["label"]),
            float(entry["ttl"]),
            SendingPolicy(tuple(mail_from), tuple(rcpt_domains), max_per_day),
        )
    except (ValueError, KeyError, TypeError):
        return None


class _Link(protocol.Protocol):
    def __init__(self, lost: Callable[[], None], line: Callable[[bytes], None]) -> None:
        self.lost: Callable[[], None] | None = lost
        self.line = line
        self._pending = b""

    def dataReceived(self, data: bytes) -> None:
        """The supervisor's lines (its word on stopping and reloading comes as signals)."""
        *lines, self._pending = (self._pending + data).split(b"\n")
        if len(self._pending) > MAX_LINE:
            self._pending = b""
        for line in lines:
            self.line(line)

    def connectionLost(self, reason: Any = None) -> None:
        if self.lost is not None:
            self.lost()


class SupervisorLink:
    """Notifier's methods (proxy/sdnotify.py), told to the supervisor one word a line."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._transport: Any = None
        self._link: _Link | None = None
        self._loop: task.LoopingCall | None = None
        self._key: bytes | None = None
        self._cache: VerifiedCache | None = None
        self._counter: Any = None  # Metrics.verified_shared

    def connect(self, reactor: Any, lost: Callable[[], None]) -> None:
        """Adopt the link; `lost` runs when the supervisor's end closes."""
        link = self._link = _Link(lost, self._heard)
        factory = protocol.Factory.forProtocol(lambda: link)
        self._transport = reactor.adoptStreamConnection(self.role.link, socket.AF_UNIX, factory)
        os.close(self.role.link)  # the reactor holds its own copy

    def ending(self) -> None:
        """The worker stops on its own: the link closing with it is no news."""
        if self._link is not None:
            self._link.lost = None

    def send(self, word: str) -> None:
        self._write(word.encode() + b"\n")

    def _write(self, line: bytes) -> None:
        if self._transport is not None and self._transport.connected:
            self._transport.write(line)

    # -- the verified cache, shared -----------------------------------------------------------

    def share_cache(self, cache: VerifiedCache, counter: Any) -> None:
        """Share this worker's verified cache with the others (once the key has come)."""
        self._cache, self._counter = cache, counter
        self._join()

    def _join(self) -> None:
        if self._cache is not None and self._key is not None:
            self._cache.share(self._key, self._publish)

    def _publish(
        self, digest: bytes, code_id: int, label: str, ttl: float, sending: SendingPolicy
    ) -> None:
        self._write(verified_line(digest, code_id, label, ttl, sending))
        self._counter.labels("sent").inc()

    def _heard(self, line: bytes) -> None:
        if line.startswith(KEY):
            try:
                self._key = bytes.fromhex(line[len(KEY) :].decode())
            except ValueError:
                return
            self._join()
        elif line.startswith(VERIFIED) and self._cache is not None and self._key is not None:
            entry = read_verified(line)
            if entry is not None:
                self._cache.put_shared(*entry)
                self._counter.labels("received").inc()

    def ready(self, status: str) -> None:
        self.send("ready")

    def reloading(self) -> None:
        self.send("reloading")

    def stopping(self, status: str = "stopping") -> None:
        self.send("stopping")

    def start_watchdog(self, reactor: Any) -> None:
        self._loop = task.LoopingCall(self.send, "alive")
        self._loop.clock = reactor
        self._loop.start(HEARTBEAT_SECONDS, now=True)

    def stop_watchdog(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
