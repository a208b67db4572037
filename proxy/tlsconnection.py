"""TLS connections on the standard library's ssl module, in the shape Twisted drives.

Twisted's TLSMemoryBIOProtocol (listenSSL, TLSMemoryBIOFactory, startTLS) encrypts through a
pyOpenSSL Connection fed by memory BIOs, asking the connection creator (`ServerTLS`) for one per
handshake. `StdlibConnection` answers the few calls it makes (do_handshake, bio_read/bio_write,
recv/send, shutdown, bio_shutdown and the set-up calls) over `ssl.SSLObject` and two
`ssl.MemoryBIO`, raising pyOpenSSL's exceptions where Twisted expects them. Why not pyOpenSSL:

* memory: pyOpenSSL runs on the OpenSSL that cryptography's wheel bundles (4.0 today), whose
  SSL object alone takes 15.9 KiB against 8.3 KiB in the system's OpenSSL 3.0 that the ssl
  module uses; an idle TLS session costs about 7 KiB less (docs/architecture.md, "Memory of
  an idle session");
* updates: the listeners' TLS then follows the distribution's OpenSSL security updates;
* CPU: the ssl module's calls are C, not cffi.

`ClientConnection` is the upstream side: it sends SNI and, once OpenSSL has verified the
chain, checks the certificate's name with the check it is given (proxy/tls.py UpstreamTLS).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

from cryptography import x509
from OpenSSL.crypto import X509
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.python.failure import Failure

# Twisted's TLSMemoryBIOProtocol reads this reason to tell an EOF without close_notify (a client
# that just closed its socket) from a real TLS failure: the former ends the session as a plain
# ConnectionLost.
_EOF_REASON = "unexpected eof while reading"


def _error(e: ssl.SSLError) -> Error:
    """pyOpenSSL's form of an ssl error: a list of (library, function, reason), the reason in
    OpenSSL's own lower-case words ("wrong version number", "no shared cipher")."""
    if isinstance(e, ssl.SSLEOFError):
        return Error([("SSL routines", "", _EOF_REASON)])
    reason = (e.reason or str(e)).replace("_", " ").lower()
    return Error([(e.library or "SSL routines", "", reason)])


class StdlibConnection:
    """One server-side TLS connection: the pyOpenSSL Connection calls TLSMemoryBIOProtocol
    makes, over ssl.SSLObject."""

    __slots__ = ("_incoming", "_outgoing", "_tls")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    def set_accept_state(self) -> None:
        """Already the server's side (Twisted calls this on every server connection)."""

    def set_app_data(self, data: object) -> None:
        """Twisted hands over its protocol, for pyOpenSSL's callbacks; a listener has none, so it
        is not kept (nor the reference cycle it would make)."""

    def do_handshake(self) -> None:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLError as e:
            raise _error(e) from None

    def bio_write(self, data: bytes) -> int:
        """Bytes the client sent, into OpenSSL."""
        return self._incoming.write(data)

    def bio_read(self, size: int) -> bytes:
        """Bytes OpenSSL has for the client; WantReadError when it has none."""
        data = self._outgoing.read(size)
        if not data:
            raise WantReadError()
        return data

    def bio_shutdown(self) -> None:
        """The client's side of the TCP connection ended: no more bytes will come."""
        self._incoming.write_eof()

    def recv(self, size: int) -> bytes:
        try:
            data = self._tls.read(size)
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLZeroReturnError:
            raise ZeroReturnError() from None
        except ssl.SSLError as e:
            raise _error(e) from None
        if not data:  # the ssl module's answer to the client's close_notify
            raise ZeroReturnError()
        return data

    def send(self, data: bytes) -> int:
        try:
            return self._tls.write(data)
        except ssl.SSLWantReadError:
            raise WantReadError() from None
        except ssl.SSLError as e:
            raise _error(e) from None

    def shutdown(self) -> bool:
        """Send close_notify. True once both sides have sent theirs, False while the client's
        is still to come (pyOpenSSL's answers)."""
        try:
            self._tls.unwrap()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as e:
            raise _error(e) from None
        return True

    def get_peer_certificate(self) -> None:
        """Listeners ask for no client certificate."""

    def get_alpn_proto_negotiated(self) -> bytes:
        """Read by twisted.web when HTTP/2 is installed; b"" means none, as in pyOpenSSL."""
        selected = self._tls.selected_alpn_protocol()
        return selected.encode("ascii") if selected else b""

    def get_protocol_version_name(self) -> str:
        """ "TLSv1.3" and the like, for a person debugging a session (transport.getHandle())."""
        return self._tls.version() or "Unknown"

    def get_cipher_name(self) -> str | None:
        cipher = self._tls.cipher()
        return cipher[0] if cipher else None


class ClientConnection(StdlibConnection):
    """One upstream connection: the calls Twisted makes of a client-side pyOpenSSL Connection.
    `check` (None: no verification) gives the problem with the certificate's name, or None;
    it runs once the handshake is done, before a byte of the session is sent."""

    __slots__ = ("_check", "_protocol", "_remember")

    def __init__(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None,
        check: Callable[[x509.Certificate], Exception | None] | None,
        session: ssl.SSLSession | None = None,
        remember: Callable[[ssl.SSLSession], None] | None = None,
    ) -> None:
        """`session`: one to resume (from an earlier connection to the same upstream, made
        with the same context); `remember` is given this connection's once the server sent a
        ticket for it."""
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=False,
            server_hostname=server_hostname,
            session=session,
        )
        self._check = check
        self._protocol: object = None
        self._remember = remember

    def set_connect_state(self) -> None:
        """Already the client's side."""

    def set_app_data(self, data: object) -> None:
        """Twisted's TLS protocol: told of a name that does not match (failVerification), as
        Twisted's own verification does; kept only until the check."""
        if self._check is not None:
            self._protocol = data

    def do_handshake(self) -> None:
        super().do_handshake()
        check, self._check = self._check, None
        protocol, self._protocol = self._protocol, None
        if check is None:
            return
        problem = check_certificate(self._tls.getpeercert(binary_form=True), check)
        if problem is None:
            return
        fail = getattr(protocol, "failVerification", None)
        if fail is not None:
            fail(Failure(problem))  # the reason the connection ends with
        self._remember = None  # never resume a session whose certificate was refused
        raise Error([("SSL routines", "", "certificate name does not match the upstream")])

    def recv(self, size: int) -> bytes:
        data = super().recv(size)
        # TLS 1.3 tickets come after the handshake and are read with the first data.
        if self._remember is not None and self._check is None:
            session = self._tls.session
            if session is not None and session.has_ticket:
                remember, self._remember = self._remember, None
                remember(session)
        return data

    def session_reused(self) -> bool:
        """Whether the handshake resumed an earlier session (for people and tests)."""
        return self._tls.session_reused

    def get_peer_certificate(self) -> X509 | None:  # type: ignore[override]
        der = self._tls.getpeercert(binary_form=True)
        return X509.from_cryptography(x509.load_der_x509_certificate(der)) if der else None


def check_certificate(
    der: bytes | None, check: Callable[[x509.Certificate], Exception | None]
) -> Exception | None:
    """The problem with the peer's certificate, or None. Never raises: a certificate that
    OpenSSL accepted but cryptography cannot read is a refused one, not an unhandled error."""
    if not der:
        return ValueError("the upstream sent no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        return ValueError(f"cannot read the upstream's certificate: {exc}")
    return check(cert)
