"""Open the configured code store, migrated: SQLite for one node, PostgreSQL for several."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import SqlCodeStore

if TYPE_CHECKING:
    from proxy.codes.pgsettings import PostgresSettings


class StoreChoice(Protocol):
    """Which store, and where (the config's `store` section)."""

    @property
    def kind(self) -> str: ...

    @property
    def target(self) -> Path | None: ...

    @property
    def postgresql(self) -> PostgresSettings | None: ...


def open_store(store: StoreChoice) -> SqlCodeStore:
    """The store, its schema brought up to date (StoreUnavailable if it cannot be reached or its
    schema is newer than this apppass)."""
    if store.kind == "postgresql" and store.postgresql is not None:
        # Imported when chosen: psycopg needs libpq, which a SQLite site need not have.
        from proxy.codes.postgres import PostgresCodeStore

        return PostgresCodeStore(store.postgresql)
    if store.kind != "sqlite" or store.target is None:
        raise ValueError(f"store: unsupported store {store.kind!r}")
    return SqliteCodeStore(store.target)


def store_threads(store: StoreChoice) -> int:
    """How many store calls the proxy runs at once: SQLite has one writer at a time; PostgreSQL
    serves as many as the pool has connections."""
    if store.kind == "postgresql" and store.postgresql is not None:
        return store.postgresql.pool_max
    return 1
