"""The `web:` section of apppass.yaml: HTTP listeners for the portal and the API, and how people
sign in. Read with the config's error style (proxy/configschema.py)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from proxy.configschema import (
    Invalid,
    Node,
    default_of,
    duration,
    enum_rule,
    host_port,
    list_of,
    networks,
    path,
    show,
    text,
)
from proxy.protocols import TlsMode

# What a web listener can serve (metrics and health: for operators, usually on loopback).
SERVES = ("portal", "api", "metrics", "health")
DEFAULT_SERVES = ("portal", "api")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class WebListener:
    name: str
    host: str
    port: int
    tls: TlsMode = TlsMode.IMPLICIT  # implicit (HTTPS) or none (behind a TLS proxy, or loopback)
    cert_file: Path | None = None
    key_file: Path | None = None
    min_tls: str = "1.2"
    serve: tuple[str, ...] = DEFAULT_SERVES


@dataclass(frozen=True)
class WebSettings:
    listeners: tuple[WebListener, ...] = ()
    # The address people type (links in setup hints and the portal's own URL), e.g.
    # "https://apppass.example.org"; default: https://<hostname>.
    public_url: str | None = None
    # What devices are told to connect to for mail (IMAP, POP3, SMTP); default: hostname.
    mail_host: str | None = None
    # Members of this directory group may manage any account's codes in the portal.
    admin_group: str | None = None
    # Single sign-on: a reverse proxy that authenticates people (and enforces their second
    # factor) names them in this header; honoured only from trusted_proxies.
    trusted_header: str | None = None
    # Reverse proxies whose X-Forwarded-For / X-Forwarded-Proto (and trusted_header) count.
    trusted_proxies: tuple[Network, ...] = ()
    # A portal session ends after this long without a request, and after session_max in all.
    session_idle: timedelta = timedelta(minutes=30)
    session_max: timedelta = timedelta(hours=12)
    # Creating a code needs a sign-in this recent (Microsoft, Google and Apple ask again too).
    recent_signin: timedelta = timedelta(minutes=10)


def _url(node: Node, key: str, value: Any) -> str:
    value = text(node, key, value).rstrip("/")
    if not value.startswith(("https://", "http://")) or " " in value:
        raise Invalid("must be a URL like https://apppass.example.org")
    return value


def _header(node: Node, key: str, value: Any) -> str:
    value = text(node, key, value)
    if not all(c.isalnum() or c == "-" for c in value):
        raise Invalid("must be an HTTP header name like Remote-User")
    return value


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_web(root: Node) -> WebSettings:
    node = root.node("web")
    if node is None:
        return WebSettings()
    d = WebSettings()
    trusted = node.get("trusted_proxies", networks, ())
    out = WebSettings(
        listeners=_listeners(node, bool(trusted)),
        public_url=node.get("public_url", _url, None),
        mail_host=node.get("mail_host", text, None),
        admin_group=node.get("admin_group", text, None),
        trusted_header=node.get("trusted_header", _header, None),
        trusted_proxies=trusted,
        session_idle=node.get(
            "session_idle", duration(minimum=timedelta(minutes=1)), d.session_idle
        ),
        session_max=node.get("session_max", duration(minimum=timedelta(minutes=5)), d.session_max),
        recent_signin=node.get(
            "recent_signin", duration(minimum=timedelta(minutes=1)), d.recent_signin
        ),
    )
    if out.trusted_header and not trusted:
        node.ctx.error(
            node.key_path("trusted_proxies"),
            "is required with trusted_header (only those proxies may name a signed-in person)",
        )
    node.finish()
    return out


def _listeners(web: Node, behind_proxy: bool) -> tuple[WebListener, ...]:
    out = []
    for node in web.nodes("listeners"):
        bind = node.get("bind", host_port)
        tls = node.get(
            "tls",
            enum_rule(TlsMode, (TlsMode.IMPLICIT, TlsMode.NONE)),
            default_of(WebListener, "tls"),
        )
        cert = node.get("cert_file", path, None)
        key = node.get("key_file", path, None)
        if tls is TlsMode.IMPLICIT:
            for k, p in (("cert_file", cert), ("key_file", key)):
                if p is None and not node.has(k):
                    node.ctx.error(node.key_path(k), "is required when tls is implicit")
                elif p is not None and not p.is_file():
                    node.ctx.error(node.key_path(k), f"file not found: {p}")
        elif bind and not behind_proxy and not _loopback(bind[0]):
            node.ctx.error(
                node.key_path("tls"),
                f"none is only allowed on a loopback address or behind web.trusted_proxies "
                f"(got bind {show(f'{bind[0]}:{bind[1]}')}): passwords would cross the network",
            )
        serve = node.get("serve", list_of(SERVES), DEFAULT_SERVES)
        listener = WebListener(
            name=node.get("name", text, None) or (f"web-{bind[1]}" if bind else node.path),
            host=bind[0] if bind else "",
            port=bind[1] if bind else 0,
            tls=tls or TlsMode.IMPLICIT,
            cert_file=cert,
            key_file=key,
            min_tls=node.get("min_tls", text, "1.2"),
            serve=serve or DEFAULT_SERVES,
        )
        node.finish()
        out.append(listener)
    return tuple(out)
