"""TLS contexts: per-listener server contexts with certificate reload; verified upstream clients.

Server side, one `ServerTLS` per listener::

    tls = ServerTLS("/etc/apppass/mail.pem", "/etc/apppass/mail.key", min_tls="1.2")
    reactor.listenSSL(993, imap_factory, tls)       # implicit TLS
    transport.startTLS(tls)                         # STARTTLS, from a frontend
    tls.reload()                                    # after certbot renewed the files (SIGHUP)

`ServerTLS` is an IOpenSSLServerConnectionCreator: Twisted asks it for a new connection on every
handshake, and each one is made from the context current at that moment, so `reload()` takes
effect for new connections while established ones keep the certificate they started with. Both
sides' contexts and connections are the standard library's ssl module (the system's OpenSSL),
shaped for Twisted by proxy/tlsconnection.py (pyOpenSSL remains only for Twisted's own types).

Upstream side::

    creator = upstream_tls("imap.internal.example", ca_file="/etc/apppass/internal-ca.pem")
    upstream_transport.startTLS(creator)            # or connectSSL(host, port, f, creator)

Verification is on by default: the chain against `ca_file` (or the system trust store when
None) by OpenSSL, and the name against `hostname` (DNS name, or IP address SAN when it is an
address) by `UpstreamTLS.name_problem` with service_identity, once the handshake is done and
before any byte of the session is sent. `verify=False` turns both off, explicitly. The name
check is ours, not OpenSSL's or Twisted's: Twisted's treats a malformed name in the certificate
(an IP address as a DNS name, a bad wildcard) or a certificate without names as an error in its
callback, logs a traceback for every connection and then accepts the certificate without
checking its name. Here a malformed name is skipped, with one warning per upstream (a Twisted
log event at level warn, which `apppass serve` prints), and the other names decide; a
certificate left without a name that matches is refused.

Every problem with a configured file raises TLSConfigError naming the file and the problem in a
sentence a person can act on; callers turn it into a config error, never a traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import warnings
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    CertificatePattern,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    verify_service_identity,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from proxy.tlsconnection import ClientConnection, StdlibConnection

log = Logger()

DEFAULT_MIN_TLS = "1.2"

_PROTOCOL_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}
MIN_TLS_CHOICES = tuple(_PROTOCOL_VERSIONS)

# TLS 1.2 suites for listeners at min_tls 1.2/1.3: Mozilla's "intermediate" configuration
# (ssl-config.mozilla.org, guideline 5.7): forward-secret AEAD suites only. (The DHE suites need
# DH parameters, which the ssl module loads only from a file; ECDHE covers the same clients.)
CIPHERS_INTERMEDIATE = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Suites for listeners that accept TLS 1.0/1.1 (min_tls "1.0"/"1.1"): Mozilla's "old"
# configuration (guideline 5.7) without DES-CBC3-SHA (Sweet32, CVE-2016-2183): the CBC-SHA suites
# that TLS 1.0 clients (Outlook 2007-2013 on Windows 7, old phones) offer. "@SECLEVEL=0": see
# `LEGACY_SECURITY_LEVEL`.
CIPHERS_OLD = (
    CIPHERS_INTERMEDIATE + ":"
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:"
    "ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:AES128-GCM-SHA256:AES256-GCM-SHA384:"
    "AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA"
)

LEGACY_SECURITY_LEVEL = "@SECLEVEL=0"
"""Appended to the cipher string only when min_tls is "1.0" or "1.1". Why:

OpenSSL 3.0 lowered the security strength it assigns to SHA-1 and MD5 based signatures below 80
bits (CHANGES for 3.0: "This results in SSL 3, TLS 1.0, TLS 1.1 and DTLS 1.0 no longer working
at the default security level of 1 and instead requires security level 0"; later 3.0.x releases
ban those protocol versions outright at level 1 and above, and 3.2 raised the default level to
2). TLS 1.0 and 1.1 have no signature-algorithm negotiation: the server signs its key exchange
with the fixed MD5+SHA-1 combination (RSA) or SHA-1 (ECDSA), and the handshake PRF is MD5/SHA-1.
So at level >= 1 OpenSSL refuses every TLS 1.0/1.1 handshake (as "unsupported protocol", or an
internal error), whatever min/max protocol version is set. Level 0 is the only way to let such
clients in. It also lifts level 1's other floors (RSA keys under 1024 bits, SHA-1 signed
certificates), which is why it is set only on listeners that ask for legacy TLS, while the
explicit cipher list above still keeps out export, NULL, RC4, DES and 3DES suites.
"""


class TLSConfigError(Exception):
    """A TLS file or setting cannot be used. `subject` is the file (or setting), `problem` a
    sentence saying what is wrong with it."""

    def __init__(self, subject: str, problem: str) -> None:
        super().__init__(f"{subject}: {problem}")
        self.subject = subject
        self.problem = problem


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(path, f"cannot read {what}: {e.strerror or e}") from None


def load_certificates(path: str, what: str = "certificate") -> list[x509.Certificate]:
    """All PEM certificates in a file, in order; TLSConfigError if none or unreadable."""
    data = _read(path, f"{what} file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TLSConfigError(
            path, f"no PEM {what} in the file (expected -----BEGIN CERTIFICATE-----)"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise TLSConfigError(path, f"damaged PEM {what}: {e}") from None


def load_private_key(path: str):
    data = _read(path, "private key file")
    if b"PRIVATE KEY-----" not in data:
        raise TLSConfigError(
            path, "no PEM private key in the file (expected -----BEGIN ... PRIVATE KEY-----)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSConfigError(
            path,
            "the private key is encrypted; apppass needs it unencrypted (readable only by its"
            " user)",
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise TLSConfigError(path, f"cannot load the private key: {e}") from None
    return key


def _spki(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def build_server_context(
    cert_file: str, key_file: str, min_tls: str = DEFAULT_MIN_TLS
) -> ssl.SSLContext:
    """A listener's TLS context from its PEM files; TLSConfigError says what is wrong with them.

    cert_file holds the server certificate first, then any intermediates (the chain the clients
    need, as certbot's fullchain.pem). key_file holds its unencrypted private key (it may be the
    same file).
    """
    return _server_context(cert_file, key_file, min_tls)[0]


def _server_context(
    cert_file: str, key_file: str, min_tls: str
) -> tuple[ssl.SSLContext, x509.Certificate]:
    if min_tls not in _PROTOCOL_VERSIONS:
        raise TLSConfigError("min_tls", f"{min_tls!r} is not one of {', '.join(MIN_TLS_CHOICES)}")
    # Read and matched here first: cryptography's errors name the problem in words a person can
    # act on, where OpenSSL's loader says "PEM lib".
    chain = load_certificates(cert_file)
    key = load_private_key(key_file)
    leaf = chain[0]
    mine = _spki(key.public_key())
    if _spki(leaf.public_key()) != mine:
        matches = [i for i, c in enumerate(chain, 1) if _spki(c.public_key()) == mine]
        hint = (
            f"; it matches certificate #{matches[0]} there: the server's own certificate must"
            " come first, then the intermediates"
            if matches
            else ""
        )
        raise TLSConfigError(
            key_file, f"the private key does not match the certificate in {cert_file}{hint}"
        )

    # The standard library's ssl module (the system's OpenSSL), not pyOpenSSL: see
    # proxy/tlsconnection.py. It already sets OP_NO_COMPRESSION (CRIME) and
    # SSL_MODE_RELEASE_BUFFERS (an idle session frees OpenSSL's 2 x ~17 KiB record buffers).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = _PROTOCOL_VERSIONS[min_tls]
    legacy = version < ssl.TLSVersion.TLSv1_2
    with warnings.catch_warnings():  # the ssl module deprecates naming TLS 1.0/1.1 at all
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
    ctx.options |= (
        ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation: a DoS lever
    )
    # At min_tls >= 1.2 the library's default security level stays (1 up to OpenSSL 3.1, 2 from
    # 3.2): only legacy listeners drop it, see LEGACY_SECURITY_LEVEL.
    ciphers = CIPHERS_OLD + ":" + LEGACY_SECURITY_LEVEL if legacy else CIPHERS_INTERMEDIATE
    try:
        # Before the certificate: the security level applies to its key and signature.
        ctx.set_ciphers(ciphers)
    except ssl.SSLError as e:
        raise TLSConfigError(
            "min_tls", f"this OpenSSL accepts none of the ciphers: {_ssl_reason(e)}"
        ) from None
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as e:
        raise TLSConfigError(
            cert_file, f"OpenSSL refused the certificate or its key: {_ssl_reason(e)}"
        ) from None
    except OSError as e:  # replaced or made unreadable since read above
        raise TLSConfigError(cert_file, f"cannot read it: {e.strerror or e}") from None
    return ctx, leaf


def _ssl_reason(e: ssl.SSLError) -> str:
    return (e.reason or str(e)).replace("_", " ").lower()


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """A listener's TLS settings; hand it to listenSSL, startTLS or TLSMemoryBIOFactory."""

    def __init__(self, cert_file: str, key_file: str, min_tls: str = DEFAULT_MIN_TLS) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.min_tls = min_tls
        self._context, self._leaf = _server_context(cert_file, key_file, min_tls)

    def reload(self) -> None:
        """Re-read the certificate and key. New connections use them; live ones are untouched.
        On error the previous certificate stays in use and TLSConfigError is raised."""
        self._context, self._leaf = _server_context(self.cert_file, self.key_file, self.min_tls)

    @property
    def certificate(self) -> x509.Certificate:
        """The server certificate currently served."""
        return self._leaf

    @property
    def expires_at(self) -> datetime.datetime:
        return self._leaf.not_valid_after_utc

    def serverConnectionForTLS(self, tlsProtocol) -> Any:
        # Any: the interface names pyOpenSSL's Connection, whose calls StdlibConnection answers.
        return StdlibConnection(self._context)


# --- upstream (client) side -------------------------------------------------------------------

_CLIENT_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _client_version(min_tls: str) -> ssl.TLSVersion:
    if min_tls not in _CLIENT_VERSIONS:
        raise TLSConfigError(
            "min_tls",
            f"{min_tls!r} for an upstream: only 1.2 or 1.3 (the upstream is ours to upgrade)",
        )
    return _CLIENT_VERSIONS[min_tls]


# Certificate warnings already given, so that each is said once per upstream and not once per
# connection. A handful in practice (one per upstream name and problem); the bound only keeps a
# certificate that changes its malformed names on every handshake from growing the set forever.
_WARNED: set[tuple[str, str]] = set()
MAX_WARNED = 1024


def _warn_once(hostname: str, problem: str) -> None:
    if (hostname, problem) in _WARNED:
        return
    if len(_WARNED) >= MAX_WARNED:
        _WARNED.clear()
    _WARNED.add((hostname, problem))
    log.warn("upstream {host}: {problem}", host=hostname, problem=problem)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip())
    except ValueError:
        return False
    return True


def _name_patterns(cert: x509.Certificate) -> tuple[list[CertificatePattern], list[str]]:
    """The certificate's DNS and IP address names as service_identity patterns, and the DNS
    names it had to skip as malformed (service_identity refuses the whole certificate for one)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    patterns: list[CertificatePattern] = []
    malformed = []
    for name in names.get_values_for_type(x509.DNSName):
        try:
            patterns.append(DNSPattern.from_bytes(name.encode("utf-8")))
        except CertificateError:
            malformed.append(name)
    for ip in names.get_values_for_type(x509.IPAddress):
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):  # not a network
            patterns.append(IPAddressPattern(ip))
    return patterns, malformed


@implementer(IOpenSSLClientConnectionCreator)
class UpstreamTLS:
    """One upstream's TLS client side: a context (trust store, versions, ALPN) made once, and a
    connection per handshake (`ClientConnection`, the ssl module's) that sends SNI and, when
    verifying, checks the certificate's name itself once OpenSSL has checked the chain. Its
    connections resume the latest session the upstream gave a ticket for."""

    def __init__(self, hostname: str, context: ssl.SSLContext, verify: bool) -> None:
        self._hostname = hostname
        self._context = context
        self._verify = verify
        # The latest session the upstream gave a ticket for: the next connection resumes it
        # (no certificate chain sent or verified again; its name is still checked), which
        # takes 0.2 instead of 0.5 ms of CPU here, and less in the upstream.
        self._session: ssl.SSLSession | None = None
        is_ip = isIPAddress(hostname) or isIPv6Address(hostname)
        self._sni = None if is_ip else hostname
        if is_ip:
            self._identity: DNS_ID | IPAddress_ID = IPAddress_ID(hostname)
        else:
            self._identity = DNS_ID(hostname.encode("idna").decode("ascii"))

    def clientConnectionForTLS(self, tlsProtocol) -> Any:
        # Any: the interface names pyOpenSSL's Connection, whose calls ClientConnection answers.
        check = self.name_problem if self._verify else None
        return ClientConnection(self._context, self._sni, check, self._session, self._resumable)

    def _resumable(self, session: ssl.SSLSession) -> None:
        self._session = session

    def name_problem(self, cert: x509.Certificate) -> Exception | None:
        """None when the certificate is valid for the upstream's name, else the reason. Never
        raises: a certificate it cannot read is not a verified one."""
        try:
            patterns, malformed = _name_patterns(cert)
            for name in malformed:
                hint = " (an IP address belongs in an IP address SAN)" if _is_ip(name) else ""
                _warn_once(
                    self._hostname,
                    f"its certificate names {json.dumps(name)} as a DNS name, which it cannot"
                    f" be{hint}; that name is ignored",
                )
            if patterns:
                verify_service_identity(patterns, [self._identity], [])
                return None
        except VerificationError as exc:
            return exc
        except Exception as exc:
            _warn_once(self._hostname, f"cannot read the names of its certificate: {exc}")
        # No name to match at all: a mismatch like any other.
        return VerificationError(
            errors=[self._identity.error_on_mismatch(mismatched_id=self._identity)]
        )


def upstream_tls(
    hostname: str,
    *,
    ca_file: str | None = None,
    verify: bool = True,
    min_tls: str = DEFAULT_MIN_TLS,
    alpn: Sequence[bytes] | None = None,
) -> UpstreamTLS:
    """A TLS client connection creator for one upstream server.

    hostname: the name (or IP address) the upstream's certificate must carry; also sent as SNI
        when it is a DNS name.
    ca_file: PEM file of the CA certificates to trust; None trusts the system store.
    verify: False disables certificate and name checks (the connection is still encrypted).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _client_version(min_tls)
    context.check_hostname = False  # the name is checked by UpstreamTLS.name_problem
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    elif ca_file is not None:
        load_certificates(ca_file, "CA certificate")  # its problems, in words a person can use
        try:
            context.load_verify_locations(cafile=ca_file)
        except (ssl.SSLError, OSError) as e:
            raise TLSConfigError(ca_file, f"cannot use the CA certificates: {e}") from None
    else:
        context.set_default_verify_paths()
    if alpn:
        context.set_alpn_protocols([p.decode("ascii") for p in alpn])
    return UpstreamTLS(hostname, context, verify)
