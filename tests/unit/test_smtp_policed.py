"""Specification of the policed SMTP watch (proxy/smtp/policed.py): the command watch of a code
with a sending policy, joined to the code's message count in the store."""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from proxy.codes.sending import SendingPolicy, resolve
from proxy.codes.store import StoreUnavailable
from proxy.smtp.policed import REFUSAL_COUNT_SECONDS, PolicedWatch
from proxy.smtp.watch import SmtpCommandWatch
from tests.support.messages import Messages

PRINTER = resolve(
    SendingPolicy(("scanner@example.org",), ("example.org",), 10), ("printer1",), "printer1"
)
ENVELOPE = b"MAIL FROM:<scanner@example.org>\r\nRCPT TO:<a@example.org>\r\n"
DAY = 20417


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def policed():
    messages, clock, emitted = Messages(), Clock(), []
    watch = PolicedWatch(SmtpCommandWatch(rules=PRINTER), messages, clock)
    watch.attach(emitted.append)
    return watch, messages, clock, emitted


def test_an_answer_that_comes_later_is_emitted_with_the_held_recipient_and_what_followed():
    watch, messages, _, emitted = policed()
    result = watch.client_data(ENVELOPE + b"NOOP\r\n")
    assert result.to_upstream == b"MAIL FROM:<scanner@example.org>\r\n" and watch.waiting
    messages.holds[0].callback(DAY)
    (later,) = emitted
    assert later.to_upstream == b"RCPT TO:<a@example.org>\r\nNOOP\r\n" and not watch.waiting
    watch.client_data(b"BDAT 1 LAST\r\nx")
    watch.upstream_data(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n250 Ok\r\n")
    assert (messages.sent_days, messages.released) == ([DAY], [])


def test_an_answer_that_is_there_at_once_goes_on_in_the_same_call():
    watch, messages, _, emitted = policed()
    messages.hold = lambda: defer.succeed(DAY)  # type: ignore[method-assign]
    result = watch.client_data(ENVELOPE)
    assert result.to_upstream == ENVELOPE and emitted == []


def test_the_cap_reached_and_the_store_down_refuse_the_recipient():
    watch, messages, _, emitted = policed()
    watch.client_data(ENVELOPE)
    messages.holds[0].callback(None)
    assert emitted[-1].refused == ("RCPT TO (daily message limit)",)
    assert watch.upstream_data(b"250 Ok\r\n").to_client.startswith(b"250 Ok\r\n452 4.7.0 ")
    watch.client_data(b"RSET\r\n" + ENVELOPE)
    messages.holds[1].errback(Failure(StoreUnavailable("database down")))
    assert watch.upstream_data(b"250 Ok\r\n250 Ok\r\n").to_client.endswith(
        b"451 4.3.0 Error: cannot count messages now, try again later\r\n"
    )
    assert messages.sent_days == messages.released == []


def test_places_still_held_when_the_session_ends_are_given_back_even_late_ones():
    watch, messages, _, _ = policed()
    watch.client_data(ENVELOPE)
    messages.holds[0].callback(DAY)
    watch.client_data(b"RSET\r\n" + ENVELOPE)  # the first place is returned when RSET is answered
    watch.finish()
    assert messages.released == [DAY]
    messages.holds[1].callback(DAY)  # the store answered after the session ended
    assert messages.released == [DAY, DAY]


def test_policy_refusals_are_counted_on_the_code_at_once_then_at_most_every_ten_seconds():
    watch, messages, clock, _ = policed()
    bad = b"MAIL FROM:<boss@example.org>\r\n"
    watch.client_data(bad + b"XCLIENT LOGIN=bob\r\n")  # XCLIENT is not the policy's
    assert messages.refusals == [1]
    watch.client_data(bad * 5)
    clock.now += REFUSAL_COUNT_SECONDS
    watch.client_data(bad)
    assert messages.refusals == [1, 6]
    watch.client_data(bad * 2)
    watch.finish()
    assert messages.refusals == [1, 6, 2]
