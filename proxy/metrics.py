"""Prometheus metrics of one running proxy (served on `/metrics` by a web listener with
`serve: [metrics]`).

Labels are bounded sets only: protocol, listener, outcome, phase, queue, reason, upstream
address. Never a login name, a code, a label or a client address (rule: secrets and people
never become label values, and an attacker must not be able to grow the series count).

With serve.workers above 1 every worker process writes its values to files in the private
folder the supervisor names in PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode,
chosen when the library is imported), and `/metrics`, whichever worker answers, reports the
sums over all of them: counters and histograms add up (those of a worker that died too), gauges
of the live workers are summed (sessions, queues) or their minimum taken (certificate expiry).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.internet import task

# prometheus-client's switch to its multiprocess mode (set for workers by proxy/workers.py).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

# In multiprocess mode, how often a worker writes its scrape-time gauges (queue depths,
# certificate expiry) to its files: Prometheus scrapes every 15 s or more by default.
SAMPLE_SECONDS = 1.0

# How the gauges of several workers add up (prometheus-client's multiprocess_mode).
GaugeMode = Literal["livesum", "livemin"]

# Login latency buckets, in seconds: a warm login takes a few ms, a cold one (argon2id) tens of
# ms, a slow LDAP or upstream seconds; the login timeout is 60 s by default.
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Callback(Collector):
    """A gauge family read when scraped (queue depths, certificate expiry)."""

    def __init__(
        self,
        name: str,
        doc: str,
        labels: list[str],
        read: Callable[[], Iterable[tuple[list[str], float]]],
    ) -> None:
        self.name, self.doc, self.labels, self.read = name, doc, labels, read

    def collect(self):
        family = GaugeMetricFamily(self.name, self.doc, labels=self.labels)
        for values, value in self.read():
            family.add_metric(values, value)
        yield family


class Metrics:
    """The proxy's metrics, in a registry of its own (several proxies may share a process in
    tests). `registry` is what /metrics shows: this process's metrics, or in multiprocess mode
    every worker's together."""

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROCESS_DIR))
        r = CollectorRegistry()
        self.registry = r
        if self.multiprocess:
            from prometheus_client.multiprocess import MultiProcessCollector

            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry)
        self._samplers: list[Callable[[], None]] = []
        self._loop: task.LoopingCall | None = None
        self.logins = Counter(
            "apppass_logins",
            "Mail logins by protocol, listener and outcome (grant, or the "
            "refusal: credentials, expired, forbidden, privacy, temporary, limit, busy).",
            ["protocol", "listener", "outcome"],
            registry=r,
        )
        self.login_seconds = Histogram(
            "apppass_login_seconds",
            "Time from a client's credentials to the proxy's answer.",
            ["protocol", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.phase_seconds = Histogram(
            "apppass_login_phase_seconds",
            "Time a login spent in each phase: directory, "
            "store, argon2 (waiting and hashing), upstream (connect and log in).",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Gauge(
            "apppass_sessions",
            "Logged-in sessions being relayed.",
            ["protocol"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.relayed = Counter(
            "apppass_relayed_bytes",
            "Bytes relayed by finished sessions.",
            ["protocol", "direction"],
            registry=r,
        )
        self.backend_errors = Counter(
            "apppass_backend_errors",
            "Directory and store failures seen by logins.",
            ["backend"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "apppass_upstream_errors",
            "Failed upstream connects or logins, by upstream.",
            ["protocol", "upstream"],
            registry=r,
        )
        self.refused_connections = Counter(
            "apppass_refused_connections",
            "Connections or logins refused by a cap or limit.",
            ["reason"],
            registry=r,
        )
        self.verified_shared = Counter(
            "apppass_verified_cache_shared",
            "serve.workers: verified-cache entries told to the other workers (sent) and heard "
            "from them (received).",
            ["direction"],
            registry=r,
        )
        self.sessions_ended = Counter(
            "apppass_sessions_ended",
            "Sessions the proxy ended (code or account no longer allowed, or the proxy stopping).",
            ["reason"],
            registry=r,
        )

    def watch_queues(self, queues: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        """Queue depths, read at scrape time: (queue name, running, waiting)."""

        def running():
            return [([name], float(run)) for name, run, _ in queues()]

        def waiting():
            return [([name], float(wait)) for name, _, wait in queues()]

        self._watch(
            "apppass_queue_running",
            "Blocking jobs running (argon2, directory, store, web).",
            ["queue"],
            running,
            "livesum",
        )
        self._watch(
            "apppass_queue_waiting",
            "Blocking jobs waiting for a thread.",
            ["queue"],
            waiting,
            "livesum",
        )

    def watch_certificates(self, expiries: Callable[[], Iterable[tuple[str, datetime]]]) -> None:
        """Each listener's certificate expiry (unix time), read at scrape time."""
        self._watch(
            "apppass_certificate_expiry_timestamp_seconds",
            "When each TLS listener's certificate expires.",
            ["listener"],
            lambda: [([name], moment.timestamp()) for name, moment in expiries()],
            "livemin",  # the earliest: a worker whose reload failed still serves the old one
        )

    def _watch(
        self,
        name: str,
        doc: str,
        labels: list[str],
        read: Callable[[], Iterable[tuple[list[str], float]]],
        mode: GaugeMode,
    ) -> None:
        """A gauge read at scrape time; in multiprocess mode one written every SAMPLE_SECONDS
        instead (another worker may answer the scrape)."""
        if not self.multiprocess:
            self.registry.register(_Callback(name, doc, labels, read))
            return
        gauge = Gauge(name, doc, labels, registry=None, multiprocess_mode=mode)

        def sample() -> None:
            for values, value in read():
                gauge.labels(*values).set(value)

        self._samplers.append(sample)

    def sample(self) -> None:
        for sample in self._samplers:
            sample()

    def start(self, reactor: Any) -> None:
        """In multiprocess mode, write the scrape-time gauges now and then."""
        if not self._samplers:
            return
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = reactor
        self._loop.start(SAMPLE_SECONDS, now=True)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()


class Timer:
    """Seconds since it was made, for a histogram."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started
