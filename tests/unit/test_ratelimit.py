"""The per-address failure limiter (proxy/auth/ratelimit.py): pure logic with a given clock."""

from __future__ import annotations

from proxy.auth.ratelimit import FailureLimiter, client_bucket

IP = "198.51.100.7"


def test_an_address_is_blocked_after_its_failures_within_the_window():
    limiter = FailureLimiter(per_window=3, window=60)
    for t in range(3):
        assert not limiter.blocked(IP, t)
        limiter.failure(IP, t, "bob")
    assert limiter.blocked(IP, 3)
    assert not limiter.blocked(IP, 61)  # the first failure left the window


def test_a_success_forgives_the_failures_against_that_account_only():
    limiter = FailureLimiter(per_window=3, window=60)
    limiter.failure(IP, 0, "alice")  # a typo
    limiter.failure(IP, 1, "bob")
    limiter.failure(IP, 2, "bob")
    limiter.success(IP, "alice")
    assert not limiter.blocked(IP, 3)
    limiter.failure(IP, 3, "bob")
    assert limiter.blocked(IP, 4)


def test_one_valid_code_of_their_own_does_not_let_an_attacker_guess_forever():
    limiter = FailureLimiter(per_window=30, window=60)
    guesses = 0
    for t in range(1000):
        if limiter.blocked(IP, t * 0.01):
            break
        limiter.failure(IP, t * 0.01, "victim")
        guesses += 1
        limiter.success(IP, "attacker")  # logs in with a code of their own in between
    assert guesses == 30


def test_ipv6_addresses_share_their_slash_64():
    assert client_bucket("2001:db8:1:2::5") == client_bucket("2001:db8:1:2:ffff::1")
    assert client_bucket("2001:db8:1:3::5") != client_bucket("2001:db8:1:2::5")
    limiter = FailureLimiter(per_window=2, window=60)
    limiter.failure("2001:db8:1:2::5", 0, "bob")
    limiter.failure("2001:db8:1:2::6", 0, "bob")
    assert limiter.blocked("2001:db8:1:2::7", 1)
