"""The self-service portal (placeholder until the pages land)."""

from __future__ import annotations

from twisted.web.resource import Resource

from proxy.web.app import NotFound, WebApp


def portal_resource(app: WebApp) -> Resource:
    return NotFound()
