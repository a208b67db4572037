"""The Twisted side of a client connection, the same for IMAP, POP3 and SMTP.

It moves bytes between the socket and the protocol's sans-IO core, carries out the core's
events (replies, STARTTLS, authentication, close), keeps the clocks the core has none of (time
to log in, failure delay), logs in upstream after a Grant and then hands both connections to the
relay. What differs per protocol is a small `ProtocolKind` (proxy/imap/frontend.py, …).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from proxy.addresses import in_networks
from proxy.auth.decision import Attempt, Protocol as MailProtocol, Refusal
from proxy.events import Authenticate, Close, Failed, Send, StartTLS
from proxy.relay import Relay, Spliceable
from proxy.upstream import UpstreamError, connect

if TYPE_CHECKING:
    from proxy.config import Listener
    from proxy.service import Service


class ProtocolKind(TypingProtocol):
    """What the generic frontend needs to know about one mail protocol."""

    protocol: MailProtocol

    def make_core(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool, service): ...

    async def login_upstream(self, conn, session: "Frontend", grant) -> list:
        """Log in upstream for this Grant; return the core's success events."""

    def relay_hooks(self, session: "Frontend"):
        """(client hook, upstream hook) for the relay after login; (None, None) for none."""


@implementer(IHalfCloseableProtocol)
class Frontend(Spliceable, Protocol):

    def __init__(self, service: "Service", listener: "Listener", kind: ProtocolKind, server_tls) -> None:
        self.service = service
        self.listener = listener
        self.kind = kind
        self.server_tls = server_tls
        self.session_id = secrets.token_hex(6)
        self.grant = None
        self.upstream = None
        self._relay: Relay | None = None
        self._timer = None
        self._closed = False
        self._started = time.monotonic()

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", "") or ""
        self.client_port = getattr(peer, "port", 0) or 0
        self.tls_active = self.listener.tls == "implicit"
        self.core = self.kind.make_core(
            tls_active=self.tls_active,
            starttls_available=self.listener.tls == "starttls",
            plaintext_auth=in_networks(self.client_ip, self.listener.plaintext_auth_from),
            service=self.service,
        )
        self.service.sessions.add(self)
        reactor = self.service.reactor
        self._timer = reactor.callLater(self.service.settings.auth.login_timeout.total_seconds(), self._login_timeout)
        self._emit(self.core.greeting())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self.relay is not None:
            self.relay.dataReceived(data)
            return
        if not self._closed:
            self._emit(self.core.receive_data(data))

    def connectionLost(self, reason) -> None:  # noqa: N802
        self._closed = True
        self._cancel_timer()
        self.service.sessions.discard(self)
        if self.relay is not None:
            self.relay.connectionLost(reason)
        elif self.upstream is not None:
            self.upstream.close()

    # -- carrying out the core's events ----------------------------------------------------------

    def _emit(self, events) -> None:
        for event in events:
            if self._closed:
                return
            if isinstance(event, Send):
                self.transport.write(event.data)
            elif isinstance(event, StartTLS):
                self.transport.startTLS(self.server_tls)
                self.tls_active = True
                self.core.tls_started()
            elif isinstance(event, Authenticate):
                defer.ensureDeferred(self._authenticate(event)).addErrback(self._bug)
            elif isinstance(event, Close):
                self._closed = True
                self._cancel_timer()
                self.transport.loseConnection()
            elif isinstance(event, Failed):
                pass  # the core already replied and counts toward its own limits

    def _bug(self, failure) -> None:
        self.service.audit.event("error", where="frontend", session=self.session_id,
                                 type=failure.type.__name__, error=failure.getErrorMessage())
        if not self._closed:
            self._closed = True
            self.transport.abortConnection()

    def _login_timeout(self) -> None:
        self._timer = None
        if self.relay is None and not self._closed:
            self._emit(self.core.login_timeout())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- authentication and upstream login -------------------------------------------------------

    async def _authenticate(self, event: Authenticate) -> None:
        creds = event.credentials
        attempt = Attempt(self.kind.protocol, creds.login, creds.secret, self.client_ip, self.client_port,
                          tls=self.tls_active, listener=self.listener.name, session=self.session_id)
        decision = await self.service.authenticator.authenticate(attempt)
        if self._closed:
            return
        if not decision.ok:
            await self._fail(decision.refusal)
            return
        try:
            self.upstream = await connect(self.service.upstream_for(self.kind.protocol), self.service.reactor)
            if self._closed:
                self.upstream.close()
                return
            success = await self.kind.login_upstream(self.upstream, self, decision)
        except UpstreamError as exc:
            self.service.audit.event("upstream", result="fail", protocol=self.kind.protocol.value,
                                     session=self.session_id, login=creds.login, client=self.client_ip,
                                     reason=str(exc))
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None
            if not self._closed:
                await self._fail(Refusal.TEMPORARY)
            return
        if self._closed:
            self.upstream.close()
            return
        self.grant = decision
        self._cancel_timer()
        self._emit(success)
        self._splice()

    async def _fail(self, refusal: Refusal) -> None:
        """Failures are answered after auth.failure_delay, as Dovecot does."""
        delay = self.service.settings.auth.failure_delay.total_seconds()
        if delay > 0:
            d = defer.Deferred()
            self.service.reactor.callLater(delay, d.callback, None)
            await d
        if not self._closed:
            self._emit(self.core.auth_failed(refusal))

    def _splice(self) -> None:
        upstream = self.upstream
        client_hook, upstream_hook = self.kind.relay_hooks(self)
        relay = Relay(self.transport, upstream.transport, client_pending=self.core.take_pending(),
                      upstream_pending=upstream.take_leftover(), client_hook=client_hook,
                      upstream_hook=upstream_hook)
        self._relay = relay
        self.relay, upstream.relay = relay.client, relay.upstream
        relay.start().addCallback(self._session_end)

    def _session_end(self, result) -> None:
        grant = self.grant
        self.service.audit.event(
            "session", protocol=self.kind.protocol.value, session=self.session_id, client=self.client_ip,
            account=grant.account.key, login=grant.account.login, code=grant.code_id,
            bytes_up=result.bytes_up, bytes_down=result.bytes_down,
            seconds=round(time.monotonic() - self._started, 3), closed_by=getattr(result, "closed_by", None),
            reason=getattr(result, "reason", None))

    @property
    def relay_object(self) -> Relay | None:
        return self._relay

    def close_both(self, reason: str) -> None:
        """Close client and upstream after what was written to them (a hook asked for it)."""
        self.service.audit.event("session_closed", session=self.session_id, reason=reason)
        self.transport.loseConnection()
        if self.upstream is not None:
            self.upstream.close()

    def end(self, reason: str) -> None:
        """End this session now (its code was revoked or disabled, or the proxy is stopping)."""
        if self._relay is not None:
            self._relay.abort(reason)
        elif not self._closed:
            self._closed = True
            self.transport.abortConnection()


class FrontendFactory(Factory):
    def __init__(self, service: "Service", listener: "Listener", kind: ProtocolKind, server_tls) -> None:
        self.service, self.listener, self.kind, self.server_tls = service, listener, kind, server_tls

    def buildProtocol(self, addr):  # noqa: N802
        proto = Frontend(self.service, self.listener, self.kind, self.server_tls)
        proto.factory = self
        return proto


__all__ = ["Frontend", "FrontendFactory", "ProtocolKind"]
