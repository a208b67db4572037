"""Orphaned codes: codes whose account key the directory no longer resolves (the account was
deleted, or its login now names someone else, with another id). They can never log in again,
since codes belong to the key and never to a login that is later reused; they stay listed,
marked, until revoked by id or by the old key."""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from typing import Protocol

from proxy.directory.account import Directory

ORPHANED = "orphaned: account gone"


class _Code(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def account_key(self) -> str: ...

    @property
    def revoked_at(self) -> object: ...


def orphaned_keys(directory: Directory, keys: Iterable[str]) -> set[str]:
    """The keys no account has any more. Raises DirectoryUnavailable."""
    return {key for key in set(keys) if directory.by_key(key) is None}


def orphan_notes(codes: Sequence[_Code], orphaned: set[str]) -> list[str]:
    """One line per gone account with unrevoked codes: which codes, and how to revoke them."""
    notes = []
    for key in sorted(orphaned):
        ids = [str(c.id) for c in codes if c.account_key == key and c.revoked_at is None]
        if ids:
            notes.append(
                f"{ORPHANED}: code{'s' if len(ids) > 1 else ''} {', '.join(ids)} of account key "
                f"{key!r}, which the directory no longer has; revoke with: "
                f"apppass codes revoke-all --key {shlex.quote(key)}"
            )
    return notes
