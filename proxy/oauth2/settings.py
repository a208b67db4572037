"""OAuth2 settings: where the proxy gets its upstream tokens, every rule and default in one place.

Written under an upstream (`upstream.imap.oauth2: {...}`) or once under a name at the top level
(`oauth2: {m365: {...}}`) and referenced by it (`upstream.imap.oauth2: m365`), so that the
protocols of one mail service share one token cache. Two grants:

- `client_credentials` (RFC 6749 §4.4): the organisation's application, one token for every
  mailbox (Microsoft Entra ID), authenticated by a client secret or by a JWT signed with the
  private key of a certificate registered with the application (RFC 7523 §2.2, "private_key_jwt").
- `service_account` (RFC 7523 §2.1): a Google service-account key with domain-wide delegation,
  one signed JWT per user (`sub` = the user) for one token per user.

Keys and secrets are read and checked here, once: a wrong file names its key in check-config,
and no secret or key material appears in a repr or an error.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.configschema import (
    Invalid,
    Node,
    duration,
    enum_rule,
    existing_file,
    integer,
    path,
    secret_file,
    show,
    text,
)

# A token request that has not answered in this time has failed (and is tried again, up to
# `retries`). Entra ID and Google answer in well under a second; a mail client waits 30-60 s for
# a whole login (Outlook 30 s), and our own auth.login_timeout defaults to 60 s.
DEFAULT_TIMEOUT = timedelta(seconds=10)
# Tries after the first for a token endpoint that is down, slow or busy (429, 5xx). Microsoft's
# and Google's client libraries retry a few times with backoff (MSAL: once; google-auth: 3).
DEFAULT_RETRIES = 2
MAX_RETRIES = 5

# Google's token endpoint, also written as `token_uri` in every service-account key file.
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"

# A name under the top-level `oauth2:` (no dot: a name with none tells it from a key path).
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class Grant(enum.StrEnum):
    """How the proxy obtains a token (RFC 6749 §4.4, RFC 7523 §2.1)."""

    CLIENT_CREDENTIALS = "client_credentials"
    SERVICE_ACCOUNT = "service_account"


# The keys each grant reads; a key of the other grant is a mistake named as such.
_GRANT_KEYS = {
    Grant.CLIENT_CREDENTIALS: (
        "token_url",
        "client_id",
        "client_secret_file",
        "private_key_file",
        "certificate_file",
    ),
    Grant.SERVICE_ACCOUNT: ("token_url", "key_file"),
}


@dataclass(frozen=True)
class OAuth2Settings:
    name: str  # the top-level name, or the key path of a mapping written under an upstream
    grant: Grant
    token_url: str
    scope: str  # space-separated (RFC 6749 §3.3)
    # client_credentials: the application (client) id; service_account: the key's client_email
    # (the JWT's issuer).
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    # PEM of the RSA key that signs the JWT: the certificate's key (client_credentials without
    # a secret) or the service account's.
    private_key: bytes | None = field(default=None, repr=False)
    # JWT header: the service-account key's id (kid), or the certificate's SHA-1 and SHA-256
    # thumbprints (x5t, x5t#S256, base64url), by which Entra ID finds the certificate.
    key_id: str = ""
    x5t: str = ""
    x5t_s256: str = ""
    ca_file: Path | None = None  # CA that verifies the token endpoint (default: system store)
    timeout: timedelta = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __repr__(self) -> str:
        return f"OAuth2Settings({self.name}: {self.grant} at {self.token_url})"

    @property
    def key_path(self) -> str:
        """Where the settings are written, for log lines: `oauth2.m365`, `upstream.imap.oauth2`."""
        return self.name if "." in self.name else f"oauth2.{self.name}"


# --- rules ---------------------------------------------------------------------------------------


def token_url(node: Node, key: str, value: Any) -> str:
    """An https:// URL (http:// is allowed and warned about by proxy/exposure.py), without
    credentials in it (the URL appears in log lines)."""
    wording = (
        "must be an https:// URL like https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
    )
    if not isinstance(value, str):
        raise Invalid(wording)
    try:
        parts = urlsplit(value.strip())
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError:
        raise Invalid(wording) from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise Invalid(wording)
    if parts.username is not None or parts.password is not None:
        raise Invalid("must not hold credentials: use client_secret_file")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value.strip()):
        raise Invalid(wording)
    return value.strip()


def scope(node: Node, key: str, value: Any) -> str:
    """One scope, or a list of them (sent space-separated, RFC 6749 §3.3)."""
    items = value if isinstance(value, list) else [value]
    wording = "must be a scope like https://outlook.office365.com/.default, or a list of them"
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise Invalid(wording)
    words = [w for i in items for w in i.split()]
    # RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    if any(c in '"\\' or not 0x21 <= ord(c) <= 0x7E for w in words for c in w):
        raise Invalid(wording)
    return " ".join(words)


def _read_bytes(node: Node, key: str, value: Any) -> tuple[Path, bytes]:
    p = path(node, key, value)
    try:
        return p, p.read_bytes()
    except FileNotFoundError:
        raise Invalid(f"file not found: {p}") from None
    except OSError as exc:
        raise Invalid(f"cannot read {p}: {exc.strerror}") from None


def _rsa_key(pem: bytes, where: Path) -> rsa.RSAPrivateKey:
    """The RSA private key in a PEM text; Invalid naming the file, never showing the key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise Invalid(
            f"is not a PEM private key without a passphrase: {where}"
            " (openssl pkey -in KEY -out KEY.pem writes one)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise Invalid(f"must be an RSA key (tokens are asked for with RS256): {where}")
    return key


def private_key(node: Node, key: str, value: Any) -> bytes:
    where, pem = _read_bytes(node, key, value)
    _rsa_key(pem, where)
    return pem


def certificate(node: Node, key: str, value: Any) -> x509.Certificate:
    where, pem = _read_bytes(node, key, value)
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise Invalid(f"is not a PEM certificate: {where}") from None


@dataclass(frozen=True)
class ServiceAccountKey:
    """What the proxy uses of a Google service-account key file."""

    client_email: str
    private_key: bytes = field(repr=False)
    key_id: str
    token_uri: str


def service_account_key(node: Node, key: str, value: Any) -> ServiceAccountKey:
    """A Google service-account key (the JSON file the console downloads)."""
    where, raw = _read_bytes(node, key, value)
    wording = (
        f"must be a Google service-account key (JSON with type service_account, client_email"
        f" and private_key): {where}"
    )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise Invalid(wording) from None
    if not isinstance(data, dict) or data.get("type") != "service_account":
        raise Invalid(wording)
    email, pem = data.get("client_email"), data.get("private_key")
    if not isinstance(email, str) or "@" not in email or not isinstance(pem, str):
        raise Invalid(wording)
    _rsa_key(pem.encode(), where)
    uri = data.get("token_uri")
    return ServiceAccountKey(
        client_email=email,
        private_key=pem.encode(),
        key_id=str(data.get("private_key_id") or ""),
        token_uri=uri if isinstance(uri, str) and uri.startswith("https://") else GOOGLE_TOKEN_URL,
    )


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# --- reading -------------------------------------------------------------------------------------


def read_oauth2(node: Node, name: str) -> OAuth2Settings | None:
    """One mapping of OAuth2 settings; None (with every mistake reported) when it has any."""
    before = len(node.ctx.problems)
    grant = node.get("grant", enum_rule(Grant))
    common = {
        "scope": node.get("scope", scope),
        "ca_file": node.get("ca_file", existing_file, None),
        "timeout": node.get("timeout", duration(minimum=timedelta(seconds=1)), DEFAULT_TIMEOUT),
        "retries": node.get("retries", integer(0, MAX_RETRIES), DEFAULT_RETRIES),
    }
    settings = None
    if grant is not None:
        own = _GRANT_KEYS[grant]
        for other, keys in _GRANT_KEYS.items():
            for key in keys:
                if key not in own and node.has(key):
                    node.get(key, lambda n, k, v: v)
                    node.ctx.error(node.key_path(key), f"is used only when grant is {other}")
        if grant is Grant.CLIENT_CREDENTIALS:
            settings = _client_credentials(node, name, common)
        else:
            settings = _service_account(node, name, common)
    node.finish()
    return settings if len(node.ctx.problems) == before else None


def _client_credentials(node: Node, name: str, common: dict) -> OAuth2Settings | None:
    url = node.get("token_url", token_url)
    client_id = node.get("client_id", text)
    has_secret, has_key = node.has("client_secret_file"), node.has("private_key_file")
    secret = node.get("client_secret_file", secret_file, None)
    pem = node.get("private_key_file", private_key, None)
    cert = node.get("certificate_file", certificate, None)
    if has_secret and has_key:
        node.ctx.error(
            node.key_path("private_key_file"),
            "is not used with client_secret_file: set one of them",
        )
    elif not has_secret and not has_key:
        node.ctx.error(
            node.key_path("client_secret_file"),
            "is required when grant is client_credentials, unless private_key_file and"
            " certificate_file are set",
        )
    elif has_key and not node.has("certificate_file"):
        node.ctx.error(
            node.key_path("certificate_file"),
            "is required with private_key_file (its thumbprint names the key to the endpoint)",
        )
    if has_secret and node.has("certificate_file") and not has_key:
        node.ctx.error(node.key_path("certificate_file"), "is used only with private_key_file")
    x5t = x5t_s256 = ""
    if pem is not None and cert is not None:
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        key = serialization.load_pem_private_key(pem, password=None)
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            node.ctx.error(
                node.key_path("certificate_file"),
                "is not the certificate of private_key_file"
                f" (got {show(node.data['certificate_file'])})",
            )
        der = cert.public_bytes(serialization.Encoding.DER)
        x5t = _b64url(hashlib.sha1(der).digest())
        x5t_s256 = _b64url(hashlib.sha256(der).digest())
    if url is None or client_id is None:
        return None
    return OAuth2Settings(
        name=name,
        grant=Grant.CLIENT_CREDENTIALS,
        token_url=url,
        client_id=client_id,
        client_secret=secret,
        private_key=pem if not has_secret else None,
        x5t=x5t,
        x5t_s256=x5t_s256,
        **common,
    )


def _service_account(node: Node, name: str, common: dict) -> OAuth2Settings | None:
    account = node.get("key_file", service_account_key)
    url = node.get("token_url", token_url, None)
    if account is None:
        return None
    return OAuth2Settings(
        name=name,
        grant=Grant.SERVICE_ACCOUNT,
        token_url=url or account.token_uri,
        client_id=account.client_email,
        private_key=account.private_key,
        key_id=account.key_id,
        **common,
    )


def read_named(root: Node) -> dict[str, OAuth2Settings | None]:
    """The top-level `oauth2:` mapping: settings by name (None for one with mistakes)."""
    node = root.node("oauth2")
    if node is None:
        return {}
    out: dict[str, OAuth2Settings | None] = {}
    for name in list(node.data):
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            node.get(name, lambda n, k, v: v)
            node.ctx.error(
                node.key_path(str(name)),
                "must be a name of letters, digits, '-' or '_' (it is referenced as"
                " upstream.PROTOCOL.oauth2: NAME)",
            )
            continue
        sub = node.node(name)
        out[name] = read_oauth2(sub, name) if sub is not None else None
    node.finish()
    return out


def upstream_oauth2(
    sub: Node, uses_token: bool, named: dict[str, OAuth2Settings | None]
) -> OAuth2Settings | None:
    """An upstream's `oauth2`: a mapping, or the name of one under the top-level `oauth2`."""
    where = sub.key_path("oauth2")
    value = sub.get("oauth2", lambda n, k, v: v, None)
    if value is None:
        if uses_token:
            sub.ctx.error(
                where,
                "is required when login is xoauth2 or oauthbearer (a mapping of OAuth2 settings,"
                " or the name of one under the top-level oauth2)",
            )
        return None
    if not uses_token:
        sub.ctx.error(where, "is used only when login is xoauth2 or oauthbearer")
        return None
    if isinstance(value, str):
        if value not in named:
            known = ", ".join(sorted(named)) or "none"
            sub.ctx.error(
                where,
                f"names no settings under the top-level oauth2 (defined: {known})"
                f" (got {show(value)})",
            )
            return None
        return named[value]
    if isinstance(value, dict):
        inner = sub.node("oauth2")
        return read_oauth2(inner, where) if inner is not None else None
    sub.ctx.error(
        where,
        f"must be a mapping of OAuth2 settings or the name of one under the top-level oauth2"
        f" (got {show(value)})",
    )
    return None
