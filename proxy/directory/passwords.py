"""Portal passwords of the static directory: an argon2id `password_hash` per account in the
users file (made with `apppass users hash-password`), checked when a person signs in to the
self-service portal. LDAP directories check passwords with a bind instead (ldap/pool.py).

Synchronous and slow on purpose (one verification costs tens of milliseconds): the portal runs
it off the reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# argon2-cffi's default profile, RFC 9106 §4's second recommendation (argon2id, t=3, 64 MiB,
# p=4): a person signs in now and then, so the cost may be far above a code's.
_HASHER = PasswordHasher(type=Type.ID)

# Longest password accepted (a person types it; Active Directory allows 256 characters, bcrypt
# stops at 72 bytes): longer input is refused before any work.
MAX_PASSWORD = 1024

# Verified instead of a hash for an account without one, so that timing tells nothing.
_DUMMY = _HASHER.hash("dummy-password-never-used")


@dataclass(frozen=True)
class PasswordHash:
    """An account's portal password hash; its repr never shows the hash."""

    encoded: str = field(repr=False)


def hash_password(password: str) -> str:
    """An argon2id hash for the users file."""
    return _HASHER.hash(password)


def verify_password_hash(stored: PasswordHash | None, password: str) -> bool:
    """True if `password` matches; without a hash, burns one verification and says False."""
    if not password or len(password) > MAX_PASSWORD:
        return False
    try:
        return _HASHER.verify(stored.encoded if stored else _DUMMY, password) and bool(stored)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_hash_problem(value: str) -> str | None:
    """Why `value` is not an argon2id hash apppass can check, or None."""
    try:
        params = extract_parameters(value)
    except (InvalidHashError, ValueError):
        return "must be an argon2id hash made with `apppass users hash-password`"
    if params.type is not Type.ID:
        return f"must be an argon2id hash (got argon2{params.type.name.lower()})"
    return None
