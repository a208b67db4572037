"""A small thread-safe cache of lookups, with a lifetime per entry and a bound on its size."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

# Cached lookups kept at most (oldest dropped first); a flood of unknown names cannot grow the
# cache without bound.
CACHE_MAX_ENTRIES = 10_000

V = TypeVar("V")


class TtlCache(Generic[V]):
    """A small thread-safe cache with a lifetime per entry and a bound on its size."""

    def __init__(self, clock: Callable[[], float], max_entries: int = CACHE_MAX_ENTRIES) -> None:
        self._clock = clock
        self._max = max_entries
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, V | None]:
        """(True, value) while key's entry lives (value may be None: "no such thing"), else
        (False, None)."""
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return False, None
            expires, value = item
            if self._clock() >= expires:
                del self._data[key]
                return False, None
            return True, value

    def put(self, key: Hashable, value: V, ttl: float) -> None:
        """Keep value for ttl seconds; a ttl of 0 (or less) keeps nothing."""
        if ttl <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock() + ttl, value)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)
