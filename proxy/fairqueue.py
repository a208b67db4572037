"""Blocking work off the reactor, bounded and fair: a thread pool's queue that one client cannot
fill, and identical work in flight done once.

Every login costs blocking calls (an LDAP lookup, store reads and writes, one argon2id
verification). Each kind runs in its own `FairQueue`: at most `threads` at once, at most `queue`
waiting, and one client (an address, or an IPv6 /64) at most a share of the queue; waiting jobs
are served round-robin by client. Past a bound a job fails at once (`QueueFull`,
`ClientShareFull`) and the login gets a temporary refusal, so a burst from one place never
queues without bound nor makes everyone else wait behind it.

`SingleFlight` coalesces identical work in flight: concurrent logins with the same code verify
once, concurrent lookups of the same login query the directory once.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

# One client may hold at most this fraction of a queue: an eighth, so that a storm from a few
# addresses leaves seven eighths to everyone else.
CLIENT_SHARE = 8


class QueueFull(Exception):
    """Too much of this work is waiting: answer with a temporary failure."""


class ClientShareFull(QueueFull):
    """This client already has its whole share of the queue waiting: it is flooding."""


class FairQueue:
    """A thread pool of `threads`, with at most `queue` jobs waiting, served fairly by client."""

    def __init__(self, name: str, threads: int, queue: int) -> None:
        self.name = name
        self.threads = threads
        self.queue = queue
        # One client may queue at most this many (its share, at least one).
        self.per_client = max(1, queue // CLIENT_SHARE)
        self._reactor: Any = None
        self._pool: ThreadPool | None = None
        self._pending = 0  # running + waiting
        self._running = 0
        self._waiting: OrderedDict[str, deque] = OrderedDict()  # client -> jobs, serving order
        self._last: str | None = None  # the client served last

    def start(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=self.threads, maxthreads=self.threads, name=self.name)
        self._pool.start()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        return self._pending

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._pending - self._running

    def submit(self, client: str, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run `fn(*args)` in the pool; a Deferred with its result. Fails at once with
        ClientShareFull or QueueFull when this client's share or the queue is full."""
        if self._pool is None:
            raise RuntimeError(f"{self.name}: start() was not called")
        if len(self._waiting.get(client, ())) >= self.per_client:
            return defer.fail(ClientShareFull())
        if self._pending >= self.threads + self.queue:
            return defer.fail(QueueFull())
        d: defer.Deferred[T] = defer.Deferred()
        self._waiting.setdefault(client, deque()).append((fn, args, d))
        self._pending += 1
        self._dispatch()
        return d

    def _dispatch(self) -> None:
        """Start waiting jobs while threads are free, one client at a time, round-robin."""
        while self._running < self.threads and self._waiting:
            order = iter(self._waiting.items())
            client, jobs = next(order)
            if client == self._last and len(self._waiting) > 1:  # it just had its turn
                client, jobs = next(order)
            self._last = client
            fn, args, d = jobs.popleft()
            if jobs:
                self._waiting.move_to_end(client)
            else:
                del self._waiting[client]
            self._running += 1
            assert self._pool is not None  # submit() queues jobs only after start()
            job = threads.deferToThreadPool(self._reactor, self._pool, fn, *args)
            job.addBoth(self._finished, d)

    def _finished(self, result: Any, d: defer.Deferred) -> None:
        self._running -= 1
        self._pending -= 1
        self._dispatch()
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)


K = TypeVar("K", bound=Hashable)


class SingleFlight(Generic[K]):
    """Identical work in flight runs once; every caller gets the same outcome."""

    def __init__(self) -> None:
        self._flights: dict[K, list[defer.Deferred]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def run(self, key: K, work: Callable[[], defer.Deferred[T]]) -> defer.Deferred[T]:
        """`work()`'s outcome, shared with every call for `key` made before it is known."""
        d: defer.Deferred[T] = defer.Deferred()
        waiters = self._flights.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._flights[key] = [d]
        defer.maybeDeferred(work).addBoth(self._landed, key)
        return d

    def _landed(self, outcome: Any, key: K) -> None:
        """Hand the outcome to every waiter (a failure too: each waiter's caller handles it)."""
        for d in self._flights.pop(key):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
