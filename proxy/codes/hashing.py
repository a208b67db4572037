"""Argon2id hashing of codes in a bounded thread pool, never on the reactor thread.

argon2-cffi releases the GIL while hashing, so `threads` verifications really run in parallel.
When more than `threads + queue` verifications are pending, new ones fail fast (QueueFull) and the
attempt is answered as a temporary failure instead of queueing without bound.

Waiting verifications are served round-robin by client (address, or IPv6 /64), and one client
may hold only a share of the queue (proxy/fairqueue.py): a storm of wrong codes from a few
addresses cannot make everyone else wait behind it.
"""

from __future__ import annotations

from dataclasses import replace

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer

from proxy.config import Argon2Settings
from proxy.fairqueue import FairQueue

# Stands in for the secret of an unknown account or selector, so that every attempt costs one
# verification and timing tells nothing.
_DUMMY_CODE = "dummy-code-never-issued"

# How much lower the argon2 threads' CPU priority is than the event loop's (nice steps): a burst
# of verifications (a flood of wrong codes, devices reconnecting after a restart) keeps both
# cores busy for a moment, and the relay and warm logins must not wait behind it.
ARGON2_NICE = 10


def pool_share(settings: Argon2Settings, workers: int) -> Argon2Settings:
    """One worker's part of the verification pool when `workers` processes serve
    (serve.workers): `threads` divided, rounded up. The threads are the machine's CPU (and
    memory_kib each) budget for argon2: N workers each with all of them would run N times the
    threads on the same cores, and the reactors, the store and the upstream logins would wait
    behind them. Each worker keeps the whole `queue`: divided, one address's share of it (an
    eighth) became so small that a client's burst of logins, spread unevenly over the workers,
    counted as flooding."""
    if workers <= 1:
        return settings
    return replace(settings, threads=-(-settings.threads // workers))


class CodeHasher:
    def __init__(self, settings: Argon2Settings) -> None:
        self.settings = settings
        self._hasher = PasswordHasher(
            time_cost=settings.time_cost,
            memory_cost=settings.memory_kib,
            parallelism=settings.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        self._dummy = self._hasher.hash(_DUMMY_CODE)
        self.queue = FairQueue("apppass-argon2", settings.threads, settings.queue, ARGON2_NICE)
        self.per_client = self.queue.per_client

    # -- synchronous path (CLI, benchmarks, the pool's threads) ----------------------------------

    def hash(self, code: str) -> str:
        return self._hasher.hash(code)

    def verify_sync(self, encoded: str | None, code: str) -> bool:
        """True if `code` matches `encoded`; with None, burns one verification and says False."""
        try:
            return self._hasher.verify(encoded or self._dummy, code) and encoded is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    # -- asynchronous path (the proxy) -----------------------------------------------------------

    def start(self, reactor) -> None:
        self.queue.start(reactor)

    def stop(self) -> None:
        self.queue.stop()

    @property
    def pending(self) -> int:
        return self.queue.pending

    def verify(self, encoded: str | None, code: str, client: str = "") -> defer.Deferred[bool]:
        """A Deferred firing True/False; fails with QueueFull (ClientShareFull) when the queue
        (or this client's share of it) is over its bound."""
        return self.queue.submit(client, self.verify_sync, encoded, code)
