"""The HTTP side of the proxy: one twisted.web Site per `web:` listener, in the proxy's reactor,
serving the portal (`/`) and the admin API (`/api/v1/`) as the listener says.

Every response carries the security headers (a strict Content-Security-Policy without inline
script, no framing, no referrer, no sniffing; HSTS on TLS). Tracebacks never reach a client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from proxy.protocols import TlsMode
from proxy.tls import ServerTLS
from proxy.web.api import api_resource
from proxy.web.app import BoundedRequest, NotFound, WebApp, is_secure
from proxy.web.ops import HealthResource, MetricsResource
from proxy.web.portal import portal_resource
from proxy.web.settings import WebListener

# Sent with every response. The portal's one script and stylesheet are its own files.
SECURITY_HEADERS = {
    b"Content-Security-Policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        b" form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"no-referrer",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Permissions-Policy": b"camera=(), microphone=(), geolocation=()",
}
HSTS = (b"Strict-Transport-Security", b"max-age=31536000")


class SecureSite(Site):
    """A Site that adds the security headers to every response and never shows a traceback."""

    displayTracebacks = False
    requestFactory = BoundedRequest  # bodies past MAX_BODY are dropped, not stored

    def __init__(self, resource: Resource, app: WebApp, tls: bool) -> None:
        super().__init__(resource)
        self.app = app
        self.tls = tls
        # Access logs go to the audit log by the resources themselves, never with secrets.
        self.logFormatter = lambda timestamp, request: ""

    def getResourceFor(self, request: Request) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if self.tls or is_secure(self.app, request):
            request.setHeader(*HSTS)
        return super().getResourceFor(request)

    def log(self, request: http.Request) -> None:
        """No access log line: it would hold query strings and tokens sent by mistake."""


def site_for(app: WebApp, listener: WebListener) -> IProtocolFactory:
    """The listener's Site, inside TLS when it speaks TLS itself."""
    site = build_site(app, listener, portal_resource, api_resource)
    if listener.tls is TlsMode.NONE:
        return site
    tls = ServerTLS(str(listener.cert_file), str(listener.key_file), listener.min_tls)
    return TLSMemoryBIOFactory(tls, False, site)


class Root(Resource):
    """Sends `/api/...` to the API and everything else to the portal, as the listener serves
    them. Both are leaf resources that route on `request.path` themselves."""

    def __init__(
        self,
        portal: Resource | None,
        api: Resource | None,
        metrics: Resource | None = None,
        health: Resource | None = None,
    ) -> None:
        super().__init__()
        self.portal, self.api, self.metrics, self.health = portal, api, metrics, health

    def getChild(self, path: bytes, request: Request) -> Resource:
        if path == b"api":
            return self.api or NotFound()
        if path == b"metrics":
            return self.metrics or NotFound()
        if path in (b"healthz", b"readyz") and self.health is not None:
            return self.health
        return self.portal or NotFound()

    def render(self, request: Request) -> bytes:
        return (self.portal or NotFound()).render(request)


def build_site(
    app: WebApp,
    listener: WebListener,
    portal: Callable[[WebApp], Resource] | None,
    api: Callable[[WebApp], Resource] | None,
) -> SecureSite:
    """The Site for one listener: the API under `/api/` and the portal elsewhere, each only if
    the listener serves it (otherwise 404)."""
    ops = app.ops
    root = Root(
        portal(app) if portal is not None and "portal" in listener.serve else None,
        api(app) if api is not None and "api" in listener.serve else None,
        MetricsResource(ops.metrics) if ops and "metrics" in listener.serve else None,
        HealthResource(ops.ready, ops.clock) if ops and "health" in listener.serve else None,
    )
    return SecureSite(root, app, tls=listener.tls != "none")
