"""Helpers for property tests of stream parsers: the same bytes cut into chunks anywhere."""

from __future__ import annotations


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length + 1), in order, maybe empty."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
