"""Durations and expiries as people write them in the config and on the command line."""

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.configschema import Invalid, parse_duration, parse_expiry

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("90d", timedelta(days=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(minutes=90)),
        ("0s", timedelta(0)),
        (45, timedelta(seconds=45)),
        (" 12H ", timedelta(hours=12)),
    ],
)
def test_duration_forms(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["", "soon", "12", "-5d", "1.5h", "d", "12hours", "never", True, None, 1.5]
)
def test_bad_durations_are_refused(text):
    with pytest.raises(Invalid):
        parse_duration(text)


def test_never_is_allowed_only_where_asked():
    assert parse_duration("never", allow_never=True) is None
    with pytest.raises(Invalid, match="never is not allowed"):
        parse_duration("never")


def test_expiry_from_duration_date_or_never():
    assert parse_expiry("90d", NOW) == NOW + timedelta(days=90)
    assert parse_expiry("2027-06-30", NOW) == datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert parse_expiry("never", NOW) is None


@given(st.lists(st.tuples(st.integers(0, 1000), st.sampled_from("smhdw")), min_size=1, max_size=4))
def test_duration_sums_its_parts(parts):
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration(text) == timedelta(seconds=sum(n * units[u] for n, u in parts))


@given(st.text(max_size=20))
def test_duration_parser_never_raises_anything_but_invalid(text):
    try:
        result = parse_duration(text, allow_never=True)
    except Invalid:
        return
    assert result is None or result >= timedelta(0)
