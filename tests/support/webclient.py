"""A small HTTP client for the portal, as a browser without JavaScript uses it: cookies, forms
(hidden fields read from the page), redirects followed on request. Synchronous: run it in a
thread while the proxy's reactor serves (threads.deferToThread), or against a process."""

from __future__ import annotations

import http.client
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlencode, urlsplit


@dataclass
class Page:
    status: int
    headers: http.client.HTTPMessage
    text: str
    path: str

    def header(self, name: str) -> str:
        return self.headers.get(name, "")

    def cookies(self) -> list[str]:
        return self.headers.get_all("Set-Cookie") or []

    def hidden(self, name: str, form_action: str | None = None) -> str:
        """The value of a hidden input (in the form posting to `form_action`, if given)."""
        found = _Inputs(form_action)
        found.feed(self.text)
        if name not in found.values:
            raise AssertionError(f"no hidden field {name!r} on {self.path}")
        return found.values[name]

    def element_text(self, element_id: str) -> str:
        finder = _TextOf(element_id)
        finder.feed(self.text)
        if finder.text is None:
            raise AssertionError(f"no element #{element_id} on {self.path}")
        return finder.text.strip()


class _Inputs(HTMLParser):
    def __init__(self, action: str | None) -> None:
        super().__init__()
        self.action = action
        self.inside = action is None
        self.values: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form" and self.action is not None:
            self.inside = a.get("action") == self.action
        elif tag == "input" and self.inside and a.get("type") == "hidden" and a.get("name"):
            self.values.setdefault(a["name"], a.get("value") or "")

    def handle_endtag(self, tag):
        if tag == "form" and self.action is not None:
            self.inside = False


class _TextOf(HTMLParser):
    def __init__(self, element_id: str) -> None:
        super().__init__()
        self.element_id = element_id
        self.depth = 0
        self.text: str | None = None

    def handle_starttag(self, tag, attrs):
        if self.depth:
            self.depth += 1
        elif dict(attrs).get("id") == self.element_id:
            self.depth, self.text = 1, ""

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and self.text is not None:
            self.text += data


@dataclass
class WebClient:
    host: str
    port: int
    source: str | None = None  # the local address to connect from (127.0.0.N)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request
    cookies: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, body: bytes | None = None, **headers: str) -> Page:
        conn = http.client.HTTPConnection(
            self.host,
            self.port,
            timeout=30,
            source_address=(self.source, 0) if self.source else None,
        )
        sent = {**self.headers, **{k.replace("_", "-"): v for k, v in headers.items()}}
        if self.cookies:
            sent["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        page = Page(response.status, response.headers, text, path)
        for cookie in page.cookies():
            pair, _, attributes = cookie.partition(";")
            name, _, value = pair.strip().partition("=")
            if "max-age=0" in attributes.lower().replace(" ", ""):
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value
        return page

    def get(self, path: str, follow: bool = True) -> Page:
        page = self.request("GET", path)
        return self._follow(page) if follow else page

    def post(self, path: str, fields: dict | list, follow: bool = True) -> Page:
        body = urlencode(fields, doseq=True).encode()
        page = self.request("POST", path, body, Content_Type="application/x-www-form-urlencoded")
        return self._follow(page) if follow else page

    def _follow(self, page: Page, hops: int = 5) -> Page:
        while page.status in (301, 302, 303) and hops:
            location = urlsplit(page.header("Location"))
            page = self.request(
                "GET", location.path + (f"?{location.query}" if location.query else "")
            )
            hops -= 1
        return page

    # -- the portal's forms ----------------------------------------------------------------------

    def sign_in(self, login: str, password: str, follow: bool = True) -> Page:
        form = self.get("/signin")
        token = form.hidden("csrf", "/signin")
        return self.post("/signin", {"csrf": token, "login": login, "password": password}, follow)

    def csrf(self, page: Page) -> str:
        return page.hidden("csrf")
