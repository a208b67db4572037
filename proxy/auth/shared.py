"""The per-address failure limit across every node that shares the store.

Each node counts failed logins in memory (proxy/auth/ratelimit.py) and answers from that at
once. Once a second it also writes its new failures to the store (`login_failures`), forgets
there the ones a success forgave, and reads which addresses have failed `per_window` times or
more in the window on all nodes together; those are refused on this node too. So an attacker
spreading guesses over N nodes is stopped after the same number of failures as on one, a
second later at most. On one node (SQLite) the table costs one small write a second.

What stays per node: the connection caps (proxy/limits.py), which count sockets.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from proxy.auth.ratelimit import WINDOW_SECONDS, FailureLimiter, client_bucket
from proxy.codes.store import INTERNAL

# How often failures are shared through the store, and how long the store keeps them (past the
# window, so that a node that was slow to read still sees them).
SHARE_SECONDS = 1.0
KEEP_SECONDS = 2 * WINDOW_SECONDS

# Addresses read back at most per round: the worst ones, should a distributed attack fail
# from very many (each node still limits the addresses it sees itself).
MAX_SHARED = 10_000


class SharedLimiter:
    """A FailureLimiter whose failures are also counted across nodes through the store."""

    def __init__(self, local: FailureLimiter, store: Any, reactor: Any, clock: Any) -> None:
        self.local = local
        self.per_window = local.per_window
        self.window = local.window
        self._store = store  # the AsyncCodeStore: its queue runs `_share` off the reactor
        self._reactor = reactor
        self._clock = clock  # the local limiter's (monotonic) clock
        self._failed: list[tuple[str, str]] = []  # (bucket, target) not yet written
        self._forgiven: list[tuple[str, str]] = []
        self._blocked: frozenset[str] = frozenset()  # buckets over the limit on all nodes
        self._loop: task.LoopingCall | None = None

    # -- what the Authenticator and the portal call ----------------------------------------------

    def blocked(self, ip: str, now: float) -> bool:
        return self.local.blocked(ip, now) or client_bucket(ip) in self._blocked

    def failure(self, ip: str, now: float, target: str = "") -> None:
        self.local.failure(ip, now, target)
        self._failed.append((client_bucket(ip), target))

    def success(self, ip: str, target: str) -> None:
        self.local.success(ip, target)
        self._forgiven.append((client_bucket(ip), target))

    # -- sharing ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = self._reactor
        self._loop.start(SHARE_SECONDS, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _round(self) -> Any:
        failed, self._failed = self._failed, []
        forgiven, self._forgiven = self._forgiven, []
        now = int(self._reactor.seconds())
        d = self._store.queue.submit(INTERNAL, self._share, failed, forgiven, now)
        d.addCallback(self._read)
        d.addErrback(lambda _failure: None)  # the store is down: local limits still hold
        return d

    def _read(self, blocked: frozenset[str]) -> None:
        self._blocked = blocked

    def _share(
        self, failed: list[tuple[str, str]], forgiven: list[tuple[str, str]], now: int
    ) -> frozenset[str]:
        """In the store's thread: write, forgive, forget the old, read who is over the limit."""
        store = self._store.store
        statements: list[tuple[str, Any]] = [
            (
                "INSERT INTO login_failures (bucket, target, at) VALUES (?, ?, ?)",
                (bucket, target, now),
            )
            for bucket, target in failed
        ]
        statements += [
            ("DELETE FROM login_failures WHERE bucket = ? AND target = ?", (bucket, target))
            for bucket, target in dict.fromkeys(forgiven)
        ]
        statements.append(("DELETE FROM login_failures WHERE at < ?", (now - KEEP_SECONDS,)))
        store.transaction(statements)
        rows = store.run(
            "SELECT bucket FROM login_failures WHERE at > ? GROUP BY bucket"
            " HAVING count(*) >= ? ORDER BY count(*) DESC LIMIT ?",
            (now - int(WINDOW_SECONDS), self.per_window, MAX_SHARED),
        )
        return frozenset(row[0] for row in rows)
