"""The running proxy: opens the store, directory and hash pool, starts the listeners and the
session checks (proxy/sessions.py), reloads on SIGHUP and stops cleanly."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from proxy import __version__
from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.auth.ratelimit import FailureLimiter
from proxy.auth.shared import SharedLimiter
from proxy.codes.hashing import CodeHasher, pool_share
from proxy.codes.open import open_store, store_threads
from proxy.codes.store import INTERNAL, AsyncCodeStore
from proxy.config import Settings, Upstream
from proxy.directory.open import open_directory
from proxy.exposure import clear_text_warnings
from proxy.frontend import FrontendFactory, ProtocolSpec, SessionContext
from proxy.imap.spec import ImapSpec
from proxy.limits import ConnectionLimits, share_of
from proxy.metrics import Metrics
from proxy.oauth2.tokens import TokenSource
from proxy.oplog import Health
from proxy.oplog import log as oplog
from proxy.pop3.spec import Pop3Spec
from proxy.protocols import MailProtocol, TlsMode
from proxy.proxyprotocol import ProxyProtocolFactory, TrustedProxies
from proxy.reloading import applied_live, needs_restart, read_again, report_restart, set_log_level
from proxy.sessions import ACCOUNT_CHECK_SECONDS, CODE_CHECK_SECONDS, LiveSession, SessionGuard
from proxy.smtp.spec import SmtpSpec
from proxy.tls import ServerTLS, TLSConfigError
from proxy.upstream import UpstreamError, connect, forget_tls

# Pending connections the kernel queues per listener; Twisted's default of 50 drops SYNs under a
# login storm (each drop costs a client a 1 s retransmit). nginx uses 511, the kernel caps it at
# net.core.somaxconn (4096 on current kernels).
LISTEN_BACKLOG = 1024


# While draining, how often the proxy looks whether its sessions have all ended, and how long
# it then gives the goodbyes it wrote to reach the clients before it stops.
DRAIN_POLL_SECONDS = 0.25
GOODBYE_SECONDS = 5.0

# How often an upstream that could not be asked what it offers before login (SMTP EHLO, IMAP
# CAPABILITY) is asked again, and how often one that answered is asked again anyway.
PROBE_RETRY_SECONDS = 30
PROBE_REFRESH_SECONDS = 600


def protocol_specs(settings: Settings, reactor: Any = None) -> dict[MailProtocol, ProtocolSpec]:
    """One spec per configured upstream: how its protocol builds cores and logs in. Upstreams
    that share `oauth2` settings (by name) share one token source, so one cache."""
    max_failures, hostname = settings.auth.max_failures, settings.hostname
    sources: dict[str, TokenSource] = {}

    def tokens(up: Upstream) -> TokenSource | None:
        if up.oauth2 is None:
            return None
        if up.oauth2.name not in sources:
            sources[up.oauth2.name] = TokenSource(up.oauth2, reactor or default_reactor())
        return sources[up.oauth2.name]

    makers: dict[MailProtocol, Callable[[Upstream], ProtocolSpec]] = {
        MailProtocol.IMAP: lambda up: ImapSpec(up, max_failures=max_failures, tokens=tokens(up)),
        MailProtocol.POP3: lambda up: Pop3Spec(
            up, max_failures=max_failures, hostname=hostname, tokens=tokens(up)
        ),
        MailProtocol.SMTP: lambda up: SmtpSpec(
            up, max_failures=max_failures, hostname=hostname, tokens=tokens(up)
        ),
    }
    return {protocol: makers[protocol](up) for protocol, up in settings.upstreams.items()}


def default_reactor() -> Any:
    """The global reactor, imported only when needed (a test passes its own)."""
    from twisted.internet import reactor

    return reactor


class Service:
    def __init__(
        self,
        settings: Settings,
        reactor: Any,
        audit: Audit | None = None,
        session_check: float = CODE_CHECK_SECONDS,
        account_check: float = ACCOUNT_CHECK_SECONDS,
        inherited: dict[str, int] | None = None,
        workers: int = 1,
    ) -> None:
        """As one of serve.workers (proxy/workers.py), `inherited` holds the listening sockets
        the supervisor bound (listener name -> file descriptor) and the caps are shared."""
        self.settings = settings
        self.reactor = reactor
        self.audit = audit or Audit(path=settings.audit.file)
        self.ports: dict[str, IListeningPort] = {}  # listener name -> its port
        self.tls: dict[str, ServerTLS] = {}
        self.specs = protocol_specs(settings, reactor)
        self.inherited = dict(inherited or {})
        self.workers = workers
        self.limits = ConnectionLimits(share_of(settings.limits, workers))
        self.metrics = Metrics()
        self.health = Health()
        self.metrics.watch_queues(self._queues)
        self.metrics.watch_certificates(
            lambda: [(name, tls.expires_at) for name, tls in self.tls.items()]
        )
        self.guard: SessionGuard | None = None
        self._check_intervals = (session_check, account_check)
        self._probes: dict[MailProtocol, task.LoopingCall] = {}

    @property
    def sessions(self) -> set[LiveSession]:
        """The live sessions (empty before start)."""
        return self.guard.sessions if self.guard is not None else set()

    def _context(self, guard: SessionGuard) -> SessionContext:
        auth = self.settings.auth
        return SessionContext(
            authenticator=self.authenticator,
            audit=self.audit,
            reactor=self.reactor,
            login_timeout=auth.login_timeout.total_seconds(),
            failure_delay=auth.failure_delay.total_seconds(),
            connect=lambda upstream: connect(upstream, self.reactor),
            limits=self.limits,
            metrics=self.metrics,
            health=self.health,
            opened=guard.add,
            closed=guard.discard,
        )

    async def start(self) -> None:
        s = self.settings
        for warning in clear_text_warnings(s):  # allowed when written out, but said at start
            self.audit.event("config_warning", warning=warning)
        self.directory = open_directory(s.directory, s.policy)
        self.sync_store = open_store(s.store)
        self.store = AsyncCodeStore(self.sync_store, self.reactor, store_threads(s.store))
        self.hasher = CodeHasher(pool_share(s.codes.argon2, self.workers))
        self.hasher.start(self.reactor)
        self.authenticator = Authenticator(
            s,
            self.directory,
            self.store,
            self.hasher,
            self.audit,
            self.reactor,
            metrics=self.metrics,
            health=self.health,
        )
        local = self.authenticator.limiter
        assert isinstance(local, FailureLimiter)
        self.shared = SharedLimiter(local, self.store, self.reactor, time.monotonic)
        self.authenticator.limiter = self.shared
        self.shared.start()
        await self._start_web()
        code_check, account_check = self._check_intervals
        self.guard = SessionGuard(
            codes=self.store.get_many,
            account=self.authenticator.account,
            changes=self.store.changes_since,
            changed=self.authenticator.cache.forget_code,
            policy=s.policy,
            audit=self.audit,
            reactor=self.reactor,
            code_interval=code_check,
            account_interval=account_check,
        )
        context = self._context(self.guard)
        for listener in s.listeners:
            server_tls = None
            if listener.tls is not TlsMode.NONE:
                server_tls = ServerTLS(
                    str(listener.cert_file), str(listener.key_file), listener.min_tls
                )
                self.tls[listener.name] = server_tls
            spec = self.specs[listener.protocol].for_listener(listener)
            factory: IProtocolFactory = FrontendFactory(context, listener, spec, server_tls)
            if server_tls is not None and listener.tls is TlsMode.IMPLICIT:
                factory = TLSMemoryBIOFactory(server_tls, False, factory)
            if listener.proxy_protocol_from:
                trusted = TrustedProxies.parse([str(n) for n in listener.proxy_protocol_from])
                factory = ProxyProtocolFactory(factory, trusted)
            self.ports[listener.name] = await self._listen(listener, factory)
            self.audit.event(
                "listening",
                listener=listener.name,
                protocol=listener.protocol,
                address=f"{listener.host}:{self.port_of(listener.name)}",
                tls=listener.tls,
            )
        for protocol in {listener.protocol for listener in s.listeners}:
            answered = await self._probe(protocol)
            again = task.LoopingCall(self._probe_again, protocol)
            again.clock = self.reactor
            again.start(PROBE_REFRESH_SECONDS if answered else PROBE_RETRY_SECONDS, now=False)
            self._probes[protocol] = again
        self.guard.start()
        self.metrics.start(self.reactor)

    async def readiness(self) -> dict[str, str]:
        """Whether each dependency answers now: "ok", or what failed (for /readyz)."""
        checks: dict[str, str] = {}

        async def check(name: str, probe: Callable[[], Awaitable[object]]) -> None:
            try:
                await probe()
                checks[name] = "ok"
            except Exception as exc:  # each failure is reported, none stops the others
                checks[name] = f"failed: {exc or type(exc).__name__}"

        async def upstream(up: Upstream) -> None:
            (await connect(up, self.reactor)).close()

        # A write, not a read: a node on a read-only database (a replica after failover) can
        # refuse every login while it answers reads.
        await check(
            "store",
            lambda: self.store.queue.submit(
                INTERNAL, self.sync_store.run, "DELETE FROM login_failures WHERE at < 0"
            ),
        )
        await check("directory", lambda: self.authenticator.account("apppass-readiness-probe"))
        for protocol, spec in self.specs.items():
            await check(f"upstream_{protocol.value}", partial(upstream, spec.upstream))
        return checks

    def _queues(self) -> list[tuple[str, int, int]]:
        """(name, running, waiting) of every blocking-work queue, for the metrics."""
        queues = [
            getattr(self, "hasher", None) and self.hasher.queue,
            getattr(self, "authenticator", None) and self.authenticator.directory_queue,
            getattr(self, "store", None) and self.store.queue,
            getattr(self, "web", None) and self.web.queue,
        ]
        return [(q.name, q.running, q.waiting) for q in queues if q]

    async def _start_web(self) -> None:
        """The portal and the API on the `web:` listeners (proxy/web/server.py)."""
        s = self.settings
        if not s.web.listeners:
            return
        from proxy.web.app import Ops, web_app
        from proxy.web.server import site_for

        self.web = web_app(
            s,
            self.directory,
            self.sync_store,
            self.authenticator.limiter,
            self.audit,
            self.reactor,
            Ops(self.metrics, self.readiness, self.reactor.seconds),
        )
        for listener in s.web.listeners:
            self.ports[listener.name] = await self._listen(listener, site_for(self.web, listener))
            self.audit.event(
                "listening",
                listener=listener.name,
                protocol="https" if listener.tls is TlsMode.IMPLICIT else "http",
                address=f"{listener.host}:{self.port_of(listener.name)}",
                serve=list(listener.serve),
            )

    async def _listen(self, listener: Any, factory: IProtocolFactory) -> IListeningPort:
        """Adopt the socket the supervisor bound for this listener, else bind one."""
        fd = self.inherited.pop(listener.name, None)
        if fd is not None:
            family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
            port = self.reactor.adoptStreamPort(fd, family, factory)
            os.close(fd)  # the port holds its own copy
            return port
        endpoint_type = TCP6ServerEndpoint if ":" in listener.host else TCP4ServerEndpoint
        return await endpoint_type(
            self.reactor, listener.port, backlog=LISTEN_BACKLOG, interface=listener.host
        ).listen(factory)

    def _upstream_name(self, protocol: MailProtocol) -> str:
        up = self.specs[protocol].upstream
        return f"upstream {protocol.value} {up.host}:{up.port}"

    def describe(self) -> str:
        """The start line: what this proxy serves and in front of what."""
        s = self.settings
        listening = ", ".join(f"{name} :{self.port_of(name)}" for name in self.ports)
        upstreams = ", ".join(
            f"{p.value} {u.host}:{u.port} ({u.tls}, {u.login})" for p, u in s.upstreams.items()
        )
        return (
            f"apppass {__version__} serving {listening}; store {s.store.kind}; "
            f"directory {s.directory.kind}; upstreams {upstreams or 'none'}"
        )

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
            self.health.failed(self._upstream_name(protocol), str(exc))
            return False
        self.health.ok(self._upstream_name(protocol))
        return True

    @defer.inlineCallbacks
    def _probe_again(self, protocol: MailProtocol):
        """Ask again: soon while the upstream does not answer, then now and then, so that what
        it offers after an upgrade or a failover reaches clients without a restart."""
        answered = yield defer.ensureDeferred(self._probe(protocol))
        loop = self._probes[protocol]
        wanted = PROBE_REFRESH_SECONDS if answered else PROBE_RETRY_SECONDS
        if loop.interval != wanted:
            loop.interval = wanted

    def port_of(self, name: str) -> int:
        """The TCP port a listener is bound to (the config may say 0: any free port)."""
        address = self.ports[name].getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        return address.port

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply what can change without a restart (policy,
        limits, log level), the TLS certificates, the upstreams' trust stores and a static users
        file, and reopen the audit file; log what was applied and what needs a restart."""
        applied, restart = self._reload_settings()
        reload_directory = getattr(self.directory, "reload", None)
        if reload_directory is not None:
            try:
                reload_directory()
                applied.append("users file")
            except Exception as exc:  # a broken file keeps the last good one
                self.audit.event("directory_reload", result="fail", reason=str(exc))
        for name, server_tls in self.tls.items():
            try:
                server_tls.reload()
                self.audit.event("tls_reload", listener=name, result="ok")
                applied.append(f"certificate of {name}")
            except TLSConfigError as exc:
                self.audit.event("tls_reload", listener=name, result="fail", reason=str(exc))
                oplog.error(
                    "reload: the certificate of %s did not load, kept the old: %s", name, exc
                )
        forget_tls()  # each upstream's trust store (a ca_file, or the system's) is read again
        self.audit.reopen()
        oplog.info("reload applied: %s", ", ".join(applied) or "nothing")
        if self.workers == 1:  # workers: their supervisor says it once for all
            report_restart(restart)

    def _reload_settings(self) -> tuple[list[str], list[str]]:
        """Read the config again: (what was applied, which changed sections need a restart)."""
        new = read_again(self.settings, report=self.workers == 1)
        if new is None:
            return [], []
        old = self.settings
        applied = []
        if new.policy != old.policy:
            self.authenticator.settings = replace(self.authenticator.settings, policy=new.policy)
            if self.guard is not None:
                self.guard.policy = new.policy
            for name in ("legacy_group", "legacy_filter", "mfa_group", "mfa_filter"):
                if hasattr(self.directory, name):
                    setattr(self.directory, name, getattr(new.policy, name))
            applied.append("policy")
        if new.limits != old.limits:
            self.limits.settings = share_of(new.limits, self.workers)
            applied.append("limits")
        if new.log != old.log:
            set_log_level(new.log.level)
            applied.append("log level")
        self.settings = applied_live(old, new)
        return applied, needs_restart(old, new)

    async def drain(self, grace: float) -> None:
        """SIGTERM: stop accepting; close connections that are not logging in; let logins in
        progress finish and sessions run for up to `grace` seconds; then end what is left with
        the protocol's goodbye."""
        await self._stop_listening()
        for session in list(self.sessions):
            session.drain()
        await self._sessions_gone(grace)
        if self.guard is not None:
            self.guard.end_all("apppass is shutting down")
        await self._sessions_gone(GOODBYE_SECONDS)  # the goodbyes are written before the stop

    async def _sessions_gone(self, seconds: float) -> None:
        deadline = self.reactor.seconds() + seconds
        while self.sessions and self.reactor.seconds() < deadline:
            await task.deferLater(self.reactor, min(DRAIN_POLL_SECONDS, seconds), lambda: None)

    async def _stop_listening(self) -> None:
        """Close every listening port once (a stop may come while a drain is closing them)."""
        while self.ports:
            _, port = self.ports.popitem()
            await defer.maybeDeferred(port.stopListening)

    async def stop(self) -> None:
        """Stop listening, end sessions, release pools; safe after a start that failed midway,
        and during a drain."""
        for loop in self._probes.values():
            if loop.running:
                loop.stop()
        if self.guard is not None:
            self.guard.stop()
        if getattr(self, "shared", None) is not None:
            self.shared.stop()
        self.metrics.stop()
        await self._stop_listening()
        if self.guard is not None:
            self.guard.end_all("apppass is shutting down")
        # Each part is released even if another fails: a thread pool left running keeps the
        # process alive after the reactor stopped.
        parts = [
            getattr(self, "authenticator", None),
            getattr(self, "hasher", None),
            getattr(self, "store", None),
            getattr(getattr(self, "web", None), "queue", None),
        ]
        problems = []
        for part in parts:
            if part is not None:
                try:
                    part.stop()
                except Exception as exc:
                    problems.append(f"{type(part).__name__}: {exc}")
        if getattr(self, "directory", None) is not None:
            self.directory.close()
        if problems:
            raise RuntimeError("; ".join(problems))
