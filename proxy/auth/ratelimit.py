"""Failed-login rate limits per client address, so a storm of wrong codes from one place cannot
fill the argon2 pool and slow everyone else down. Pure logic; the caller supplies the clock."""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from typing import Protocol

from proxy.addresses import parse_ip

# Sliding window over which failures are counted (ASVS V2.2.1 counts per hour; we react faster).
WINDOW_SECONDS = 60.0
# Addresses tracked at once; the oldest are forgotten first, so memory stays bounded under a
# distributed attack (each entry is a few hundred bytes).
MAX_TRACKED = 100_000


@functools.lru_cache(maxsize=4096)
def client_bucket(ip: str) -> str:
    """IPv4 per address; IPv6 per /64 (one subscriber line), as Dovecot groups by prefix."""
    addr = parse_ip(ip)
    if addr is None:
        return ip
    if addr.version == 6:
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class Limiter(Protocol):
    """What logins and sign-ins ask of a failure limiter (this one, or proxy/auth/shared.py's)."""

    per_window: int
    window: float

    def blocked(self, ip: str, now: float) -> bool: ...
    def failure(self, ip: str, now: float, target: str = "") -> None: ...
    def success(self, ip: str, target: str) -> None: ...


class FailureLimiter:
    """Failed logins per client address within a sliding window; each failure remembers which
    account (or unknown login) it was against, so that a success forgives only those."""

    def __init__(
        self, per_window: int, window: float = WINDOW_SECONDS, max_tracked: int = MAX_TRACKED
    ) -> None:
        self.per_window = per_window
        self.window = window
        self.max_tracked = max_tracked
        # bucket -> (time, target) of recent failures, oldest first
        self._failures: OrderedDict[str, deque[tuple[float, str]]] = OrderedDict()

    def _recent(self, bucket: str, now: float) -> deque[tuple[float, str]]:
        times = self._failures.get(bucket)
        if times is None:
            return deque()
        cutoff = now - self.window
        while times and times[0][0] <= cutoff:
            times.popleft()
        if not times:
            del self._failures[bucket]
        return times

    def blocked(self, ip: str, now: float) -> bool:
        """True if this address already failed `per_window` times within the window."""
        return len(self._recent(client_bucket(ip), now)) >= self.per_window

    def failure(self, ip: str, now: float, target: str = "") -> None:
        """A failed login from `ip` against `target` (an account key, or the unknown login)."""
        bucket = client_bucket(ip)
        times = self._recent(bucket, now)
        if not times:
            self._failures[bucket] = times
        else:
            self._failures.move_to_end(bucket)
        if len(times) < self.per_window * 2:  # enough to know it is blocked; bounded per address
            times.append((now, target))
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def success(self, ip: str, target: str) -> None:
        """A success forgets this address's failures against the same account (NIST SP 800-63B
        §5.2.2 resets the count of the account that signed in), and only those: one valid code
        of an attacker's own must not reset the count of guesses at everyone else's."""
        bucket = client_bucket(ip)
        times = self._failures.get(bucket)
        if times is None:
            return
        kept = deque(entry for entry in times if entry[1] != target)
        if kept:
            self._failures[bucket] = kept
        else:
            del self._failures[bucket]
