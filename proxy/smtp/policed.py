"""The SMTP command watch of a code with a sending policy, joined to the code's message count in
the store: when the watch asks for a place under the daily cap it asks the store (a thread, so
an answer comes later) and feeds the answer back; it counts each message the upstream accepted
and gives back each place not used; it counts the policy's refusals on the code. The frontend
gives it `emit`, to write out what the watch says once an answer came (frontend.py `_hooks`),
and calls `finish` when the session ends (places still held are given back).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from twisted.python.failure import Failure

from proxy.auth.decision import MessageCount
from proxy.smtp.watch import POLICY_REFUSALS, SENT, Relayed, SmtpCommandWatch

# A session's policy refusals are written to its code at once the first time, then at most once
# per this many seconds and at session end: the same pace as the audit of refused commands
# (frontend.py REFUSED_AUDIT_SECONDS), so a client repeating a refused command costs a write
# every ten seconds, not one per command.
REFUSAL_COUNT_SECONDS = 10.0

_NOTHING = object()


class PolicedWatch:
    """A SessionWatch (frontend.py) around an SmtpCommandWatch with rules."""

    def __init__(
        self,
        watch: SmtpCommandWatch,
        messages: MessageCount,
        clock: Callable[[], float],
    ) -> None:
        self.watch = watch
        self.messages = messages
        self._clock = clock
        self._emit: Callable[[Relayed], None] | None = None
        self._days: deque[int] = deque()  # the day of each place held, in the order held
        self._refused = 0  # policy refusals not yet written to the code
        self._written: float | None = None  # when they were last written
        self._answer: Any = _NOTHING  # an answer that came while a call was running
        self._calling = False
        self._ended = False

    @property
    def waiting(self) -> bool:
        return self.watch.waiting

    def attach(self, emit: Callable[[Relayed], None]) -> None:
        """Where what the watch says after a late answer goes (the relay, both ways)."""
        self._emit = emit

    def client_data(self, data: bytes) -> Relayed:
        return self._run(self.watch.client_data, data)

    def upstream_data(self, data: bytes) -> Relayed:
        return self._run(self.watch.upstream_data, data)

    def finish(self) -> None:
        """The session ended: give back the places still held, write the refusals counted."""
        self._ended = True
        while self._days:
            self.messages.release(self._days.popleft())
        self._write_refusals()

    # -- inside -----------------------------------------------------------------------------

    def _run(self, call: Callable[[bytes], Relayed], data: bytes) -> Relayed:
        self._calling = True
        try:
            return self._after(call(data))
        finally:
            self._calling = False

    def _after(self, result: Relayed) -> Relayed:
        """Count what a result says; ask the store when it asks. An answer that is there at
        once (a cached or synchronous store) goes on in the same call, its output appended."""
        merged = result
        while True:
            self._account(result)
            if not result.ask:
                return merged
            self._answer = _NOTHING
            self.messages.hold().addBoth(self._answered)
            if self._answer is _NOTHING:
                return merged  # it comes later: _answered emits what follows
            result = self.watch.answer(self._take())
            merged = _joined(merged, result)

    def _answered(self, value: Any) -> None:
        if self._ended:  # the session ended while the store answered
            if isinstance(value, int):
                self.messages.release(value)
            return
        self._answer = value
        if self._calling:
            return  # _after takes it
        self._calling = True
        try:
            result = self._after(self.watch.answer(self._take()))
        finally:
            self._calling = False
        if self._emit is not None:
            self._emit(result)

    def _take(self) -> bool | None:
        """The answer as the watch takes it: a place (remembering its day), none, or unknown."""
        value, self._answer = self._answer, _NOTHING
        if isinstance(value, Failure):
            return None  # the store is unavailable: refused as temporary, never let through
        if value is None:
            return False
        self._days.append(value)
        return True

    def _account(self, result: Relayed) -> None:
        for event in result.slots:
            if not self._days:
                continue  # cannot happen: each event follows a place held
            day = self._days.popleft()
            if event == SENT:
                self.messages.sent(day)
            else:
                self.messages.release(day)
        refused = sum(1 for what in result.refused if what in POLICY_REFUSALS)
        if refused:
            self._refused += refused
            now = self._clock()
            if self._written is None or now - self._written >= REFUSAL_COUNT_SECONDS:
                self._written = now
                self._write_refusals()

    def _write_refusals(self) -> None:
        if self._refused:
            self.messages.refused(self._refused)
            self._refused = 0


def _joined(first: Relayed, then: Relayed) -> Relayed:
    return replace(
        first,
        to_upstream=first.to_upstream + then.to_upstream,
        to_client=first.to_client + then.to_client,
        refused=first.refused + then.refused,
        close=first.close or then.close,
        ask=then.ask,
        slots=first.slots + then.slots,
    )
