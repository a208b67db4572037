"""A client for the admin API in tests: real HTTP (http.client) in a thread, so the proxy keeps
running on the test's reactor; every response is held to the OpenAPI document before a test
sees it (tests/support/openapi.py)."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import threads

from tests.support.openapi import Checked, OpenApi


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes = field(repr=False)  # may hold a code shown once: never in a failure

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str | None:
        return self.json.get("error") if self.status >= 400 else None


def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes | Iterable[bytes] | None = None,
    chunked: bool = False,
    timeout: float = 10.0,
) -> Response:
    """One request on a new connection (blocking: run it in a thread)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        answer = conn.getresponse()
        data = answer.read()
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    finally:
        conn.close()


@dataclass
class Api:
    """The API on one port, with a default token; `checked` lists every response validated."""

    port: int
    openapi: OpenApi = field(repr=False)
    token: str | None = field(default=None, repr=False)  # a secret: never in a failure
    checked: list[Checked] = field(default_factory=list, repr=False)

    async def call(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        token: str | None = None,
        anonymous: bool = False,
        headers: dict[str, str] | None = None,
        body: bytes | Iterable[bytes] | None = None,
        chunked: bool = False,
    ) -> Response:
        """Send a request (JSON body or raw body), check the response against the document."""
        __tracebackhide__ = True  # pytest: do not print the arguments (a token)
        sent = dict(headers or {})
        bearer = token or self.token
        if bearer and not anonymous and "Authorization" not in sent:
            sent["Authorization"] = f"Bearer {bearer}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            sent.setdefault("Content-Type", "application/json")
        response = await threads.deferToThread(
            request, self.port, method, path, headers=sent, body=body, chunked=chunked
        )
        self.checked.append(
            self.openapi.check(method, path, response.status, response.headers, response.body)
        )
        return response

    async def get(self, path: str, **kw: Any) -> Response:
        __tracebackhide__ = True
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json_body: Any = None, **kw: Any) -> Response:
        __tracebackhide__ = True
        return await self.call("POST", path, json_body, **kw)
