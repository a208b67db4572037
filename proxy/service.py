"""The running proxy: opens the store, directory and hash pool, starts the listeners, and ends
sessions whose code was revoked or disabled."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.codes.hashing import CodeHasher
from proxy.codes.open import open_store
from proxy.codes.store import AsyncCodeStore, State, StoreUnavailable
from proxy.config import Settings, Upstream
from proxy.directory.open import open_directory
from proxy.frontend import Frontend, FrontendFactory, ProtocolSpec, SessionContext
from proxy.imap.spec import ImapSpec
from proxy.pop3.spec import Pop3Spec
from proxy.protocols import MailProtocol, TlsMode
from proxy.proxyprotocol import ProxyProtocolFactory, TrustedProxies
from proxy.smtp.spec import SmtpSpec
from proxy.tls import ServerTLS, TLSConfigError
from proxy.upstream import UpstreamError, connect

# How often live sessions are checked against the store, so that revoking or disabling a code
# ends the sessions it opened (bongo-project revokes "at their next command"; we bound the wait).
SESSION_CHECK_SECONDS = 15

# Pending connections the kernel queues per listener; Twisted's default of 50 drops SYNs under a
# login storm (each drop costs a client a 1 s retransmit). nginx uses 511, the kernel caps it at
# net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 1024


# How often an upstream that could not be asked what it offers (SMTP EHLO) is asked again.
PROBE_RETRY_SECONDS = 30


def protocol_specs(settings: Settings) -> dict[MailProtocol, ProtocolSpec]:
    """One spec per configured upstream: how its protocol builds cores and logs in."""
    max_failures, hostname = settings.auth.max_failures, settings.hostname
    makers: dict[MailProtocol, Callable[[Upstream], ProtocolSpec]] = {
        MailProtocol.IMAP: lambda up: ImapSpec(up, max_failures=max_failures),
        MailProtocol.POP3: lambda up: Pop3Spec(up, max_failures=max_failures, hostname=hostname),
        MailProtocol.SMTP: lambda up: SmtpSpec(up, max_failures=max_failures, hostname=hostname),
    }
    return {protocol: makers[protocol](up) for protocol, up in settings.upstreams.items()}


class Service:
    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        audit: Audit | None = None,
        session_check: float = SESSION_CHECK_SECONDS,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.audit = audit or Audit(path=settings.audit.file)
        self.sessions: set[Frontend] = set()
        self.ports: dict[str, IListeningPort] = {}  # listener name -> its port
        self.tls: dict[str, ServerTLS] = {}
        self.specs = protocol_specs(settings)
        self.session_check = session_check
        self._check: task.LoopingCall | None = None
        self._probes: dict[MailProtocol, task.LoopingCall] = {}

    def _context(self) -> SessionContext:
        auth = self.settings.auth
        return SessionContext(
            authenticator=self.authenticator,
            audit=self.audit,
            reactor=self.reactor,
            login_timeout=auth.login_timeout.total_seconds(),
            failure_delay=auth.failure_delay.total_seconds(),
            connect=lambda upstream: connect(upstream, self.reactor),
            opened=self.sessions.add,
            closed=self.sessions.discard,
        )

    async def start(self) -> None:
        s = self.settings
        self.directory = open_directory(s.directory, s.policy)
        self.sync_store = open_store(s.store)
        self.store = AsyncCodeStore(self.sync_store, self.reactor)
        self.hasher = CodeHasher(s.codes.argon2)
        self.hasher.start(self.reactor)
        self.authenticator = Authenticator(
            s, self.directory, self.store, self.hasher, self.audit, self.reactor
        )
        context = self._context()
        for listener in s.listeners:
            server_tls = None
            if listener.tls is not TlsMode.NONE:
                server_tls = ServerTLS(
                    str(listener.cert_file), str(listener.key_file), listener.min_tls
                )
                self.tls[listener.name] = server_tls
            factory: IProtocolFactory = FrontendFactory(
                context, listener, self.specs[listener.protocol], server_tls
            )
            if server_tls is not None and listener.tls is TlsMode.IMPLICIT:
                factory = TLSMemoryBIOFactory(server_tls, False, factory)
            if listener.proxy_protocol_from:
                trusted = TrustedProxies.parse([str(n) for n in listener.proxy_protocol_from])
                factory = ProxyProtocolFactory(factory, trusted)
            endpoint_type = TCP6ServerEndpoint if ":" in listener.host else TCP4ServerEndpoint
            port = await endpoint_type(
                self.reactor, listener.port, backlog=LISTEN_BACKLOG, interface=listener.host
            ).listen(factory)
            self.ports[listener.name] = port
            self.audit.event(
                "listening",
                listener=listener.name,
                protocol=listener.protocol,
                address=f"{listener.host}:{self.port_of(listener.name)}",
                tls=listener.tls,
            )
        for protocol in {listener.protocol for listener in s.listeners}:
            if not await self._probe(protocol):
                retry = task.LoopingCall(self._retry_probe, protocol)
                retry.clock = self.reactor
                retry.start(PROBE_RETRY_SECONDS, now=False)
                self._probes[protocol] = retry
        self._check = task.LoopingCall(self._end_revoked_sessions)
        self._check.clock = self.reactor
        self._check.start(self.session_check, now=False)

    async def _probe(self, protocol: MailProtocol) -> bool:
        """Ask the upstream what it offers before login (SMTP: its EHLO extensions)."""
        spec = self.specs[protocol]
        try:
            conn = await connect(spec.upstream, self.reactor)
            try:
                await spec.probe(conn)
            finally:
                conn.close()
        except UpstreamError as exc:
            self.audit.event(
                "upstream",
                protocol=protocol.value,
                result="fail",
                reason=f"cannot learn what the upstream offers: {exc}",
            )
            return False
        return True

    @defer.inlineCallbacks
    def _retry_probe(self, protocol: MailProtocol):
        if (yield defer.ensureDeferred(self._probe(protocol))):
            self._probes.pop(protocol).stop()

    def port_of(self, name: str) -> int:
        """The TCP port a listener is bound to (the config may say 0: any free port)."""
        address = self.ports[name].getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        return address.port

    def reload(self) -> None:
        """SIGHUP: re-read the TLS certificates and a static users file."""
        reload_directory = getattr(self.directory, "reload", None)
        if reload_directory is not None:
            try:
                reload_directory()
            except Exception as exc:  # a broken file keeps the last good one
                self.audit.event("directory_reload", result="fail", reason=str(exc))
        for name, server_tls in self.tls.items():
            try:
                server_tls.reload()
                self.audit.event("tls_reload", listener=name, result="ok")
            except TLSConfigError as exc:
                self.audit.event("tls_reload", listener=name, result="fail", reason=str(exc))

    @defer.inlineCallbacks
    def _end_revoked_sessions(self):
        by_code: dict[int, list] = {}
        for session in list(self.sessions):
            if session.grant is not None:
                by_code.setdefault(session.grant.code_id, []).append(session)
        for code_id, sessions in by_code.items():
            try:
                record = yield self.store.get(code_id)
            except StoreUnavailable:
                return
            state = record.state() if record else State.REVOKED
            if state in (State.REVOKED, State.DISABLED):
                for session in sessions:
                    self.audit.event(
                        "session_ended",
                        session=session.session_id,
                        code=code_id,
                        reason=f"app password {state.value}",
                    )
                    session.end(f"app password {code_id} {state.value}")

    async def stop(self) -> None:
        """Stop listening, end sessions, release pools; safe after a start that failed midway."""
        for loop in [self._check, *self._probes.values()]:
            if loop is not None and loop.running:
                loop.stop()
        for port in self.ports.values():
            await defer.maybeDeferred(port.stopListening)
        for session in list(self.sessions):
            session.end("proxy stopping")
        for name in ("authenticator", "hasher", "store"):
            part = getattr(self, name, None)
            if part is not None:
                part.stop()
        if getattr(self, "directory", None) is not None:
            self.directory.close()


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the TLS certificates and the users file."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor  # the installed reactor provides every IReactor* interface
    service = Service(settings, reactor)
    exit_code = [0]

    def started(_):
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload))

    def failed(failure):
        exc = failure.value
        sys.stderr.write(f"apppass: cannot start: {exc}\n")
        exit_code[0] = 1
        reactor.stop()

    def run():
        defer.ensureDeferred(service.start()).addCallbacks(started, failed)

    reactor.callWhenRunning(run)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(service.stop())
    )
    reactor.run()
    return exit_code[0]
