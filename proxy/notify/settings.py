"""The `notify:` section of apppass.yaml: who the notices of `apppass notify` are from, the SMTP
relay they go through (without one: the upstream SMTP server, logged in as each account), and
the folder of the site's own templates. Read with the config's error style."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from proxy.codes.sending import address_problem
from proxy.configschema import (
    Invalid,
    Node,
    boolean,
    duration,
    enum_rule,
    integer,
    path,
    secret_file,
    text,
)
from proxy.protocols import TlsMode, UpstreamLogin

# A relay's port when none is written: submission (RFC 6409) for STARTTLS, submissions (RFC 8314)
# for implicit TLS, and 25 in clear text (a relay on the same host or network).
RELAY_PORTS = {TlsMode.STARTTLS: 587, TlsMode.IMPLICIT: 465, TlsMode.NONE: 25}

# The upstream logins a notice can be sent with when there is no relay: as the account, the way
# the proxy logs in for it (proxy/smtp/upstream.py).
UPSTREAM_NOTICE_LOGINS = (UpstreamLogin.XCLIENT, UpstreamLogin.AUTHZID, UpstreamLogin.NONE)


@dataclass(frozen=True)
class NotifyRelay:
    """An SMTP server that takes the notices from apppass (its own account, or none)."""

    host: str
    port: int
    tls: TlsMode = TlsMode.STARTTLS
    ca_file: Path | None = None
    verify: bool = True
    server_name: str | None = None  # the name its certificate must carry (default: host)
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: timedelta = timedelta(seconds=30)


@dataclass(frozen=True)
class NotifySettings:
    sender: str | None = None  # `from:` the notices' From (e.g. "IT <it@example.org>")
    relay: NotifyRelay | None = None  # `smtp:`; None: through upstream.smtp, as each account
    templates: Path | None = None  # the site's templates, each replacing the built-in one

    @property
    def address(self) -> str | None:
        """The bare address of `sender`."""
        return parseaddr(self.sender)[1] if self.sender else None


def _sender(node: Node, key: str, value: Any) -> str:
    value = text(node, key, value)
    _name, address = parseaddr(value)
    if not address or address_problem(address) or "\n" in value or "\r" in value:
        raise Invalid('must be a mail address, or a name and one: "IT <it@example.org>"')
    return value


def _folder(node: Node, key: str, value: Any) -> Path:
    folder = path(node, key, value)
    if not folder.is_dir():
        raise Invalid(f"folder not found: {folder}")
    return folder


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_notify(root: Node, smtp_login: UpstreamLogin | None) -> NotifySettings:
    """The section; `smtp_login` is upstream.smtp's login (None without upstream.smtp)."""
    node = root.node("notify")
    if node is None:
        return NotifySettings()
    out = NotifySettings(
        sender=node.get("from", _sender, None),
        relay=_relay(node),
        templates=node.get("templates", _folder, None),
    )
    if out.sender and out.relay is None:
        if smtp_login is None:
            node.ctx.error(
                node.key_path("smtp"),
                "is required without upstream.smtp: the notices need a way out",
            )
        elif smtp_login not in UPSTREAM_NOTICE_LOGINS:
            node.ctx.error(
                node.key_path("smtp"),
                f"is required when upstream.smtp.login is {smtp_login}: notices are sent "
                "without a relay only by logging in as the account with xclient or authzid",
            )
    node.finish()
    return out


def _relay(notify: Node) -> NotifyRelay | None:
    node = notify.node("smtp")
    if node is None:
        return None
    tls = node.get("tls", enum_rule(TlsMode), TlsMode.STARTTLS)
    login = node.get("login", text, None)
    password = node.get("password_file", secret_file, None)
    host = node.get("host", text)
    if login and not node.has("password_file"):
        node.ctx.error(node.key_path("password_file"), "is required with login")
    if node.has("password_file") and not login:
        node.ctx.error(node.key_path("login"), "is required with password_file")
    if login and tls is TlsMode.NONE and host and not _loopback(host):
        node.ctx.error(
            node.key_path("tls"),
            "none with a login is only allowed to a loopback relay: the password would cross "
            "the network in clear text",
        )
    ca_file = node.get("ca_file", path, None)
    if ca_file is not None and not ca_file.is_file():
        node.ctx.error(node.key_path("ca_file"), f"file not found: {ca_file}")
    relay = NotifyRelay(
        host=host or "",
        port=node.get("port", integer(1, 65535), RELAY_PORTS[tls or TlsMode.STARTTLS]),
        tls=tls or TlsMode.STARTTLS,
        ca_file=ca_file,
        verify=node.get("verify", boolean, True),
        server_name=node.get("server_name", text, None),
        login=login,
        password=password,
        timeout=node.get("timeout", duration(minimum=timedelta(seconds=1)), timedelta(seconds=30)),
    )
    node.finish()
    return relay
