"""The verified-credential cache shared by worker processes: one key, entries passed on as lines
that carry no code, each kept for no longer than the receiver's own TTL. The processes:
tests/integration/test_workers.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.auth.cache import VerifiedCache
from proxy.codes.sending import SendingPolicy
from proxy.workerlink import VERIFIED, _Link, read_verified, verified_line

KEY = bytes(range(32))
POLICY = SendingPolicy(("own",), ("example.org",), 10)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pair(ttl_a: float = 300, ttl_b: float = 300) -> tuple[VerifiedCache, VerifiedCache, Clock]:
    """Two workers' caches, A's entries passed to B as the supervisor would."""
    clock = Clock()
    a, b = VerifiedCache(ttl_a, clock=clock), VerifiedCache(ttl_b, clock=clock)
    a.share(KEY, lambda *entry: b.put_shared(*read_verified(verified_line(*entry))))
    b.share(KEY, lambda *entry: None)
    return a, b, clock


def test_an_entry_verified_by_one_worker_is_a_hit_in_the_other():
    a, b, clock = pair()
    assert b.get("key-alice", "ABCD", clock()) is None
    a.put("key-alice", "ABCD", 7, "printer", clock(), POLICY)
    assert b.get("key-alice", "ABCD", clock()) == (7, "printer", POLICY)
    assert b.get("key-alice", "ABCE", clock()) is None  # another code
    assert b.get("key-bob", "ABCD", clock()) is None  # another account


def test_a_shared_entry_lasts_no_longer_than_the_receivers_ttl():
    a, b, clock = pair(ttl_a=300, ttl_b=60)
    a.put("key-alice", "ABCD", 7, "printer", clock())
    clock.now += 59
    assert b.get("key-alice", "ABCD", clock()) is not None
    clock.now += 2
    assert b.get("key-alice", "ABCD", clock()) is None
    assert a.get("key-alice", "ABCD", clock()) is not None


def test_a_cache_turned_off_takes_no_shared_entry():
    a, b, clock = pair(ttl_b=0)
    a.put("key-alice", "ABCD", 7, "printer", clock())
    assert b.get("key-alice", "ABCD", clock()) is None


def test_sharing_drops_entries_made_under_the_old_key():
    cache = VerifiedCache(300)
    cache.put("key-alice", "ABCD", 7, "printer", 0.0)
    cache.share(KEY, lambda *entry: None)
    assert cache.get("key-alice", "ABCD", 0.0) is None


def test_entries_from_other_workers_are_not_passed_on_again():
    told = []
    cache = VerifiedCache(300)
    cache.share(KEY, lambda *entry: told.append(entry))
    cache.put_shared(b"\0" * 32, 7, "printer", 300, POLICY)
    assert told == []


@given(
    label=st.text(max_size=80),
    code_id=st.integers(min_value=1, max_value=2**53),
    senders=st.lists(st.text(max_size=30), max_size=4),
    domains=st.lists(st.text(max_size=30), max_size=4),
    cap=st.none() | st.integers(min_value=1, max_value=10**6),
)
def test_an_entry_is_one_line_whatever_its_label_and_policy(label, code_id, senders, domains, cap):
    policy = SendingPolicy(tuple(senders), tuple(domains), cap)
    line = verified_line(KEY, code_id, label, 300.0, policy)
    assert line.startswith(VERIFIED) and line.count(b"\n") == 1 and line.endswith(b"\n")
    assert read_verified(line[:-1]) == (KEY, code_id, label, 300.0, policy)


def test_a_line_that_is_not_an_entry_is_ignored():
    for junk in (b"verified ", b"verified {}", b'verified {"digest":"zz"}', b"verified [1]"):
        assert read_verified(junk) is None


def test_the_link_reads_lines_however_they_are_cut():
    got: list[bytes] = []
    link = _Link(lambda: None, got.append)
    line = verified_line(KEY, 7, "printer", 300.0, POLICY)
    stream = b"key " + KEY.hex().encode() + b"\n" + line + line
    for i in range(0, len(stream), 7):
        link.dataReceived(stream[i : i + 7])
    assert got == [b"key " + KEY.hex().encode(), line[:-1], line[:-1]]
