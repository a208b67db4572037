"""What every test of `make bench` shares: the number of runs, the progress log, and how the runs'
figures become the medians and ratios of the table (one definition, so that every test computes
its cells alike).
"""

from __future__ import annotations

import statistics
import sys
import time

# Every figure is the median of this many runs (bench/run.py's docstring).
RUNS = 3

# The sides each run of the warm and relay tests measures, in this order: apppass, its
# reference (Dovecot direct) and its peer (nginx in front of the same Dovecot).
SIDES = ("proxy", "direct", "nginx")


def log(text: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def ratio(a, b):
    """a / b, rounded; None when either is missing or b is 0."""
    return round(a / b, 3) if a is not None and b else None


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def medians(runs: list[dict], keys) -> dict:
    return {k: median([r[k] for r in runs]) for k in keys}


def median_dict(dicts: list[dict]) -> dict:
    """Key by key, the median of the figures of several runs (CPU shares)."""
    keys = dict.fromkeys(k for d in dicts for k in d)
    return {k: median([d.get(k) for d in dicts]) for k in keys}
