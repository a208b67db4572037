"""Open the configured code store (SQLite today; PostgreSQL for several nodes), migrated."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from proxy.codes.sqlite import SqliteCodeStore


class StoreChoice(Protocol):
    """Which store, and where (the config's `store` section)."""

    @property
    def kind(self) -> str: ...

    @property
    def target(self) -> Path | None: ...


def open_store(store: StoreChoice) -> SqliteCodeStore:
    if store.kind != "sqlite" or store.target is None:
        raise ValueError(f"store: unsupported store {store.kind!r}")
    return SqliteCodeStore(store.target)
