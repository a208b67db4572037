"""The admin API (placeholder until the endpoints land)."""

from __future__ import annotations

from twisted.web.resource import Resource

from proxy.web.app import NotFound, WebApp


def api_resource(app: WebApp) -> Resource:
    return NotFound()
