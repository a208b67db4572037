"""The Twisted side of a client connection, the same for IMAP, POP3 and SMTP.

It moves bytes between the socket and the protocol's sans-IO core, carries out the core's
commands (replies, STARTTLS, authentication, close), keeps the clocks the core has none of (time
to log in, failure delay), logs in upstream through the protocol's spec after a Grant, and then
hands both connections to the relay. It needs only a `SessionContext` from the running service,
so a test can drive it with a scripted upstream. The walk through a login is in
docs/architecture.md.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol, ITLSTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from proxy.addresses import in_networks
from proxy.audit import Audit
from proxy.auth.decision import Attempt, Decision, Grant, Refusal, Sending
from proxy.commands import Authenticate, Close, Command, Failed, Send, StartTLS
from proxy.config import Listener, Upstream
from proxy.core import PreAuthCore
from proxy.limits import ConnectionLimits
from proxy.metrics import Metrics, Timer
from proxy.oplog import Health
from proxy.oplog import log as oplog
from proxy.protocols import MailProtocol, TlsMode
from proxy.relay import Relay, RelayResult, Spliceable
from proxy.upstream import (
    LoginRequest,
    LoginResult,
    UpstreamConnection,
    UpstreamError,
    no_delay,
    write_now,
)


class WatchResult(TypingProtocol):
    @property
    def to_upstream(self) -> bytes: ...

    @property
    def to_client(self) -> bytes: ...

    @property
    def refused(self) -> tuple[str, ...]:
        """Commands refused in this call, for the audit log."""

    @property
    def close(self) -> str | None:
        """End the session after writing: the streams cannot stay in step."""


class SessionWatch(TypingProtocol):
    """A sans-IO observer of a logged-in session in both directions (SMTP's command watch).
    One that needs answers from elsewhere (smtp/policed.py: the store, for a daily cap) also has
    `attach(emit)`, given a function that writes a result produced outside a read, and
    `finish()`, called when the session has ended."""

    @property
    def waiting(self) -> bool:
        """Stop reading the client until the upstream has answered."""

    def client_data(self, data: bytes) -> WatchResult: ...

    def upstream_data(self, data: bytes) -> WatchResult: ...


class ProtocolSpec(TypingProtocol):
    """What the frontend needs to know about one mail protocol (proxy/imap/__init__.py, …)."""

    protocol: MailProtocol
    upstream: Upstream  # where its sessions log in

    def for_listener(self, listener: Listener) -> ProtocolSpec:
        """The spec as this listener uses it (IMAP: its own `capabilities:` list)."""

    def make_core(
        self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool
    ) -> PreAuthCore: ...

    async def probe(self, conn: UpstreamConnection) -> None:
        """Learn what the upstream offers before login (at start, and again until it answers)."""

    async def login(self, conn: UpstreamConnection, request: LoginRequest) -> LoginResult: ...

    def watch(self, result: LoginResult, sending: Sending | None = None) -> SessionWatch | None:
        """What watches the session, if anything; `sending` is the Grant's sending policy."""

    def goodbye(self, reason: str) -> bytes:
        """What a logged-in client is told when the proxy ends its session (b"" for nothing)."""


class Authenticates(TypingProtocol):
    """The Authenticator as a session uses it (proxy/auth/authenticator.py)."""

    def authenticate(self, attempt: Attempt) -> defer.Deferred[Decision]: ...

    async def confirm(self, grant: Grant, attempt: Attempt) -> bool:
        """Count the use once the upstream login succeeded; False: do not start the session."""

    def release(self, grant: Grant) -> None:
        """The upstream login did not happen: the use is not counted."""


@dataclass(frozen=True)
class SessionContext:
    """What a session needs from the running service, and nothing more."""

    authenticator: Authenticates
    audit: Audit
    reactor: Any  # IReactorTime (callLater)
    login_timeout: float  # seconds to log in (auth.login_timeout)
    failure_delay: float  # seconds before a failure is answered (auth.failure_delay)
    connect: Callable[[Upstream], Awaitable[UpstreamConnection]]
    limits: ConnectionLimits  # caps on connections, per address and per account
    metrics: Metrics
    health: Health  # dependencies down or back, for the operational log
    opened: Callable[[Frontend], None]  # the session registry: revocation ends live sessions
    closed: Callable[[Frontend], None]


@implementer(IHalfCloseableProtocol)
class Frontend(Spliceable, Protocol):
    """One client connection: the pre-auth core, the login, then the relay."""

    def __init__(
        self, context: SessionContext, listener: Listener, spec: ProtocolSpec, server_tls: Any
    ) -> None:
        self.context = context
        self.listener = listener
        self.spec = spec
        self.server_tls = server_tls
        self.session_id = secrets.token_hex(6)
        self.grant: Grant | None = None
        self.upstream: UpstreamConnection | None = None
        self.client_ip = ""
        self.client_port = 0
        self.tls_active = False
        self._relay: Relay | None = None
        self._admitted = False  # counted by the connection limits
        self._session_of: str | None = None  # the account key counted as having this session
        self._timer: Any = None
        self._closed = False
        self._started = time.monotonic()

    @property
    def _client(self) -> ITLSTransport:
        """The client's transport (TCP, TLS, or inside a PROXY-protocol wrapper): it writes,
        closes, aborts and starts TLS."""
        return cast(ITLSTransport, self.transport)

    # -- connection ------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self._client)
        peer = self._client.getPeer()
        self.client_ip = getattr(peer, "host", "") or ""
        self.client_port = getattr(peer, "port", 0) or 0
        self.tls_active = self.listener.tls is TlsMode.IMPLICIT
        self.core = self.spec.make_core(
            tls_active=self.tls_active,
            starttls_available=self.listener.tls is TlsMode.STARTTLS,
            plaintext_auth=in_networks(self.client_ip, self.listener.plaintext_auth_from),
        )
        refused = self.context.limits.connected(self.client_ip)
        if refused is not None:
            self._audit("connection_refused", reason=str(refused))
            self.context.metrics.refused_connections.labels(refused.cap).inc()
            self._carry_out(self.core.overloaded())
            return
        self._admitted = True
        self.context.opened(self)
        self._timer = self.context.reactor.callLater(
            self.context.login_timeout, self._login_timeout
        )
        self._carry_out(self.core.greeting())

    def dataReceived(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.dataReceived(data)
        elif not self._closed:
            self._carry_out(self.core.receive_data(data))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._cancel_timer()
        if self._admitted:
            self._admitted = False
            self.context.closed(self)
            self.context.limits.disconnected(self.client_ip, logged_in=self.grant is not None)
        self._end_session_count()
        if self.relay is not None:
            self.relay.connectionLost(reason)
        elif self.upstream is not None:
            self.upstream.close()

    # -- carrying out the core's commands -------------------------------------------------------

    def _carry_out(self, commands: list[Command]) -> None:
        for command in commands:
            if self._closed:
                return
            if isinstance(command, Send):
                write_now(self._client, command.data)
            elif isinstance(command, StartTLS):
                self._client.startTLS(self.server_tls)
                self.tls_active = True
                self.core.tls_started()
            elif isinstance(command, Authenticate):
                defer.ensureDeferred(self._log_in(command)).addErrback(self._bug)
            elif isinstance(command, Failed):
                self._audit("client_error", reason=command.reason)
            elif isinstance(command, Close):
                self._audit("disconnect", reason=command.reason)
                self._closed = True
                self._cancel_timer()
                self._client.loseConnection()

    def _audit(self, event: str, **fields: Any) -> None:
        self.context.audit.event(
            event,
            protocol=self.spec.protocol.value,
            session=self.session_id,
            client=self.client_ip,
            **fields,
        )

    def _bug(self, failure: Failure) -> None:
        """An unexpected error (a bug): one audit event and one log line with where it was
        raised, never a traceback to the client; the connection is dropped."""
        error = failure.value
        self._audit("error", where="frontend", type=type(error).__name__, error=str(error))
        frame = failure.frames[-1] if failure.frames else None
        where = f" at {frame[1]}:{frame[2]}" if frame else ""
        oplog.error(
            "unexpected %s in a %s session%s: %s",
            type(error).__name__,
            self.spec.protocol.value,
            where,
            error,
        )
        if not self._closed:
            self._closed = True
            self._client.abortConnection()

    def _login_timeout(self) -> None:
        self._timer = None
        if self.relay is None and not self._closed:
            self._carry_out(self.core.login_timeout())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the login -------------------------------------------------------------------------------

    async def _log_in(self, command: Authenticate) -> None:
        """Ask the Authenticator; after a Grant log in upstream, count the use, answer the client
        and splice. A use is counted only for a session that really logged in upstream."""
        creds = command.credentials
        attempt = Attempt(
            self.spec.protocol,
            creds.login,
            creds.secret,
            self.client_ip,
            self.client_port,
            tls=self.tls_active,
            listener=self.listener.name,
            session=self.session_id,
            mechanism=command.mechanism,
        )
        authenticator = self.context.authenticator
        timer = Timer()
        decision = await authenticator.authenticate(attempt)
        if not isinstance(decision, Grant):
            self._count_login(timer, decision.refusal.value)
            if decision.refusal is Refusal.LIMIT:
                self.context.metrics.refused_connections.labels("ip_failures_per_minute").inc()
            if not self._closed:
                await self._refuse(decision.refusal)
            return
        if self._closed:
            authenticator.release(decision)
            return
        busy = self.context.limits.logging_in(decision.account.key)
        if busy is not None:
            authenticator.release(decision)
            self._audit("session_refused", account=decision.account.key, reason=str(busy))
            self.context.metrics.refused_connections.labels(busy.cap).inc()
            self._count_login(timer, Refusal.BUSY.value)
            self._carry_out(self.core.auth_failed(Refusal.BUSY))
            return
        self._session_of = decision.account.key
        request = LoginRequest(
            decision.upstream_identity,
            self.client_ip,
            self.client_port,
            self.session_id,
            command.hello,
        )
        upstream_timer = Timer()
        try:
            self.upstream = await self.context.connect(self.spec.upstream)
            if self._closed:
                raise UpstreamError("the client left during the upstream login")
            result = await self.spec.login(self.upstream, request)
            if self._closed:
                raise UpstreamError("the client left during the upstream login")
        except UpstreamError as exc:
            self._audit("upstream", result="fail", login=creds.login, reason=str(exc))
            up = self.spec.upstream
            self.context.metrics.upstream_errors.labels(
                self.spec.protocol.value, f"{up.host}:{up.port}"
            ).inc()
            self.context.health.failed(self._upstream_name, str(exc))
            self._count_login(timer, Refusal.TEMPORARY.value)
            self._abandon_login(decision)
            if not self._closed:
                await self._refuse(Refusal.TEMPORARY)
            return
        self.context.metrics.phase_seconds.labels("upstream").observe(upstream_timer.seconds)
        self.context.health.ok(self._upstream_name)
        if not await authenticator.confirm(decision, attempt):
            self._count_login(timer, Refusal.TEMPORARY.value)
            self._abandon_login(None)
            if not self._closed:
                await self._refuse(Refusal.TEMPORARY)
            return
        if self._closed:  # the use is counted: the client left just as it logged in
            self._abandon_login(None)
            return
        self.grant = decision
        self._count_login(timer, "grant")
        self.context.metrics.sessions.labels(self.spec.protocol.value).inc()
        self.context.limits.logged_in(self.client_ip)
        self._cancel_timer()
        self._carry_out(self.core.auth_succeeded(result.capabilities))
        self._splice(self.upstream, self.spec.watch(result, decision.sending))

    @property
    def _upstream_name(self) -> str:
        up = self.spec.upstream
        return f"upstream {self.spec.protocol.value} {up.host}:{up.port}"

    def _count_login(self, timer: Timer, outcome: str) -> None:
        protocol = self.spec.protocol.value
        self.context.metrics.logins.labels(protocol, self.listener.name, outcome).inc()
        self.context.metrics.login_seconds.labels(protocol, outcome).observe(timer.seconds)

    def _abandon_login(self, grant: Grant | None) -> None:
        """The login stops before the session: close the upstream, give back what was held."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        if grant is not None:
            self.context.authenticator.release(grant)
        self._end_session_count()

    def _end_session_count(self) -> None:
        if self._session_of is not None:
            self.context.limits.session_ended(self._session_of)
            self._session_of = None

    async def _refuse(self, refusal: Refusal) -> None:
        """Failures are answered after auth.failure_delay, as Dovecot does."""
        if self.context.failure_delay > 0:
            d: defer.Deferred[None] = defer.Deferred()
            self.context.reactor.callLater(self.context.failure_delay, d.callback, None)
            await d
        if not self._closed:
            self._carry_out(self.core.auth_failed(refusal))

    # -- the relay -------------------------------------------------------------------------------

    def _splice(self, upstream: UpstreamConnection, watch: SessionWatch | None) -> None:
        client_hook = upstream_hook = None
        self._watch = watch
        if watch is not None:
            client_hook, upstream_hook = self._hooks(watch)
        assert upstream.transport is not None
        relay = Relay(
            self._client,
            upstream.transport,
            client_pending=self.core.take_pending(),
            upstream_pending=upstream.take_leftover(),
            client_hook=client_hook,
            upstream_hook=upstream_hook,
        )
        self._relay = relay
        self.relay, upstream.relay = relay.client, relay.upstream
        # The pre-auth core (its line buffer, limits, counters) has nothing left to do: an idle
        # session should not keep it (docs/architecture.md "Memory of an idle session").
        del self.core
        relay.start().addCallback(self._session_end)

    def _hooks(self, watch: SessionWatch) -> tuple[Callable[[bytes], tuple[bytes, bytes]], ...]:
        """Relay hooks that run both directions through a watch and carry out what it says."""
        refusals = self._refusals = RefusalAudit(self.context.reactor.seconds)

        def apply(result: WatchResult) -> None:
            relay = self._relay
            if relay is not None:
                if watch.waiting:
                    relay.client.pause_reading(watch)
                else:
                    relay.client.resume_reading(watch)
            if result.refused and (fields := refusals.add(result.refused)):
                self._audit("refused", **fields)
            if result.close:
                self.context.reactor.callLater(0, self._close_both, result.close)

        def from_client(data: bytes) -> tuple[bytes, bytes]:
            result = watch.client_data(data)
            apply(result)
            return result.to_upstream, result.to_client

        def from_upstream(data: bytes) -> tuple[bytes, bytes]:
            result = watch.upstream_data(data)
            apply(result)
            return result.to_client, result.to_upstream

        def later(result: WatchResult) -> None:
            relay = self._relay
            if relay is not None:
                relay.client.deliver(result.to_upstream, result.to_client)
                apply(result)

        if (attach := getattr(watch, "attach", None)) is not None:
            attach(later)
        return from_client, from_upstream

    def _session_end(self, result: RelayResult) -> None:
        grant = self.grant
        assert grant is not None
        metrics, protocol = self.context.metrics, self.spec.protocol.value
        metrics.sessions.labels(protocol).dec()
        metrics.relayed.labels(protocol, "up").inc(result.bytes_up)
        metrics.relayed.labels(protocol, "down").inc(result.bytes_down)
        if (finish := getattr(getattr(self, "_watch", None), "finish", None)) is not None:
            finish()
        refusals: RefusalAudit | None = getattr(self, "_refusals", None)
        if refusals is not None and (fields := refusals.flush()):
            self._audit("refused", **fields)
        self._audit(
            "session",
            account=grant.account.key,
            login=grant.account.login,
            code=grant.code_id,
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            seconds=round(time.monotonic() - self._started, 3),
            closed_by=result.closed_by,
            reason=result.reason,
            spliced=result.spliced,
        )

    def _close_both(self, reason: str) -> None:
        """Close client and upstream after what was written to them (the watch asked for it)."""
        self._audit("session_closed", reason=reason)
        self._client.loseConnection()
        if self.upstream is not None:
            self.upstream.close()

    def drain(self) -> None:
        """The proxy stops: a connection not logging in is told and closed; a login in
        progress finishes; a session goes on until the proxy ends it (shutdown_grace)."""
        if self.relay is None and not self._closed:
            self._carry_out(self.core.shutting_down())

    def end(self, reason: str) -> None:
        """End this session now (its code was revoked or disabled, or the proxy is stopping),
        with the protocol's goodbye where it has one."""
        if self._relay is not None:
            self._relay.close_with(reason, self.spec.goodbye(reason))
        elif not self._closed:
            self._closed = True
            self._client.abortConnection()


# A session's refused commands (SMTP's watch) are audited at once the first time, then as a count
# at most once per this many seconds and at session end: a client pipelining thousands of them
# writes a few audit lines, not one per read. 10 s: fail2ban's default findtime is 600 s, so a
# log reader still sees every offending session at once.
REFUSED_AUDIT_SECONDS = 10.0


class RefusalAudit:
    """Counts a session's refused commands and says when an audit event is due."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._last: float | None = None  # when the last event was audited
        self._pending: dict[str, int] = {}  # refused verbs not audited yet, with their counts

    def add(self, verbs: tuple[str, ...]) -> dict[str, Any] | None:
        """Count these refusals; the fields of a `refused` event if one is due now."""
        for verb in verbs:
            self._pending[verb] = self._pending.get(verb, 0) + 1
        now = self._clock()
        if self._last is not None and now - self._last < REFUSED_AUDIT_SECONDS:
            return None
        self._last = now
        return self.flush()

    def flush(self) -> dict[str, Any] | None:
        """The fields of a `refused` event for what was not audited yet (at session end)."""
        if not self._pending:
            return None
        fields = {"commands": sorted(self._pending), "count": sum(self._pending.values())}
        self._pending.clear()
        return fields


class FrontendFactory(Factory):
    """Frontends for one listener."""

    def __init__(
        self, context: SessionContext, listener: Listener, spec: ProtocolSpec, server_tls: Any
    ) -> None:
        self.context, self.listener, self.spec, self.server_tls = (
            context,
            listener,
            spec,
            server_tls,
        )

    def buildProtocol(self, addr: Any) -> Frontend:
        proto = Frontend(self.context, self.listener, self.spec, self.server_tls)
        proto.factory = self
        return proto
