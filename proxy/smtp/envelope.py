"""The address in an SMTP MAIL FROM or RCPT TO command line (RFC 5321 §4.1.2), read strictly so
that the proxy and the upstream cannot disagree about it. Pure; used by the command watch
(smtp/watch.py) for codes with a sending policy.

Strict where servers are lenient: the path must be in angle brackets (Postfix also takes a bare
address unless strict_rfc821_envelopes is set; a line the watch cannot read exactly is refused,
never guessed at), no space or control character outside a quoted local part, and parameters
(SIZE=, BODY=, …) only after a space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# "MAIL FROM:" and "RCPT TO:", in any case, with Postfix's tolerance of spaces around the verb's
# argument ("MAIL FROM: <a@b>").
_MAIL = re.compile(rb"MAIL[ \t]+FROM:[ \t]*", re.IGNORECASE)
_RCPT = re.compile(rb"RCPT[ \t]+TO:[ \t]*", re.IGNORECASE)


@dataclass(frozen=True)
class Mailbox:
    """A path's mailbox: local part as written (quotes kept), domain lower-cased. The null
    reverse-path `<>` is local "" and domain ""."""

    local: str
    domain: str
    quoted: bool = False  # the local part is a quoted string
    routed: bool = False  # a source route (@relay,@relay:) came before it

    @property
    def null(self) -> bool:
        return not self.local and not self.domain


def mail_from(line: bytes) -> Mailbox | None:
    """The reverse-path of a MAIL FROM line (without CRLF); None if it cannot be read exactly."""
    return _path(line, _MAIL, null_ok=True)


def rcpt_to(line: bytes) -> Mailbox | None:
    """The forward-path of a RCPT TO line; None if it cannot be read exactly (or is `<>`)."""
    return _path(line, _RCPT, null_ok=False)


def _path(line: bytes, head: re.Pattern[bytes], *, null_ok: bool) -> Mailbox | None:
    found = head.match(line)
    if found is None:
        return None
    try:
        rest = line[found.end() :].decode("utf-8")  # RFC 6531 SMTPUTF8 addresses are UTF-8
    except UnicodeDecodeError:
        return None
    if not rest.startswith("<"):
        return None
    inner, end = _bracketed(rest)
    if inner is None or (end < len(rest) and rest[end] not in " \t"):
        return None
    return _mailbox(inner, null_ok)


def _bracketed(text: str) -> tuple[str | None, int]:
    """What is between "<" and its ">" (quoted strings may hold ">"), and where it ends."""
    out = []
    quoted = False
    i = 1
    while i < len(text):
        c = text[i]
        if ord(c) < 0x20 or c == "\x7f":
            return None, i
        if quoted:
            if c == "\\":
                if i + 1 >= len(text) or ord(text[i + 1]) < 0x20:
                    return None, i
                out.append(text[i : i + 2])
                i += 2
                continue
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == ">":
            return "".join(out), i + 1
        elif c in "< ":
            return None, i
        out.append(c)
        i += 1
    return None, i


def _mailbox(inner: str, null_ok: bool) -> Mailbox | None:
    routed = inner.startswith("@")
    if routed:
        route, colon, inner = inner.partition(":")
        if not colon or '"' in route:
            return None
    if not inner:
        return Mailbox("", "") if null_ok and not routed else None
    if inner.startswith('"'):
        close = _closing_quote(inner)
        if close is None or inner[close + 1 : close + 2] != "@":
            return None
        local, domain, quoted = inner[: close + 1], inner[close + 2 :], True
    else:
        local, at, domain = inner.partition("@")
        if not at or '"' in local:
            return None
        quoted = False
    if not local or not domain or "@" in domain or '"' in domain:
        return None
    return Mailbox(local, domain.lower(), quoted, routed)


def _closing_quote(text: str) -> int | None:
    i = 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i
        i += 1
    return None
