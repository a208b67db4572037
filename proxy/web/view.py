"""How the portal answers: a `Reply` (status, headers, cookies, body), pages rendered from the
jinja2 templates in proxy/web/templates (autoescaped), the static files in proxy/web/static,
and the request's context (`Ctx`) the page handlers get.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any

import jinja2
from twisted.web.server import Request

from proxy.directory.account import Account
from proxy.web.records import WebSession

# Every page is personal or shows a secret once: no cache may keep it (RFC 9111 §5.2.2.5), and
# "back" must ask the server again rather than show a code from memory.
NO_STORE = "no-store"
# Static files carry a content hash in their URL, so a browser may keep them a day.
STATIC_CACHE = "public, max-age=86400"

STATIC_FILES = ("style.css", "copy.js", "icon.svg")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    cookies: list[str] = field(default_factory=list)
    cache: str = NO_STORE


def redirect(location: str, cookies: list[str] | None = None) -> Reply:
    """303 See Other: after a POST the browser GETs the next page, so reloading it re-sends
    nothing."""
    return Reply(303, b"", headers={"Location": location}, cookies=cookies or [])


@dataclass
class Ctx:
    """One request as the page handlers see it."""

    request: Request
    method: str  # GET (HEAD too) or POST
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    ip: str
    secure: bool
    session: WebSession | None = None
    account: Account | None = None  # the signed-in account, read afresh for this request
    cookies: list[str] = field(default_factory=list)  # set with whatever the reply is

    def arg(self, name: str) -> str:
        values = self.query.get(name) or [""]
        return values[0]

    def field(self, name: str) -> str:
        values = self.form.get(name) or [""]
        return values[0]


def when(moment: datetime | None) -> str:
    return "\u2014" if moment is None else moment.strftime("%Y-%m-%d %H:%M UTC")


def iso(moment: datetime | None) -> str:
    return "" if moment is None else moment.isoformat()


def sentence(text: object) -> str:
    """First letter up, the rest as it is (jinja's capitalize would lower "CN=Staff")."""
    text = str(text)
    return text[:1].upper() + text[1:]


class Views:
    """The templates and static files, loaded once."""

    def __init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("proxy.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = when
        self.env.filters["iso"] = iso
        self.env.filters["sentence"] = sentence
        self.static: dict[str, tuple[bytes, str]] = {}
        urls = {}
        folder = resources.files("proxy.web") / "static"
        for name in STATIC_FILES:
            data = (folder / name).read_bytes()
            kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
            if kind.startswith("text/") or kind.endswith("javascript"):
                kind += "; charset=utf-8"
            self.static[name] = (data, kind)
            urls[name] = f"/static/{name}?v={hashlib.sha256(data).hexdigest()[:12]}"
        self.env.globals["static"] = urls

    def page(self, ctx: Ctx, template: str, status: int = 200, **values: Any) -> Reply:
        session = ctx.session
        values.setdefault("title", "")
        values.setdefault("signed_in", session is not None)  # False: the second factor is due
        body = self.env.get_template(template).render(
            csrf=session.csrf if session else "",
            me=session.login if session else "",
            admin=bool(session and session.admin),
            path=ctx.path,
            **values,
        )
        return Reply(status, body.encode("utf-8"), cookies=list(ctx.cookies))

    def static_file(self, name: str) -> Reply | None:
        found = self.static.get(name)
        if found is None:
            return None
        return Reply(200, found[0], content_type=found[1], cache=STATIC_CACHE)
