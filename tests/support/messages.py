"""A code's message count (proxy/auth/decision.py MessageCount) for unit tests of SMTP sessions
with a sending policy: places held are answered when the test says."""

from __future__ import annotations

from twisted.internet import defer


class Messages:
    """A code's message count as the store keeps it: holds answered when the test says."""

    def __init__(self) -> None:
        self.holds: list[defer.Deferred] = []
        self.sent_days: list[int] = []
        self.released: list[int] = []
        self.refusals: list[int] = []

    def hold(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.holds.append(d)
        return d

    def sent(self, day: int) -> None:
        self.sent_days.append(day)

    def release(self, day: int) -> None:
        self.released.append(day)

    def refused(self, count: int) -> None:
        self.refusals.append(count)
