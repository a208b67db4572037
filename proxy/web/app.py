"""What the portal and the admin API share: their view of the running proxy (WebApp), the
client's address behind trusted proxies, and a 404."""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import Request

from proxy.audit import Audit
from proxy.auth.ratelimit import Limiter, client_bucket
from proxy.codes.hashing import CodeHasher
from proxy.config import Settings
from proxy.fairqueue import FairQueue
from proxy.manage import Manager
from proxy.metrics import Metrics
from proxy.web.records import WebRecords

T = TypeVar("T")

# Blocking calls for the web side at once, and waiting: sign-ins bind to LDAP and verify argon2
# hashes, pages read the store. A person clicks a few times a minute; 4 threads and 256 waiting
# (an address at most an eighth) keep a scripted flood from the mail logins' way.
WEB_THREADS = 4
WEB_QUEUE = 256

# A request body is kept up to this much: the largest real one (a code request with 16 networks
# and a 100-character label, a portal form) is under 2 KiB, so 64 KiB is generous and bounds
# what one request may hold in memory (twisted.web keeps any body, spilling to disk past 100 KB).
MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class Ops:
    """What the metrics and health endpoints read from the running proxy."""

    metrics: Metrics
    ready: Callable[[], Awaitable[dict[str, str]]]  # check name -> "ok" or what failed
    clock: Callable[[], float]


@dataclass
class WebApp:
    """What the portal and the API need from the running proxy, and nothing more."""

    settings: Settings
    manager: Manager  # the one service layer (synchronous: run it through `blocking`)
    records: WebRecords  # API tokens, portal sessions, TOTP
    directory: Any  # verify_password, lookup
    hasher: CodeHasher
    limiter: Limiter  # the mail logins' limiter: sign-in failures count in it too
    audit: Audit
    reactor: Any
    queue: FairQueue
    ops: Ops | None = None  # metrics and readiness, for serve: [metrics, health]

    def blocking(self, request: Request, fn: Callable[..., T], *args: Any) -> defer.Deferred[T]:
        """Run `fn(*args)` off the reactor, fairly among client addresses."""
        return self.queue.submit(client_bucket(client_ip(self, request)), fn, *args)


def client_ip(app: WebApp, request: Request) -> str:
    """The client's address: the peer's, or the right-most X-Forwarded-For address that is not
    a trusted proxy when the peer is one (web.trusted_proxies)."""
    peer = getattr(request.getClientAddress(), "host", "") or ""
    trusted = app.settings.web.trusted_proxies
    if not trusted or not _within(peer, trusted):
        return peer
    forwarded = (request.getHeader("x-forwarded-for") or "").split(",")
    for hop in reversed([h.strip() for h in forwarded if h.strip()]):
        if not _within(hop, trusted):
            return hop
    return peer


def is_secure(app: WebApp, request: Request) -> bool:
    """HTTPS to the client: this listener's TLS, or a trusted proxy's X-Forwarded-Proto."""
    if request.isSecure():
        return True
    peer = getattr(request.getClientAddress(), "host", "") or ""
    trusted = app.settings.web.trusted_proxies
    return (
        bool(trusted)
        and _within(peer, trusted)
        and ((request.getHeader("x-forwarded-proto") or "").lower() == "https")
    )


def _within(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class BoundedRequest(Request):
    """A request that keeps at most MAX_BODY of its body, in memory: past it the body is dropped
    and `too_large` set, for the resource to answer 413 (an empty body is never mistaken for
    the one sent)."""

    too_large = False
    _kept = 0

    def gotLength(self, length: int | None) -> None:
        self.too_large = length is not None and length > MAX_BODY
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._kept += len(data)
        if self.too_large or self._kept > MAX_BODY:
            self.too_large = True
            self.content = BytesIO()
            return
        assert self.content is not None
        self.content.write(data)


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Not found.\n"


def web_app(
    settings: Settings,
    directory: Any,
    store: Any,
    limiter: Limiter,
    audit: Audit,
    reactor: Any,
    ops: Ops | None = None,
) -> WebApp:
    """The portal's and the API's view of the running proxy (`store`: the synchronous one)."""
    hasher = CodeHasher(settings.codes.argon2)
    queue = FairQueue("apppass-web", WEB_THREADS, WEB_QUEUE)
    queue.start(reactor)
    return WebApp(
        settings=settings,
        manager=Manager(settings, directory, store, hasher, audit),
        records=WebRecords(store),
        directory=directory,
        hasher=hasher,
        limiter=limiter,
        audit=audit,
        reactor=reactor,
        queue=queue,
        ops=ops,
    )
