"""What operators scrape: `/metrics` (Prometheus text), `/healthz` (the process answers) and
`/readyz` (the store, the directory and the upstreams answer: HAProxy and Kubernetes probes).
Served by a web listener with `serve: [metrics, health]`, usually on loopback or an ops network.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.metrics import Metrics

# Readiness is asked every few seconds by each load balancer; an answer this fresh is reused so
# that probes never add up to load on LDAP, the database or the mail servers.
READY_CACHE_SECONDS = 2.0

Readiness = Callable[[], Awaitable[dict[str, str]]]


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        return generate_latest(self.metrics.registry)


class HealthResource(Resource):
    """`/healthz`: 200 while the reactor runs. `/readyz`: 200 when every dependency answers,
    else 503; JSON naming each check either way."""

    isLeaf = True

    def __init__(self, ready: Readiness, clock: Callable[[], float]) -> None:
        super().__init__()
        self.ready = ready
        self.clock = clock
        self._last: tuple[float, dict[str, str]] | None = None

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", b"application/json")
        if request.path.rstrip(b"/").endswith(b"/healthz"):
            return b'{"status": "ok"}\n'
        defer.ensureDeferred(self._readiness()).addCallback(self._answer, request)
        return NOT_DONE_YET

    async def _readiness(self) -> dict[str, str]:
        now = self.clock()
        if self._last is not None and now - self._last[0] < READY_CACHE_SECONDS:
            return self._last[1]
        checks = await self.ready()
        self._last = (self.clock(), checks)
        return checks

    @staticmethod
    def _answer(checks: dict[str, str], request: Request) -> None:
        ready = all(state == "ok" for state in checks.values())
        request.setResponseCode(200 if ready else 503)
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        request.write(json.dumps(body, indent=1).encode() + b"\n")
        request.finish()
