"""Settings that send a credential in clear text (or to an unverified server) to another
machine: the warnings to give.

Clear text stays possible (an upstream on a network the operator trusts, a sandbox), but only
when written out, and then `apppass check-config` and the start of `apppass serve` (audit event
`config_warning`) say what would cross the network unprotected. Loopback stays silent: nothing
leaves the machine.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from proxy.codes.pgsettings import VERIFIED_SSL_MODE
from proxy.config import Settings
from proxy.protocols import BEARER_LOGINS, TlsMode, UpstreamLogin

_USE_TLS = "use tls: starttls or implicit"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (also as [::1] or ::ffff:127.x.x.x) and localhost; no name lookup."""
    name = host.strip().lower().removesuffix(".")
    if name == "localhost":
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def clear_text_warnings(settings: Settings) -> list[str]:
    """One sentence per credential that would travel in clear text to a non-loopback host,
    naming the key to change. Never a secret: only where it goes."""
    warnings = []
    for protocol, up in settings.upstreams.items():
        if is_loopback(up.host):
            continue
        if up.tls is not TlsMode.NONE:
            if not up.verify and up.login is not UpstreamLogin.NONE:
                warnings.append(
                    f"upstream.{protocol}: verify is false, so any server that answers at"
                    f" {up.host}:{up.port} gets the proxy's logins; set verify: true (and"
                    " ca_file for a private CA)"
                )
            continue
        where = f"{up.host}:{up.port}"
        if up.login is UpstreamLogin.AUTHZID:
            what = f"the master password goes to {where}"
        elif up.login is UpstreamLogin.XCLIENT:
            what = (
                f"XCLIENT logins (which the upstream trusts from apppass's address) go to {where}"
            )
        elif up.login in BEARER_LOGINS:
            what = f"OAuth2 tokens (an application's open every mailbox) go to {where}"
        else:  # no login: the upstream trusts apppass's address, no credential is sent
            continue
        warnings.append(f"upstream.{protocol}: tls is none, so {what} in clear text; {_USE_TLS}")
    warnings += _token_endpoint_warnings(settings)
    warnings += _notify_relay_warnings(settings)
    ldap = settings.directory.ldap
    if ldap is not None and ldap.bind_dn and not ldap.start_tls:
        for i, uri in enumerate(ldap.uris):
            parts = urlsplit(uri)
            if parts.scheme.lower() == "ldap" and not is_loopback(parts.hostname or ""):
                warnings.append(
                    f"directory.ldap.uris[{i}]: {uri} without start_tls, so the bind password"
                    " goes in clear text; set start_tls: true or use ldaps://"
                )
    pg = settings.store.postgresql
    if pg is not None and pg.sslmode != VERIFIED_SSL_MODE:
        remote = [h for h in pg.hosts if h and not h.startswith("/") and not is_loopback(h)]
        if remote:
            how = (
                "may go in clear text"
                if pg.sslmode in ("disable", "allow", "prefer")
                else "goes to a server whose name is not checked"
            )
            warnings.append(
                f"store.postgresql.dsn: sslmode={pg.sslmode} to {', '.join(remote)}, so the"
                f" database password (and every code's hash) {how}; set sslmode=verify-full"
                " (with sslrootcert=FILE for a private CA)"
            )
    return warnings


def _token_endpoint_warnings(settings: Settings) -> list[str]:
    """A token endpoint over http:// gets the client secret (or a signed grant) and hands out
    tokens in clear text; said once per `oauth2` settings."""
    warnings, seen = [], set()
    for up in settings.upstreams.values():
        oauth2 = up.oauth2
        if oauth2 is None or oauth2.name in seen:
            continue
        seen.add(oauth2.name)
        parts = urlsplit(oauth2.token_url)
        if parts.scheme == "http" and not is_loopback(parts.hostname or ""):
            warnings.append(
                f"{oauth2.key_path}.token_url: http://, so the client's credentials and"
                f" the tokens cross the network to {parts.hostname} in clear text; use https://"
            )
    return warnings


def _notify_relay_warnings(settings: Settings) -> list[str]:
    """`apppass notify`'s relay: its password to an unverified server, or the notices (names,
    devices, addresses, dates) in clear text. A login in clear text is a config error."""
    relay = settings.notify.relay
    if relay is None or is_loopback(relay.host):
        return []
    where = f"{relay.host}:{relay.port}"
    if relay.tls is TlsMode.NONE:
        return [
            f"notify.smtp: tls is none, so the notices (people's names and addresses, device"
            f" names, dates) go to {where} in clear text; {_USE_TLS}"
        ]
    if not relay.verify and relay.login:
        return [
            f"notify.smtp: verify is false, so any server that answers at {where} gets the"
            " relay password; set verify: true (and ca_file for a private CA)"
        ]
    return []
