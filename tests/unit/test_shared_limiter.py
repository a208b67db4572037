"""The failure limit across nodes (proxy/auth/shared.py): two limiters on one store, as two
proxy nodes on one database, each stopping an address that failed on both together."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from proxy.auth.ratelimit import FailureLimiter
from proxy.auth.shared import SharedLimiter
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import AsyncCodeStore

IP = "198.51.100.7"


@pytest.fixture
def nodes(tmp_path):
    made = []
    for _ in range(2):
        store = AsyncCodeStore(SqliteCodeStore(tmp_path / "codes.db"), reactor)
        made.append((SharedLimiter(FailureLimiter(3), store, reactor, lambda: 0.0), store))
    yield [limiter for limiter, _ in made]
    for _, store in made:
        store.stop()


@pytest_twisted.inlineCallbacks
def test_failures_on_two_nodes_add_up(nodes):
    a, b = nodes
    a.failure(IP, 0, "bob")
    a.failure(IP, 0, "bob")
    b.failure(IP, 0, "carol")
    assert not a.blocked(IP, 0) and not b.blocked(IP, 0)  # two and one, each alone
    yield a._round()
    yield b._round()
    assert b.blocked(IP, 0)  # three on both together
    yield a._round()
    assert a.blocked(IP, 0)
    assert not a.blocked("203.0.113.1", 0)


@pytest_twisted.inlineCallbacks
def test_a_success_forgives_that_account_on_every_node(nodes):
    a, b = nodes
    for _ in range(3):
        b.failure(IP, 0, "alice")  # typos, before the right code
    yield b._round()
    yield a._round()
    assert a.blocked(IP, 0)
    b.success(IP, "alice")
    yield b._round()
    yield a._round()
    assert not a.blocked(IP, 0)


@pytest_twisted.inlineCallbacks
def test_a_store_that_fails_leaves_the_local_limit_working(nodes):
    a, _ = nodes

    def broken(*args):
        return defer.fail(RuntimeError("database is locked"))

    a._store.queue.submit = broken
    for _ in range(3):
        a.failure(IP, 0, "bob")
    yield a._round()
    assert a.blocked(IP, 0)
