"""apppass.yaml -> typed, immutable settings. Every mistake names the key path and the rule."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from proxy.configschema import (
    ConfigError,
    Context,
    Invalid,
    Node,
    boolean,
    choice,
    default_of,
    duration,
    enum_rule,
    host_port,
    integer,
    list_of,
    networks,
    path,
    read_settings_of,
    secret_file,
    section,
    show,
    text,
    text_list,
)
from proxy.imap.syntax import capability_problem
from proxy.limits import LimitSettings
from proxy.notify.settings import NotifySettings, read_notify
from proxy.oauth2.settings import OAuth2Settings, read_named, upstream_oauth2
from proxy.oplog import LogSettings
from proxy.protocols import BEARER_LOGINS, UPSTREAM_LOGINS, MailProtocol, TlsMode, UpstreamLogin
from proxy.web.settings import WebSettings, read_web

if TYPE_CHECKING:
    from proxy.codes.pgsettings import PostgresSettings
    from proxy.directory.ldap.settings import LdapSettings

DEFAULT_PATH = "/etc/apppass/apppass.yaml"
SCOPES = tuple(p.value for p in MailProtocol)
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Argon2id floor: OWASP's weakest listed setting uses 7 MiB with t=5; we refuse below 8 MiB.
MIN_ARGON2_MEMORY_KIB = 8192


@dataclass(frozen=True)
class Argon2Settings:
    # OWASP Password Storage Cheat Sheet: m=19456 KiB, t=2, p=1 is its first recommended setting.
    time_cost: int = 2
    memory_kib: int = 19456
    parallelism: int = 1
    threads: int = 2  # verifications running at once (the hash pool's size)
    queue: int = 64  # attempts that may wait for the pool before failing fast as temporary


@dataclass(frozen=True)
class CodeSettings:
    alphabet: str = "mixed"
    max_per_account: int = 25  # Apple's limit; Microsoft allows 40
    default_expires: timedelta | None = None  # None: codes never expire unless asked
    default_scopes: tuple[str, ...] = SCOPES
    argon2: Argon2Settings = field(default_factory=Argon2Settings)
    # apppass notify disables a code unused this long (not revoked); None: never, as Microsoft,
    # Google and Apple keep unused app passwords. CIS Controls v8 5.3 disables dormant accounts
    # after 45 days of inactivity.
    disable_after_unused: timedelta | None = None


@dataclass(frozen=True)
class PolicySettings:
    legacy_group: str | None = None  # None: every enabled account may use app passwords
    legacy_filter: str | None = None  # LDAP only
    require_mfa: bool = False
    mfa_group: str | None = None
    mfa_filter: str | None = None
    revoke_on_password_change: bool = True


@dataclass(frozen=True)
class AuthSettings:
    # Dovecot's auth_failure_delay is 2 s; failures are answered after this delay.
    failure_delay: timedelta = timedelta(seconds=2)
    # nginx mail max_errors defaults to 5, Stalwart closes after 3.
    max_failures: int = 3
    # Dovecot login_proxy_timeout 30 s, nginx mail timeout 60 s.
    login_timeout: timedelta = timedelta(seconds=60)
    # Failed attempts per client address per minute before new attempts are refused unseen.
    ip_failures_per_minute: int = 30
    # Verified-credential cache TTL (skips argon2 on repeat logins, never the claim); 0 disables.
    cache_ttl: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class Listener:
    name: str
    protocol: MailProtocol
    host: str
    port: int
    tls: TlsMode = TlsMode.STARTTLS
    cert_file: Path | None = None
    key_file: Path | None = None
    min_tls: str = "1.2"
    plaintext_auth_from: tuple[Network, ...] = ()
    proxy_protocol_from: tuple[Network, ...] = ()  # PROXY protocol headers honoured only from these
    # IMAP: listed before login besides apppass's own, instead of what the upstream offers.
    capabilities: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Upstream:
    protocol: MailProtocol
    host: str
    port: int
    # Verified TLS unless `tls: none` is written (then implicit on IMPLICIT_TLS_PORTS).
    tls: TlsMode = TlsMode.STARTTLS
    ca_file: Path | None = None
    verify: bool = True
    server_name: str | None = None
    connect_timeout: timedelta = timedelta(seconds=10)
    timeout: timedelta = timedelta(seconds=30)
    login: UpstreamLogin = UpstreamLogin.AUTHZID
    master_user: str | None = None
    master_password: str | None = field(default=None, repr=False)
    send_client_address: bool = True
    oauth2: OAuth2Settings | None = None  # login xoauth2/oauthbearer: where tokens come from

    def __repr__(self) -> str:
        return (
            f"Upstream({self.protocol} {self.host}:{self.port} tls={self.tls} login={self.login})"
        )


@dataclass(frozen=True)
class StoreSettings:
    kind: str  # "sqlite" or "postgresql"
    target: Path | None  # the SQLite database file
    postgresql: PostgresSettings | None = None  # proxy/codes/pgsettings.py


@dataclass(frozen=True)
class DirectorySettings:
    kind: str  # "static" or "ldap"
    static_file: Path | None = None
    ldap: LdapSettings | None = None


@dataclass(frozen=True)
class AuditSettings:
    file: str = "-"  # "-" for standard output, else a path


@dataclass(frozen=True)
class ServeSettings:
    # SIGTERM drains: stop accepting, let logins finish and sessions run this long, then end them
    # with the protocol's goodbye. systemd's TimeoutStopSec must be longer (the unit says 45s).
    shutdown_grace: timedelta = timedelta(seconds=30)
    # Worker processes sharing the listening sockets (proxy/workers.py): 1 is one process, as
    # before; "auto" is one per CPU this process may run on.
    workers: int | str = 1


@dataclass(frozen=True)
class Settings:
    source: Path
    hostname: str
    store: StoreSettings
    directory: DirectorySettings
    policy: PolicySettings = field(default_factory=PolicySettings)
    codes: CodeSettings = field(default_factory=CodeSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    listeners: tuple[Listener, ...] = ()
    upstreams: dict[MailProtocol, Upstream] = field(default_factory=dict)
    audit: AuditSettings = field(default_factory=AuditSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    web: WebSettings = field(default_factory=WebSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    log: LogSettings = field(default_factory=LogSettings)
    notify: NotifySettings = field(default_factory=NotifySettings)  # proxy/notify/settings.py


def config_path(explicit: str | None) -> Path:
    """`-c FILE`, else $APPPASS_CONFIG, else /etc/apppass/apppass.yaml."""
    return Path(explicit or os.environ.get("APPPASS_CONFIG") or DEFAULT_PATH)


def load(file: str | Path) -> Settings:
    """Read and validate a config file; raises ConfigError listing every mistake."""
    file = Path(file)
    name = file.name
    try:
        raw_text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}"]
        ) from None
    try:
        data = yaml.safe_load(raw_text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            [f"{name}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]
        ) from None
    return parse(data, source=name, base_dir=file.resolve().parent, file=file)


def parse(
    data: Any, *, source: str = "apppass.yaml", base_dir: Path = Path("."), file: Path | None = None
) -> Settings:
    ctx = Context(source, base_dir)
    if not isinstance(data, dict):
        ctx.error("", f"must be a mapping of settings (got {show(data)})")
        ctx.check()
    root = Node(ctx, "", data)
    hostname = root.get("hostname", _hostname, None) or _default_hostname()
    store = _store(root)
    policy = _policy(root)
    directory = _directory(root, policy)
    codes = _codes(root)
    auth = _auth(root)
    _check_store_timeouts(root, store, auth)
    upstreams = _upstreams(root, read_named(root))
    listeners = _listeners(root, upstreams)
    audit = _audit(root)
    limits = _limits(root)
    web = read_web(root)
    smtp = upstreams.get(MailProtocol.SMTP)
    notify = read_notify(root, smtp.login if smtp else None)
    serve = section(
        root, "serve", ServeSettings, {"shutdown_grace": duration(), "workers": _workers}
    )
    log = section(
        root,
        "log",
        LogSettings,
        {"format": choice("text", "json"), "level": choice("debug", "info", "warning", "error")},
    )
    root.finish()
    ctx.check()
    return Settings(
        source=file or Path(source),
        hostname=hostname,
        store=store,
        directory=directory,
        policy=policy,
        codes=codes,
        auth=auth,
        listeners=listeners,
        upstreams=upstreams,
        audit=audit,
        limits=limits,
        web=web,
        serve=serve,
        log=log,
        notify=notify,
    )


def _default_hostname() -> str:
    name = socket.getfqdn()
    return name if name and _HOSTNAME.fullmatch(name) else "apppass"


_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)


# More worker processes than this is a typo (nginx's worker_processes has no cap; 256 is far
# above the cores of any machine one apppass node runs on).
MAX_WORKERS = 256


def _workers(node: Node, key: str, value: Any) -> int | str:
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise Invalid(f"must be auto or a number of processes from 1 to {MAX_WORKERS}")
    return value


def _hostname(node: Node, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise Invalid("must be a host name like mail.example.com")
    return value


def _store(root: Node) -> StoreSettings:
    node = root.node("store", required=True)
    if node is None:
        return StoreSettings("sqlite", None)
    kind = node.one_of_keys(("sqlite", "postgresql"))
    if kind == "postgresql":
        from proxy.codes.pgsettings import read_postgres

        sub = node.node("postgresql", required=True)
        node.finish()
        if sub is None:
            return StoreSettings("postgresql", None)
        pg = read_postgres(sub)
        sub.finish()
        return StoreSettings("postgresql", None, pg)
    target = node.get(kind, path) if kind else None
    node.finish()
    return StoreSettings(kind or "sqlite", target)


def _check_store_timeouts(root: Node, store: StoreSettings, auth: AuthSettings) -> None:
    if store.postgresql is not None:
        from proxy.codes.pgsettings import timeout_problem

        problem = timeout_problem(store.postgresql, auth.login_timeout)
        if problem:
            root.ctx.error("store.postgresql", problem)


def _directory(root: Node, policy: PolicySettings) -> DirectorySettings:
    node = root.node("directory", required=True)
    if node is None:
        return DirectorySettings("static")
    kind = node.one_of_keys(("static", "ldap"))
    settings = DirectorySettings(kind or "static")
    if kind == "static":
        settings = DirectorySettings("static", static_file=node.get("static", path))
    elif kind == "ldap":
        from proxy.directory.ldap.settings import read_settings

        sub = node.node("ldap", required=True)
        if sub is not None:
            settings = DirectorySettings("ldap", ldap=read_settings(sub))
    if kind != "ldap" and (policy.legacy_filter or policy.mfa_filter):
        root.ctx.error("policy", "legacy_filter and mfa_filter need an ldap directory")
    node.finish()
    return settings


def _ldap_filter(node: Node, key: str, value: Any) -> str:
    from proxy.directory.ldap.filters import filter_problem

    value = text(node, key, value)
    problem = filter_problem(value)
    if problem:
        raise Invalid(problem)
    return value


def _policy(root: Node) -> PolicySettings:
    return section(
        root,
        "policy",
        PolicySettings,
        {
            "legacy_group": text,
            "legacy_filter": _ldap_filter,
            "require_mfa": boolean,
            "mfa_group": text,
            "mfa_filter": _ldap_filter,
            "revoke_on_password_change": boolean,
        },
    )


def _codes(root: Node) -> CodeSettings:
    node = root.node("codes")
    if node is None:
        return CodeSettings()
    argon2 = section(
        node,
        "argon2",
        Argon2Settings,
        {
            "time_cost": integer(1, 100),
            "memory_kib": integer(MIN_ARGON2_MEMORY_KIB, 4 * 1024 * 1024),
            "parallelism": integer(1, 64),
            "threads": integer(1, 256),
            "queue": integer(0, 100000),
        },
    )
    out = read_settings_of(
        node,
        CodeSettings,
        {
            "alphabet": choice("mixed", "lower"),
            "max_per_account": integer(1, 10000),
            "default_expires": duration(allow_never=True, minimum=timedelta(minutes=1)),
            "default_scopes": list_of(SCOPES),
            "disable_after_unused": duration(allow_never=True, minimum=timedelta(days=1)),
        },
        argon2=argon2,
    )
    node.finish()
    return out


def _auth(root: Node) -> AuthSettings:
    return section(
        root,
        "auth",
        AuthSettings,
        {
            "failure_delay": duration(),
            "max_failures": integer(1, 100),
            "login_timeout": duration(minimum=timedelta(seconds=1)),
            "ip_failures_per_minute": integer(1, 1000000),
            "cache_ttl": duration(),
        },
    )


def _audit_file(node: Node, key: str, value: Any) -> str:
    value = text(node, key, value)
    return value if value in ("-", "syslog") else str(path(node, key, value))


def _audit(root: Node) -> AuditSettings:
    return section(root, "audit", AuditSettings, {"file": _audit_file})


def _limits(root: Node) -> LimitSettings:
    return section(
        root,
        "limits",
        LimitSettings,
        {
            "max_connections": integer(1, 1_000_000),
            "max_preauth_per_address": integer(1, 1_000_000),
            "max_sessions_per_account": integer(1, 1_000_000),
        },
    )


def _tls_version(node: Node, key: str, value: Any) -> str:
    value = str(value)
    if value not in TLS_VERSIONS:
        raise Invalid(f"must be one of {', '.join(TLS_VERSIONS)}")
    return value


# The IANA ports for each protocol and TLS mode (RFC 8314 §7 for 465/993/995; RFC 6409 for 587).
DEFAULT_PORTS = {
    (MailProtocol.IMAP, TlsMode.NONE): 143,
    (MailProtocol.IMAP, TlsMode.STARTTLS): 143,
    (MailProtocol.IMAP, TlsMode.IMPLICIT): 993,
    (MailProtocol.POP3, TlsMode.NONE): 110,
    (MailProtocol.POP3, TlsMode.STARTTLS): 110,
    (MailProtocol.POP3, TlsMode.IMPLICIT): 995,
    (MailProtocol.SMTP, TlsMode.NONE): 25,
    (MailProtocol.SMTP, TlsMode.STARTTLS): 587,
    (MailProtocol.SMTP, TlsMode.IMPLICIT): 465,
}


def _listeners(root: Node, upstreams: dict[MailProtocol, Upstream]) -> tuple[Listener, ...]:
    out = []
    names = set()
    for node in root.nodes("listeners"):
        protocol = node.get("protocol", enum_rule(MailProtocol))
        bind = node.get("bind", host_port)
        tls = node.get("tls", enum_rule(TlsMode), default_of(Listener, "tls"))
        cert = node.get("cert_file", path, None)
        key = node.get("key_file", path, None)
        if tls is not TlsMode.NONE:
            for k, p in (("cert_file", cert), ("key_file", key)):
                if p is None and not node.has(k):
                    node.ctx.error(node.key_path(k), f"is required when tls is {tls}")
                elif p is not None and not p.is_file():
                    node.ctx.error(node.key_path(k), f"file not found: {p}")
        plaintext_from = node.get("plaintext_auth_from", networks, ())
        if tls is TlsMode.NONE and not plaintext_from and node.has("tls"):
            node.ctx.error(
                node.key_path("plaintext_auth_from"),
                "is required when tls is none (without it nobody can log in on this listener)",
            )
        name = node.get("name", text, None) or (
            f"{protocol}-{bind[1]}" if protocol and bind else node.path
        )
        if name in names:
            node.ctx.error(node.key_path("name"), f"must be unique ({show(name)} is used twice)")
        names.add(name)
        if protocol and protocol not in upstreams:
            node.ctx.error(node.key_path("protocol"), f"needs upstream.{protocol} to be configured")
        # IMAP: listed before login besides apppass's own, instead of the upstream's list.
        capabilities = node.get("capabilities", lambda n, k, v: v, None)
        if capabilities is not None:
            where = node.key_path("capabilities")
            if protocol is not MailProtocol.IMAP:
                node.ctx.error(where, "is for IMAP listeners only")
            if not isinstance(capabilities, list):
                node.ctx.error(where, f"must be a list of names (got {show(capabilities)})")
                capabilities = []
            for i, item in enumerate(capabilities):
                if problem := capability_problem(item):
                    node.ctx.error(f"{where}[{i}]", f"{problem} (got {show(item)})")
            capabilities = tuple(map(str, capabilities))
        listener = Listener(
            name=name,
            protocol=protocol or MailProtocol.IMAP,
            host=bind[0] if bind else "",
            port=bind[1] if bind else 0,
            tls=tls or TlsMode.NONE,
            cert_file=cert,
            key_file=key,
            min_tls=node.get("min_tls", _tls_version, default_of(Listener, "min_tls")),
            plaintext_auth_from=plaintext_from,
            proxy_protocol_from=node.get("proxy_protocol_from", networks, ()),
            capabilities=capabilities,
        )
        node.finish()
        out.append(listener)
    binds = [(item.host, item.port) for item in out]
    for i, b in enumerate(binds):
        if b in binds[:i]:
            root.ctx.error(
                f"listeners[{i}].bind", f"is used by another listener ({show(f'{b[0]}:{b[1]}')})"
            )
    return tuple(out)


# An upstream port where TLS starts with the first byte (RFC 8314 §7: 465, 993, 995): with no
# `tls` written, such a port means implicit TLS, any other STARTTLS.
IMPLICIT_TLS_PORTS = frozenset(
    port for (_, mode), port in DEFAULT_PORTS.items() if mode is TlsMode.IMPLICIT
)


def _upstreams(
    root: Node, oauth2: dict[str, OAuth2Settings | None]
) -> dict[MailProtocol, Upstream]:
    node = root.node("upstream")
    if node is None:
        return {}
    out = {}
    for protocol in MailProtocol:
        sub = node.node(protocol.value)
        if sub is None:
            continue
        logins = UPSTREAM_LOGINS[protocol]
        port = sub.get("port", integer(1, 65535), None)
        tls = sub.get("tls", enum_rule(TlsMode), None)
        if tls is None:  # not written (or wrong): never clear text by default
            tls = TlsMode.IMPLICIT if port in IMPLICIT_TLS_PORTS else default_of(Upstream, "tls")
        login = sub.get("login", enum_rule(UpstreamLogin, logins), logins[0])
        if login is UpstreamLogin.AUTHZID:
            for k in ("master_user", "master_password_file"):
                if not sub.has(k):
                    sub.ctx.error(sub.key_path(k), "is required when login is authzid")
        ca_file = sub.get("ca_file", path, None)
        if ca_file is not None and not ca_file.is_file():
            sub.ctx.error(sub.key_path("ca_file"), f"file not found: {ca_file}")
        out[protocol] = read_settings_of(
            sub,
            Upstream,
            {
                "host": text,
                "verify": boolean,
                "server_name": text,
                "connect_timeout": duration(minimum=timedelta(seconds=1)),
                "timeout": duration(minimum=timedelta(seconds=1)),
                "master_user": text,
                "send_client_address": boolean,
            },
            protocol=protocol,
            tls=tls,
            login=login,
            ca_file=ca_file,
            port=port or DEFAULT_PORTS[(protocol, tls)],
            master_password=sub.get("master_password_file", secret_file, None),
            oauth2=upstream_oauth2(sub, login in BEARER_LOGINS, oauth2),
        )
        sub.finish()
    node.finish()
    return out


__all__ = ["ConfigError", "Settings", "config_path", "load", "parse", "text_list"]
