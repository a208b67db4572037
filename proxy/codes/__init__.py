"""App passwords: format, hashing, storage and issuing."""


def open_store(settings):
    """The configured store (SQLite today; PostgreSQL for several nodes), migrated."""
    from proxy.codes.sqlite import SqliteCodeStore

    return SqliteCodeStore(settings.store.target)
