"""Verified-credential cache: a repeat login with a code that verified recently skips argon2.

Keyed by an HMAC (with a random key) of the account and the code, so the cache never holds a
code. It never skips the claim: revocation, disabling, expiry and max_uses apply at once.

Worker processes (serve.workers) share their entries: the supervisor gives them one key and
passes on each entry a worker verified (workerlink.py), so a code is verified once per node and
TTL, not once per worker.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable

from proxy.codes.sending import SendingPolicy

# Entries kept at once (each about 150 bytes); the least recently used go first.
MAX_ENTRIES = 50_000


# Told of each entry verified here (set by `share`): (digest, code id, label, TTL, policy).
Publish = Callable[[bytes, int, str, float, SendingPolicy], None]


class VerifiedCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock  # the `now` of get and put: entries from other workers expire by it
        self._key = os.urandom(32)
        self._publish: Publish | None = None
        # (code id, label, expiry, sending policy): the policy the code had when it verified.
        self._entries: OrderedDict[bytes, tuple[int, str, float, SendingPolicy]] = OrderedDict()

    def share(self, key: bytes, publish: Publish) -> None:
        """Share entries with other workers: their common HMAC key, and where to tell of each
        entry verified here. Entries made under the old key are dropped."""
        self._key = key
        self._publish = publish
        self._entries.clear()

    def digest(self, account_key: str, code: str) -> bytes:
        """A key for (account, code) that does not hold the code."""
        return hmac.new(self._key, f"{account_key}\x00{code}".encode(), hashlib.sha256).digest()

    def get(self, account_key: str, code: str, now: float) -> tuple[int, str, SendingPolicy] | None:
        """(code id, label, sending policy) this (account, code) verified as within the TTL, or
        None."""
        if self.ttl <= 0:
            return None
        d = self.digest(account_key, code)
        hit = self._entries.get(d)
        if hit is None:
            return None
        code_id, label, expires, sending = hit
        if expires <= now:
            del self._entries[d]
            return None
        self._entries.move_to_end(d)
        return code_id, label, sending

    def put(
        self,
        account_key: str,
        code: str,
        code_id: int,
        label: str,
        now: float,
        sending: SendingPolicy | None = None,
    ) -> None:
        if self.ttl <= 0:
            return
        d = self.digest(account_key, code)
        policy = sending or SendingPolicy()
        self._keep(d, (code_id, label, now + self.ttl, policy))
        if self._publish is not None:
            self._publish(d, code_id, label, self.ttl, policy)

    def put_shared(
        self, digest: bytes, code_id: int, label: str, ttl: float, sending: SendingPolicy
    ) -> None:
        """An entry another worker verified, for its TTL (never longer than ours)."""
        if self.ttl <= 0 or ttl <= 0:
            return
        self._keep(digest, (code_id, label, self.clock() + min(ttl, self.ttl), sending))

    def _keep(self, digest: bytes, entry: tuple[int, str, float, SendingPolicy]) -> None:
        self._entries[digest] = entry
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget_code(self, code_id: int) -> None:
        """Drop every entry for this code (it was revoked, disabled or deleted somewhere)."""
        for key in [k for k, entry in self._entries.items() if entry[0] == code_id]:
            del self._entries[key]

    def forget(self, account_key: str, code: str) -> None:
        self._entries.pop(self.digest(account_key, code), None)
