"""Bounded line framing for pre-auth protocol cores: CRLF (or bare LF) lines, with a limit.

A line longer than the limit is reported once as TooLong and its remainder is skipped up to the
next line end, so a client cannot make the proxy buffer without bound.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TooLong:
    """A line went past the limit; it was dropped."""


class LineBuffer:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # octets, CRLF included
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    def clear(self) -> bytes:
        """Drop and return everything buffered (STARTTLS, or handing over to the relay)."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        return rest

    def take_bytes(self, n: int) -> bytes | None:
        """Exactly n raw octets (an IMAP literal), or None until that many are buffered."""
        if len(self._buf) < n:
            return None
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_line(self) -> bytes | TooLong | None:
        """The next line without its line end, TooLong, or None if no whole line is buffered."""
        while True:
            end = self._buf.find(b"\n")
            if self._skipping:
                if end < 0:
                    self._buf.clear()
                    return None
                del self._buf[: end + 1]
                self._skipping = False
                continue
            if end < 0:
                if len(self._buf) > self.limit:
                    self._buf.clear()
                    self._skipping = True
                    return TooLong()
                return None
            if end + 1 > self.limit:
                del self._buf[: end + 1]
                return TooLong()
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            return line[:-1] if line.endswith(b"\r") else line
