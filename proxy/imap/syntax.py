"""IMAP syntax before login, sans-IO: the tokens of a command line, the ID parameters and the
names of capabilities.

Atoms, quoted strings, literals and parentheses as RFC 9051 §9 defines them, leniently where
real clients need it (unquoted passwords with "]" or "%"), and RFC 2971's ID list with its
bounds. proxy/imap/server.py reads commands with these.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

# RFC 2971 §3.3: at most 30 field-value pairs; fields at most 30 octets, values at most 1024.
ID_MAX_PAIRS = 30
ID_MAX_FIELD = 30
ID_MAX_VALUE = 1024


@dataclass(frozen=True)
class Atom:
    value: bytes


@dataclass(frozen=True)
class String:
    """A quoted string or a literal, already unescaped."""

    value: bytes


class Paren(enum.Enum):
    OPEN = "("
    CLOSE = ")"


Token = Atom | String | Paren

# ATOM-CHAR (RFC 9051 §9), leniently: also list-wildcards and "]", which clients put in
# unquoted passwords; never SP, CTL, 8-bit, "(", ")", "{", DQUOTE or "\".
ATOM_CHARS = frozenset(b for b in range(0x21, 0x7F) if b not in b'(){"\\')
# tag = 1*<any ASTRING-CHAR except "+"> (RFC 9051 §9): no list-wildcards either.
TAG_CHARS = frozenset(b for b in ATOM_CHARS if b not in b"%*+")

# A capability name as a server lists it: `capability = ("AUTH=" auth-type) / atom`, strictly
# (RFC 9051 §9: ATOM-CHAR is any CHAR but SP, CTL, "(", ")", "{", "%", "*", DQUOTE, "\\", "]").
CAPABILITY_CHARS = frozenset(chr(b) for b in range(0x21, 0x7F) if chr(b) not in '(){%*"\\]')

# Capabilities only apppass decides before login, whatever the upstream offers: STARTTLS and the
# mechanisms ("AUTH=…") depend on the listener and the client's TLS (RFC 9051 §6.2.3), SASL-IR on
# apppass's own AUTHENTICATE (RFC 4959).
DECIDED_BY_APPPASS = frozenset({"STARTTLS", "LOGINDISABLED", "SASL-IR"})


def is_capability(name: str) -> bool:
    return bool(name) and all(c in CAPABILITY_CHARS for c in name)


def decided_by_apppass(name: str) -> bool:
    """A capability apppass lists or not by itself (AUTH=PLAIN, STARTTLS, …), never passed on."""
    name = name.upper()
    return name in DECIDED_BY_APPPASS or name.startswith("AUTH=")


def capability_problem(name: object) -> str | None:
    """What is wrong with a capability name a listener's config lists, or None."""
    if not isinstance(name, str) or not is_capability(name):
        return 'must be an IMAP capability name: printable ASCII without spaces or ( ) { % * " \\ ]'
    if decided_by_apppass(name):
        return "is listed by apppass itself where it applies (from tls and plaintext_auth_from)"
    return None


# A literal's announcement at the very end of a line: {n} or {n+}, after SP, "(" or nothing.
_LITERAL_MARKER = re.compile(rb"(?:(?<=[ (])|\A)\{([0-9]{1,20})(\+?)\}\Z")


@dataclass(frozen=True)
class Marker:
    start: int  # where "{" is in the line
    size: int
    synchronizing: bool


def find_marker(line: bytes) -> Marker | None:
    m = _LITERAL_MARKER.search(line)
    if m is None:
        return None
    return Marker(m.start(), int(m.group(1)), not m.group(2))


def tokenize(data: bytes) -> list[Token] | str:
    """Atoms, quoted strings and parentheses of one line (its literal marker removed), or an
    error text. Quoted strings allow exactly the escapes \\" and \\\\ (RFC 9051 §9)."""
    tokens: list[Token] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x20:
            i += 1
        elif b == 0x28:
            tokens.append(Paren.OPEN)
            i += 1
        elif b == 0x29:
            tokens.append(Paren.CLOSE)
            i += 1
        elif b == 0x22:
            out = bytearray()
            i += 1
            while True:
                if i >= n:
                    return "Unterminated quoted string"
                c = data[i]
                if c == 0x22:
                    i += 1
                    break
                if c == 0x5C:
                    if i + 1 < n and data[i + 1] in (0x22, 0x5C):
                        out.append(data[i + 1])
                        i += 2
                        continue
                    return "Invalid escape in quoted string"
                if c in (0x0D, 0x0A):
                    return "Invalid character in quoted string"
                out.append(c)
                i += 1
            tokens.append(String(bytes(out)))
        elif b in ATOM_CHARS:
            j = i
            while j < n and data[j] in ATOM_CHARS:
                j += 1
            tokens.append(Atom(data[i:j]))
            i = j
        else:
            return "Invalid character in command"
    return tokens


def _is_nil(token: Token) -> bool:
    return isinstance(token, Atom) and token.value.upper() == b"NIL"


def _has_controls(text: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def parse_id(args: list[Token]) -> dict[str, str | None] | None:
    """ID parameters (RFC 2971): NIL, or a list of string/nstring pairs within its bounds.
    Anything else, or a field or value with CR, LF or NUL, gives None (ignored, never BAD)."""
    if len(args) == 1 and _is_nil(args[0]):
        return None
    if len(args) < 2 or args[0] is not Paren.OPEN or args[-1] is not Paren.CLOSE:
        return None
    inner = args[1:-1]
    if len(inner) % 2 or len(inner) // 2 > ID_MAX_PAIRS:
        return None
    params: dict[str, str | None] = {}
    for key, value in zip(inner[::2], inner[1::2], strict=True):
        if not isinstance(key, String) or not 0 < len(key.value) <= ID_MAX_FIELD:
            return None
        try:
            name = key.value.decode("utf-8")
            if _is_nil(value):
                text = None
            elif isinstance(value, String) and len(value.value) <= ID_MAX_VALUE:
                text = value.value.decode("utf-8")
            else:
                return None
        except UnicodeDecodeError:
            return None
        if _has_controls(name) or (text is not None and any(c in text for c in "\r\n\0")):
            return None
        params[name] = text
    return params
