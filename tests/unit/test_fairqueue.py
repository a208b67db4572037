"""The fair queue's threads: bounded, fair by client, and a free thread starts the next waiting
job itself, without a trip through the reactor (proxy/fairqueue.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from twisted.python.failure import Failure

from proxy.fairqueue import FairQueue, QueueFull

DEADLINE = 10.0  # seconds to wait for a thread, polling


class HeldReactor:
    """Records what the threads hand back and runs it only when the test says so: a reactor
    that is busy elsewhere."""

    def __init__(self) -> None:
        self.calls: list = []
        self._lock = threading.Lock()

    def callFromThread(self, fn, *args) -> None:
        with self._lock:
            self.calls.append((fn, args))

    def run_calls(self) -> None:
        with self._lock:
            calls, self.calls = self.calls, []
        for fn, args in calls:
            fn(*args)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def held():
    reactor = HeldReactor()
    queues: list[FairQueue] = []

    def make(threads: int, queue: int, nice: int = 0) -> FairQueue:
        q = FairQueue("test", threads, queue, nice)
        q.start(reactor)
        queues.append(q)
        return q

    yield reactor, make
    for q in queues:
        q.stop()


def test_a_free_thread_takes_the_next_job_while_the_reactor_is_busy(held):
    reactor, make = held
    q = make(threads=1, queue=8)
    gate = threading.Event()
    second_ran = threading.Event()
    first = q.submit("a", gate.wait, DEADLINE)
    second = q.submit("b", second_ran.set)
    assert (q.running, q.waiting) == (1, 1)
    gate.set()
    # The reactor runs nothing meanwhile: the thread must not wait for it between jobs.
    wait_for(second_ran.is_set, "the second job to start without the reactor")
    wait_for(lambda: len(reactor.calls) == 2, "both outcomes handed to the reactor")
    assert not first.called and not second.called  # outcomes are fired on the reactor only
    reactor.run_calls()
    assert first.result is True and second.result is None
    assert q.pending == 0


def test_a_failing_job_fails_its_deferred_on_the_reactor(held):
    reactor, make = held
    q = make(threads=1, queue=8)
    d = q.submit("a", int, "not a number")
    wait_for(lambda: reactor.calls, "the outcome")
    reactor.run_calls()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(ValueError)


def test_a_niced_queue_runs_its_jobs_at_a_lower_cpu_priority_than_the_caller(held):
    reactor, make = held

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = own_nice()
    results = []
    for nice, q in ((0, make(threads=1, queue=4)), (3, make(threads=1, queue=4, nice=3))):
        d = q.submit("a", own_nice)
        wait_for(lambda: reactor.calls, "the outcome")
        reactor.run_calls()
        d.addCallback(results.append)
        assert results[-1] == min(19, mine + nice)
    assert own_nice() == mine  # the caller's thread keeps its priority


def test_jobs_over_the_bound_fail_at_once(held):
    _reactor, make = held
    q = make(threads=1, queue=1)
    gate = threading.Event()
    try:
        q.submit("a", gate.wait, DEADLINE)
        q.submit("b", gate.wait, DEADLINE)
        refused: list[Failure] = []
        q.submit("c", gate.wait, DEADLINE).addErrback(refused.append)
        assert refused and refused[0].check(QueueFull)
    finally:
        gate.set()


def test_submit_before_start_is_a_bug():
    with pytest.raises(RuntimeError, match="start"):
        FairQueue("never-started", 1, 1).submit("a", int)
