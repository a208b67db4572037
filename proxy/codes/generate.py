"""App-password format: 16 characters = a 4-character selector (stored in clear, per account)
and a 12-character secret; shown once in four groups of four."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

CODE_LENGTH = 16
SELECTOR_LENGTH = 4

# Look-alikes left out: 0 O o 1 l I (README: App passwords). 56 symbols: the secret carries
# 12 * log2(56) = 69.7 bits, inside NIST SP 800-63B's band for a salted, memory-hard hash.
MIXED = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789"
# For devices whose keypads make case painful: 32 symbols, 60 bits in the secret.
LOWER = "abcdefghijkmnpqrstuvwxyz23456789"
ALPHABETS = {"mixed": MIXED, "lower": LOWER}

# What may reach the hash check at all: the union of both alphabets (codes made under an earlier
# alphabet setting keep working).
_ACCEPTED = frozenset(MIXED) | frozenset(LOWER)


@dataclass(frozen=True)
class Code:
    """A freshly generated code. Exists only until it has been shown once."""

    value: str

    @property
    def selector(self) -> str:
        return self.value[:SELECTOR_LENGTH]

    def grouped(self) -> str:
        """`abcd-efgh-ijkm-npqr`: dashes, not spaces, so that a pasted code stays one IMAP atom."""
        return "-".join(self.value[i : i + 4] for i in range(0, CODE_LENGTH, 4))

    def __repr__(self) -> str:
        return "Code(<hidden>)"


def generate(
    alphabet: str = "mixed", avoid_selectors: frozenset[str] | set[str] = frozenset()
) -> Code:
    """A new random code whose selector is not among `avoid_selectors` (the account's others)."""
    symbols = ALPHABETS[alphabet]
    while True:
        value = "".join(secrets.choice(symbols) for _ in range(CODE_LENGTH))
        if value[:SELECTOR_LENGTH] not in avoid_selectors:
            return Code(value)


def normalise(typed: str) -> str:
    """Remove the spaces and dashes people type between groups; nothing else is changed
    (codes are case-sensitive)."""
    return typed.replace(" ", "").replace("-", "")


def split(typed: str) -> tuple[str, str] | None:
    """(selector, full normalised code) if `typed` can be a code at all, else None."""
    code = normalise(typed)
    if len(code) != CODE_LENGTH or not set(code) <= _ACCEPTED:
        return None
    return code[:SELECTOR_LENGTH], code
