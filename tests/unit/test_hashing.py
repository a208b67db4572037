"""Argon2id verification: one verification per attempt, off the reactor, bounded queue."""

import pytest_twisted
from twisted.internet import defer, reactor

from proxy.codes.hashing import CodeHasher
from proxy.config import Argon2Settings
from proxy.fairqueue import QueueFull

FAST = Argon2Settings(time_cost=1, memory_kib=8192, parallelism=1, threads=2, queue=1)


def test_hash_uses_argon2id_with_configured_parameters():
    encoded = CodeHasher(FAST).hash("AbCdEfGhJkMnPqRs")
    assert encoded.startswith("$argon2id$v=19$m=8192,t=1,p=1$")


def test_verify_accepts_the_code_and_refuses_others():
    h = CodeHasher(FAST)
    encoded = h.hash("AbCdEfGhJkMnPqRs")
    assert h.verify_sync(encoded, "AbCdEfGhJkMnPqRs")
    assert not h.verify_sync(encoded, "abCdEfGhJkMnPqRs")


def test_missing_hash_still_costs_a_verification_and_fails():
    h = CodeHasher(FAST)
    assert not h.verify_sync(None, "dummy-code-never-issued")
    assert not h.verify_sync("not a hash", "x")


@pytest_twisted.inlineCallbacks
def test_pool_verifies_off_the_reactor_and_fails_fast_when_full():
    h = CodeHasher(FAST)
    h.start(reactor)
    try:
        encoded = h.hash("AbCdEfGhJkMnPqRs")
        attempts = [h.verify(encoded, "AbCdEfGhJkMnPqRs") for _ in range(4)]  # 2 threads + 1 queued
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        oks = [r for ok, r in results if ok]
        fails = [r for ok, r in results if not ok]
        assert oks == [True, True, True]
        assert len(fails) == 1 and fails[0].check(QueueFull)
        assert h.pending == 0
        assert (yield h.verify(encoded, "AbCdEfGhJkMnPqRs")) is True
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_waiting_verifications_are_served_round_robin_by_client():
    h = CodeHasher(Argon2Settings(time_cost=1, memory_kib=8192, parallelism=1, threads=1, queue=64))
    h.start(reactor)
    try:
        encoded = h.hash("AbCdEfGhJkMnPqRs")
        order = []
        attempts = []
        for client in ["storm"] * 4 + ["legit"]:
            d = h.verify(encoded, "AbCdEfGhJkMnPqRs", client)
            d.addCallback(lambda ok, c=client: order.append(c))
            attempts.append(d)
        yield defer.gatherResults(attempts)
        assert order.index("legit") <= 1  # behind at most the one already running
    finally:
        h.stop()


@pytest_twisted.inlineCallbacks
def test_one_client_may_hold_only_its_share_of_the_queue():
    h = CodeHasher(Argon2Settings(time_cost=1, memory_kib=8192, parallelism=1, threads=1, queue=16))
    h.start(reactor)
    try:
        encoded = h.hash("AbCdEfGhJkMnPqRs")
        storm = [h.verify(encoded, "x", "storm") for _ in range(h.per_client + 2)]
        other = h.verify(encoded, "AbCdEfGhJkMnPqRs", "legit")
        results = yield defer.DeferredList([*storm, other], consumeErrors=True)
        refused = [r for ok, r in results[:-1] if not ok]
        assert refused and all(r.check(QueueFull) for r in refused)
        assert results[-1] == (True, True)
    finally:
        h.stop()
