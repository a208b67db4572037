"""Argon2id hashing of codes in a bounded thread pool, never on the reactor thread.

argon2-cffi releases the GIL while hashing, so `threads` verifications really run in parallel.
When more than `threads + queue` verifications are pending, new ones fail fast (PoolFull) and the
attempt is answered as a temporary failure instead of queueing without bound.

Waiting verifications are served round-robin by client (address, or IPv6 /64), and one client
may hold only a share of the queue: a storm of wrong codes from a few addresses cannot make
everyone else wait behind it.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from twisted.internet import defer, threads
from twisted.python import failure
from twisted.python.threadpool import ThreadPool

from proxy.config import Argon2Settings

# Stands in for the secret of an unknown account or selector, so that every attempt costs one
# verification and timing tells nothing.
_DUMMY_CODE = "dummy-code-never-issued"


class PoolFull(Exception):
    """Too many verifications are waiting: answer with a temporary failure."""


class ClientShareFull(PoolFull):
    """This client already has its whole share of the queue waiting: it is flooding."""


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
        self._pool: ThreadPool | None = None
        self._pending = 0  # running + waiting
        self._running = 0
        self._waiting: OrderedDict[str, deque] = OrderedDict()  # client -> jobs, in serving order
        self._last: str | None = None  # the client served last
        # One client may queue at most this many (an eighth of the queue, at least one).
        self.per_client = max(1, settings.queue // 8)

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
        self._reactor = reactor
        self._pool = ThreadPool(
            minthreads=self.settings.threads,
            maxthreads=self.settings.threads,
            name="apppass-argon2",
        )
        self._pool.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    @property
    def pending(self) -> int:
        return self._pending

    def verify(self, encoded: str | None, code: str, client: str = "") -> defer.Deferred[bool]:
        """A Deferred firing True/False; fails with PoolFull when the queue (or this client's
        share of it) is over its bound."""
        if self._pool is None:
            raise RuntimeError("CodeHasher.start() was not called")
        if len(self._waiting.get(client, ())) >= self.per_client:
            return defer.fail(ClientShareFull())
        if self._pending >= self.settings.threads + self.settings.queue:
            return defer.fail(PoolFull())
        d: defer.Deferred[bool] = defer.Deferred()
        self._waiting.setdefault(client, deque()).append((encoded, code, d))
        self._pending += 1
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        """Start waiting jobs while threads are free, one client at a time, round-robin."""
        while self._running < self.settings.threads and self._waiting:
            order = iter(self._waiting.items())
            client, jobs = next(order)
            if client == self._last and len(self._waiting) > 1:  # it just had its turn
                client, jobs = next(order)
            self._last = client
            encoded, code, d = jobs.popleft()
            if jobs:
                self._waiting.move_to_end(client)
            else:
                del self._waiting[client]
            self._running += 1
            assert self._pool is not None  # verify() queues jobs only after start()
            job = threads.deferToThreadPool(
                self._reactor, self._pool, self.verify_sync, encoded, code
            )
            job.addBoth(self._finished, d)

    def _finished(self, result, d: defer.Deferred) -> None:
        self._running -= 1
        self._pending -= 1
        self._dispatch()
        d.callback(result) if not isinstance(result, failure.Failure) else d.errback(result)
