"""The running proxy: opens the store, directory and hash pool, starts the listeners, and ends
sessions whose code was revoked or disabled."""

from __future__ import annotations

import signal
import sys

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.auth.decision import Protocol
from proxy.codes import open_store
from proxy.codes.hashing import CodeHasher
from proxy.codes.store import AsyncCodeStore, State, StoreUnavailable
from proxy.config import Settings
from proxy.directory.build import open_directory
from proxy.frontend import FrontendFactory
from proxy.proxyprotocol import ProxyProtocolFactory, TrustedProxies
from proxy.tls import ServerTLS, TLSConfigError
from proxy.upstream import UpstreamError

# How often live sessions are checked against the store, so that revoking or disabling a code
# ends the sessions it opened (bongo-project revokes "at their next command"; we bound the wait).
SESSION_CHECK_SECONDS = 15

# Pending connections the kernel queues per listener; Twisted's default of 50 drops SYNs under a
# login storm (each drop costs a client a 1 s retransmit). nginx uses 511, the kernel caps it at
# net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 1024


def _kinds() -> dict:
    from proxy.imap.frontend import ImapKind
    from proxy.pop3.frontend import Pop3Kind
    from proxy.smtp.frontend import SmtpKind

    return {"imap": ImapKind(), "pop3": Pop3Kind(), "smtp": SmtpKind()}


class Service:
    def __init__(self, settings: Settings, reactor, audit: Audit | None = None,
                 session_check: float = SESSION_CHECK_SECONDS) -> None:
        self.settings = settings
        self.reactor = reactor
        self.audit = audit or Audit(path=settings.audit.file)
        self.sessions: set = set()
        self.ports: dict[str, object] = {}  # listener name -> IListeningPort
        self.tls: dict[str, ServerTLS] = {}
        self.kinds = _kinds()
        self.hostname = settings.hostname
        self.session_check = session_check
        self._check = None

    def upstream_for(self, protocol: Protocol):
        return self.settings.upstreams[protocol.value]

    async def start(self) -> None:
        s = self.settings
        self.directory = open_directory(s)
        self.sync_store = open_store(s)
        self.store = AsyncCodeStore(self.sync_store, self.reactor)
        self.hasher = CodeHasher(s.codes.argon2)
        self.hasher.start(self.reactor)
        self.authenticator = Authenticator(s, self.directory, self.store, self.hasher, self.audit, self.reactor)
        for listener in s.listeners:
            server_tls = None
            if listener.tls != "none":
                server_tls = ServerTLS(str(listener.cert_file), str(listener.key_file), listener.min_tls)
                self.tls[listener.name] = server_tls
            factory = FrontendFactory(self, listener, self.kinds[listener.protocol], server_tls)
            if listener.tls == "implicit":
                factory = TLSMemoryBIOFactory(server_tls, False, factory)
            if listener.proxy_protocol_from:
                trusted = TrustedProxies.parse([str(n) for n in listener.proxy_protocol_from])
                factory = ProxyProtocolFactory(factory, trusted)
            endpoint_type = TCP6ServerEndpoint if ":" in listener.host else TCP4ServerEndpoint
            port = await endpoint_type(self.reactor, listener.port, backlog=LISTEN_BACKLOG,
                                       interface=listener.host).listen(factory)
            self.ports[listener.name] = port
            self.audit.event("listening", listener=listener.name, protocol=listener.protocol,
                             address=f"{listener.host}:{port.getHost().port}", tls=listener.tls)
        if any(listener.protocol == "smtp" for listener in s.listeners):
            try:
                await self.kinds["smtp"].learn_extensions(self)
            except UpstreamError as exc:
                self.audit.event("upstream", protocol="smtp", result="fail",
                                 reason=f"cannot learn the upstream's EHLO extensions: {exc}")
        self._check = task.LoopingCall(self._end_revoked_sessions)
        self._check.clock = self.reactor
        self._check.start(self.session_check, now=False)

    def port_of(self, name: str) -> int:
        return self.ports[name].getHost().port

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
                    self.audit.event("session_ended", session=session.session_id, code=code_id,
                                     reason=f"app password {state.value}")
                    session.end(f"app password {code_id} {state.value}")

    async def stop(self) -> None:
        """Stop listening, end sessions, release pools; safe after a start that failed midway."""
        if self._check is not None and self._check.running:
            self._check.stop()
        for port in self.ports.values():
            await port.stopListening()
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
    from twisted.internet import reactor

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
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(service.stop()))
    reactor.run()
    return exit_code[0]
