"""Verified-credential cache: a repeat login with a code that verified recently skips argon2.

Keyed by an HMAC (with a per-process random key) of the account and the code, so the cache never
holds a code. It never skips the claim: revocation, disabling, expiry and max_uses apply at once.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict

from proxy.codes.sending import SendingPolicy

# Entries kept at once (each about 150 bytes); the least recently used go first.
MAX_ENTRIES = 50_000


class VerifiedCache:
    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._key = os.urandom(32)
        # (code id, label, expiry, sending policy): a code's policy never changes once made.
        self._entries: OrderedDict[bytes, tuple[int, str, float, SendingPolicy]] = OrderedDict()

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
        self._entries[d] = (code_id, label, now + self.ttl, sending or SendingPolicy())
        self._entries.move_to_end(d)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def forget_code(self, code_id: int) -> None:
        """Drop every entry for this code (it was revoked, disabled or deleted somewhere)."""
        for key in [k for k, entry in self._entries.items() if entry[0] == code_id]:
            del self._entries[key]

    def forget(self, account_key: str, code: str) -> None:
        self._entries.pop(self.digest(account_key, code), None)
