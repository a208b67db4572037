"""apppass.yaml -> typed, immutable settings. Every mistake names the key path and the rule."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from proxy.configschema import (
    ConfigError,
    Context,
    Invalid,
    Node,
    boolean,
    choice,
    duration,
    host_port,
    integer,
    list_of,
    networks,
    path,
    secret_file,
    show,
    text,
    text_list,
)

DEFAULT_PATH = "/etc/apppass/apppass.yaml"
SCOPES = ("imap", "pop3", "smtp")
PROTOCOLS = SCOPES
TLS_MODES = ("starttls", "implicit", "none")
TLS_VERSIONS = ("1.0", "1.1", "1.2", "1.3")

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
    protocol: str
    host: str
    port: int
    tls: str = "none"
    cert_file: Path | None = None
    key_file: Path | None = None
    min_tls: str = "1.2"
    plaintext_auth_from: tuple = ()
    proxy_protocol_from: tuple = ()  # PROXY protocol headers are honoured only from these


@dataclass(frozen=True)
class Upstream:
    protocol: str
    host: str
    port: int
    tls: str = "none"
    ca_file: Path | None = None
    verify: bool = True
    server_name: str | None = None
    connect_timeout: timedelta = timedelta(seconds=10)
    timeout: timedelta = timedelta(seconds=30)
    login: str = "authzid"
    master_user: str | None = None
    master_password: str | None = field(default=None, repr=False)
    send_client_address: bool = True

    def __repr__(self) -> str:
        return f"Upstream({self.protocol} {self.host}:{self.port} tls={self.tls} login={self.login})"


@dataclass(frozen=True)
class StoreSettings:
    kind: str  # "sqlite" (later "postgres")
    target: Any  # a Path for sqlite, a DSN for postgres


@dataclass(frozen=True)
class DirectorySettings:
    kind: str  # "static" or "ldap"
    static_file: Path | None = None
    ldap: Any = None  # proxy.directory.ldap.LdapSettings


@dataclass(frozen=True)
class AuditSettings:
    file: str = "-"  # "-" for standard output, else a path


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
    upstreams: dict = field(default_factory=dict)  # protocol -> Upstream
    audit: AuditSettings = field(default_factory=AuditSettings)


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
        raise ConfigError([f"{file}: cannot read: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        data = yaml.safe_load(raw_text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{name}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"]) from None
    return parse(data, source=name, base_dir=file.resolve().parent, file=file)


def parse(data: Any, *, source: str = "apppass.yaml", base_dir: Path = Path("."),
          file: Path | None = None) -> Settings:
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
    upstreams = _upstreams(root)
    listeners = _listeners(root, upstreams)
    audit = _audit(root)
    root.finish()
    ctx.check()
    return Settings(source=file or Path(source), hostname=hostname, store=store, directory=directory, policy=policy,
                    codes=codes, auth=auth, listeners=listeners, upstreams=upstreams, audit=audit)


def _default_hostname() -> str:
    name = socket.getfqdn()
    return name if name and _HOSTNAME.fullmatch(name) else "apppass"


_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def _hostname(node: Node, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise Invalid("must be a host name like mail.example.com")
    return value


def _store(root: Node) -> StoreSettings:
    node = root.node("store", required=True)
    if node is None:
        return StoreSettings("sqlite", None)
    kind = node.one_of_keys(("sqlite",))
    target = node.get(kind, path) if kind else None
    node.finish()
    return StoreSettings(kind or "sqlite", target)


def _directory(root: Node, policy: PolicySettings) -> DirectorySettings:
    node = root.node("directory", required=True)
    if node is None:
        return DirectorySettings("static")
    kind = node.one_of_keys(("static", "ldap"))
    settings = DirectorySettings(kind or "static")
    if kind == "static":
        settings = DirectorySettings("static", static_file=node.get("static", path))
    elif kind == "ldap":
        from proxy.directory.ldapconfig import ldap_settings

        sub = node.node("ldap", required=True)
        if sub is not None:
            settings = DirectorySettings("ldap", ldap=ldap_settings(sub))
            sub.finish()
    if kind != "ldap" and (policy.legacy_filter or policy.mfa_filter):
        root.ctx.error("policy", "legacy_filter and mfa_filter need an ldap directory")
    node.finish()
    return settings


def _policy(root: Node) -> PolicySettings:
    node = root.node("policy")
    if node is None:
        return PolicySettings()
    out = PolicySettings(
        legacy_group=node.get("legacy_group", text, None),
        legacy_filter=node.get("legacy_filter", text, None),
        require_mfa=node.get("require_mfa", boolean, False),
        mfa_group=node.get("mfa_group", text, None),
        mfa_filter=node.get("mfa_filter", text, None),
        revoke_on_password_change=node.get("revoke_on_password_change", boolean, True),
    )
    node.finish()
    return out


def _codes(root: Node) -> CodeSettings:
    node = root.node("codes")
    if node is None:
        return CodeSettings()
    a = node.node("argon2")
    argon2 = Argon2Settings()
    if a is not None:
        d = Argon2Settings()
        argon2 = Argon2Settings(
            time_cost=a.get("time_cost", integer(1, 100), d.time_cost),
            memory_kib=a.get("memory_kib", integer(MIN_ARGON2_MEMORY_KIB, 4 * 1024 * 1024), d.memory_kib),
            parallelism=a.get("parallelism", integer(1, 64), d.parallelism),
            threads=a.get("threads", integer(1, 256), d.threads),
            queue=a.get("queue", integer(0, 100000), d.queue),
        )
        a.finish()
    d = CodeSettings()
    out = CodeSettings(
        alphabet=node.get("alphabet", choice("mixed", "lower"), d.alphabet),
        max_per_account=node.get("max_per_account", integer(1, 10000), d.max_per_account),
        default_expires=node.get("default_expires", duration(allow_never=True, minimum=timedelta(minutes=1)),
                                 d.default_expires),
        default_scopes=node.get("default_scopes", list_of(SCOPES), d.default_scopes),
        argon2=argon2,
    )
    node.finish()
    return out


def _auth(root: Node) -> AuthSettings:
    node = root.node("auth")
    if node is None:
        return AuthSettings()
    d = AuthSettings()
    out = AuthSettings(
        failure_delay=node.get("failure_delay", duration(), d.failure_delay),
        max_failures=node.get("max_failures", integer(1, 100), d.max_failures),
        login_timeout=node.get("login_timeout", duration(minimum=timedelta(seconds=1)), d.login_timeout),
        ip_failures_per_minute=node.get("ip_failures_per_minute", integer(1, 1000000), d.ip_failures_per_minute),
        cache_ttl=node.get("cache_ttl", duration(), d.cache_ttl),
    )
    node.finish()
    return out


def _audit(root: Node) -> AuditSettings:
    node = root.node("audit")
    if node is None:
        return AuditSettings()
    out = AuditSettings(file=node.get("file", text, "-"))
    if out.file != "-":
        out = AuditSettings(file=str(path(node, "file", out.file)))
    node.finish()
    return out


def _tls_version(node: Node, key: str, value: Any) -> str:
    value = str(value)
    if value not in TLS_VERSIONS:
        raise Invalid(f"must be one of {', '.join(TLS_VERSIONS)}")
    return value


_DEFAULT_PORTS = {("imap", "none"): 143, ("imap", "starttls"): 143, ("imap", "implicit"): 993,
                  ("pop3", "none"): 110, ("pop3", "starttls"): 110, ("pop3", "implicit"): 995,
                  ("smtp", "none"): 25, ("smtp", "starttls"): 587, ("smtp", "implicit"): 465}


def _listeners(root: Node, upstreams: dict) -> tuple[Listener, ...]:
    out = []
    names = set()
    for node in root.nodes("listeners"):
        protocol = node.get("protocol", choice(*PROTOCOLS))
        bind = node.get("bind", host_port)
        tls = node.get("tls", choice(*TLS_MODES), "starttls")
        cert = node.get("cert_file", path, None)
        key = node.get("key_file", path, None)
        if tls != "none":
            for k, p in (("cert_file", cert), ("key_file", key)):
                if p is None and not node.has(k):
                    node.ctx.error(node.key_path(k), f"is required when tls is {tls}")
                elif p is not None and not p.is_file():
                    node.ctx.error(node.key_path(k), f"file not found: {p}")
        plaintext_from = node.get("plaintext_auth_from", networks, ())
        if tls == "none" and not plaintext_from and node.has("tls"):
            node.ctx.error(node.key_path("plaintext_auth_from"),
                           "is required when tls is none (without it nobody can log in on this listener)")
        name = node.get("name", text, None) or (f"{protocol}-{bind[1]}" if protocol and bind else node.path)
        if name in names:
            node.ctx.error(node.key_path("name"), f"must be unique ({show(name)} is used twice)")
        names.add(name)
        if protocol and protocol not in upstreams:
            node.ctx.error(node.key_path("protocol"), f"needs upstream.{protocol} to be configured")
        listener = Listener(
            name=name, protocol=protocol or "", host=bind[0] if bind else "", port=bind[1] if bind else 0,
            tls=tls or "none", cert_file=cert, key_file=key,
            min_tls=node.get("min_tls", _tls_version, "1.2"),
            plaintext_auth_from=plaintext_from,
            proxy_protocol_from=node.get("proxy_protocol_from", networks, ()),
        )
        node.finish()
        out.append(listener)
    binds = [(item.host, item.port) for item in out]
    for i, b in enumerate(binds):
        if b in binds[:i]:
            root.ctx.error(f"listeners[{i}].bind", f"is used by another listener ({show(f'{b[0]}:{b[1]}')})")
    return tuple(out)


_UPSTREAM_LOGINS = {"imap": ("authzid",), "pop3": ("authzid",), "smtp": ("xclient", "authzid", "none")}


def _upstreams(root: Node) -> dict:
    node = root.node("upstream")
    if node is None:
        return {}
    out = {}
    for protocol in PROTOCOLS:
        sub = node.node(protocol)
        if sub is None:
            continue
        tls = sub.get("tls", choice(*TLS_MODES), "none")
        login = sub.get("login", choice(*_UPSTREAM_LOGINS[protocol]), _UPSTREAM_LOGINS[protocol][0])
        master_user = sub.get("master_user", text, None)
        master_password = sub.get("master_password_file", secret_file, None)
        if login == "authzid":
            for k, v in (("master_user", master_user), ("master_password_file", master_password)):
                if v is None and not sub.has(k):
                    sub.ctx.error(sub.key_path(k), "is required when login is authzid")
        host = sub.get("host", text)
        port = sub.get("port", integer(1, 65535), _DEFAULT_PORTS.get((protocol, tls or "none"), 0))
        ca_file = sub.get("ca_file", path, None)
        if ca_file is not None and not ca_file.is_file():
            sub.ctx.error(sub.key_path("ca_file"), f"file not found: {ca_file}")
        out[protocol] = Upstream(
            protocol=protocol, host=host or "", port=port or 0, tls=tls or "none", ca_file=ca_file,
            verify=sub.get("verify", boolean, True),
            server_name=sub.get("server_name", text, None),
            connect_timeout=sub.get("connect_timeout", duration(minimum=timedelta(seconds=1)), timedelta(seconds=10)),
            timeout=sub.get("timeout", duration(minimum=timedelta(seconds=1)), timedelta(seconds=30)),
            login=login or "authzid", master_user=master_user, master_password=master_password,
            send_client_address=sub.get("send_client_address", boolean, True),
        )
        sub.finish()
    node.finish()
    return out


__all__ = ["ConfigError", "Settings", "load", "parse", "config_path", "text_list"]
