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

import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")

# One client may hold at most this fraction of a queue: an eighth, so that a storm from a few
# addresses leaves seven eighths to everyone else.
CLIENT_SHARE = 8


class QueueFull(Exception):
    """Too much of this work is waiting: answer with a temporary failure."""


class ClientShareFull(QueueFull):
    """This client already has its whole share of the queue waiting: it is flooding."""


class FairQueue:
    """`threads` threads of its own, with at most `queue` jobs waiting, served fairly by client.

    A thread that finishes a job takes the next waiting one itself, under the queue's lock: no
    trip through the reactor between two jobs, so a busy reactor never leaves argon2 threads
    idle, and a job costs one hand-off each way (the result comes back with callFromThread).
    """

    def __init__(self, name: str, threads: int, queue: int, nice: int = 0) -> None:
        self.name = name
        self.nice = nice  # added to its threads' nice value: lower CPU priority than the rest
        self.threads = threads
        self.queue = queue
        # One client may queue at most this many (its share, at least one).
        self.per_client = max(1, queue // CLIENT_SHARE)
        self._reactor: Any = None
        self._workers: list[threading.Thread] = []
        self._stopping = False
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a job is waiting, or stop
        self._pending = 0  # running + waiting
        self._running = 0
        self._waiting: OrderedDict[str, deque] = OrderedDict()  # client -> jobs, serving order
        self._ready: deque = deque()  # jobs given to the threads, not yet taken by one
        self._last: str | None = None  # the client served last

    def start(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False
        self._workers = [
            threading.Thread(target=self._serve, name=f"{self.name}-{i}", daemon=True)
            for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()

    def stop(self) -> None:
        """Let jobs that a thread took finish and the threads end; the others are dropped."""
        with self._lock:
            self._stopping = True
            self._work.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers = []

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
        """Run `fn(*args)` in the pool; a Deferred with its result (fired on the reactor). Fails
        at once with ClientShareFull or QueueFull when this client's share or the queue is full.
        """
        if not self._workers:
            raise RuntimeError(f"{self.name}: start() was not called")
        d: defer.Deferred[T] = defer.Deferred()
        with self._lock:
            if len(self._waiting.get(client, ())) >= self.per_client:
                return defer.fail(ClientShareFull())
            if self._pending >= self.threads + self.queue:
                return defer.fail(QueueFull())
            self._waiting.setdefault(client, deque()).append((fn, args, d))
            self._pending += 1
            self._dispatch()
        return d

    def _dispatch(self) -> None:
        """Give waiting jobs to free threads, one client at a time, round-robin (called holding
        the lock). A job given to a thread counts as running."""
        while self._running < self.threads and self._waiting:
            order = iter(self._waiting.items())
            client, jobs = next(order)
            if client == self._last and len(self._waiting) > 1:  # it just had its turn
                client, jobs = next(order)
            self._last = client
            self._ready.append(jobs.popleft())
            if jobs:
                self._waiting.move_to_end(client)
            else:
                del self._waiting[client]
            self._running += 1
            self._work.notify()

    def _serve(self) -> None:
        """One thread: take a job given to the threads, run it, give the next waiting one out
        (usually to itself), hand the outcome to the reactor."""
        if self.nice:
            lower_priority(self.nice)
        while True:
            with self._lock:
                while not self._ready and not self._stopping:
                    self._work.wait()
                if self._stopping:
                    return
                fn, args, d = self._ready.popleft()
            try:
                result: Any = fn(*args)
            except BaseException:
                result = Failure()
            with self._lock:
                self._running -= 1
                self._pending -= 1
                self._dispatch()
            self._reactor.callFromThread(_fire, d, result)


def _fire(d: defer.Deferred, result: Any) -> None:
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


def lower_priority(steps: int) -> None:
    """Raise the calling thread's nice value by `steps` (Linux schedules threads one by one):
    the CPU goes to the event loop first whenever both want it. Where that is not possible the
    thread keeps its priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
    except (OSError, AttributeError):
        pass
