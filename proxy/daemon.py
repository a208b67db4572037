"""`apppass serve` as a process: the operational log, signals (SIGTERM/SIGINT drain, SIGHUP
reload), systemd's notifications and watchdog, and the exit status. The running proxy itself is
proxy/service.py."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from proxy.config import Settings
from proxy.oplog import configure as configure_log
from proxy.oplog import log as oplog
from proxy.oplog import unconfigure as unconfigure_log
from proxy.sdnotify import Notifier
from proxy.service import Service
from proxy.workerlink import SupervisorLink, WorkerRole


def serve(
    settings: Settings,
    *,
    name: str = "apppass",
    in_use_hint: str = "",
    ready: Callable[[Service], None] | None = None,
    worker: WorkerRole | None = None,
) -> int:
    """Run until the first SIGTERM or SIGINT, in any state (starting, serving, stopping). It
    drains (serve.shutdown_grace): no new connections, logins in progress finish, sessions end
    with their protocol's goodbye after the grace; a second signal cuts the grace short, and
    nothing after that interrupts the stop. SIGHUP re-reads the TLS certificates and the users
    file. systemd hears READY=1 once listening, RELOADING=1 around a reload, STOPPING=1, and the
    watchdog while the reactor turns. A start that fails is one line on stderr (`NAME: cannot
    start: …`, plus in_use_hint for a port in use) and status 1; ready(service) runs once it is
    listening. As one of serve.workers (proxy/workers.py) it adopts the supervisor's sockets,
    tells the supervisor instead of systemd, and drains when the supervisor is gone."""
    import os

    from twisted.internet import reactor as global_reactor
    from twisted.internet.error import CannotListenError, ReactorNotRunning
    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
    from zope.interface import provider

    reactor: Any = global_reactor  # the installed reactor provides every IReactor* interface
    handler = configure_log(settings.log, worker=worker.number if worker else None)
    service = Service(
        settings,
        reactor,
        inherited=worker.sockets if worker else None,
        workers=worker.count if worker else 1,
    )
    notify: Notifier | SupervisorLink = SupervisorLink(worker) if worker else Notifier()
    exit_code = 0
    stopping = False
    grace = settings.serve.shutdown_grace.total_seconds()

    @provider(ILogObserver)
    def warning(event: dict) -> None:
        """Our modules' Twisted log warnings (tls.py: an upstream certificate), one line each."""
        namespace = str(event.get("log_namespace") or "")
        if event.get("log_level") == LogLevel.warn and namespace.startswith("proxy."):
            message = formatEvent(event)
            oplog.warning("%s", message)
            service.audit.event("warning", message=message)

    def stop_reactor() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:  # already stopping
            pass

    def drain_then_stop() -> None:
        notify.stopping("draining")
        d = defer.ensureDeferred(service.drain(grace)) if listening else defer.succeed(None)
        d.addBoth(lambda _: stop_reactor())

    def on_signal(number: int, frame: Any) -> None:
        nonlocal stopping
        if stopping:  # the second one: no grace
            for other in (signal.SIGTERM, signal.SIGINT):
                signal.signal(other, lambda *_: None)
            reactor.callFromThread(stop_reactor)
            return
        stopping = True
        reactor.callFromThread(drain_then_stop)

    def supervisor_gone() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            oplog.warning("the supervisor is gone; stopping")
            drain_then_stop()

    listening = False

    def reload() -> None:
        notify.reloading()
        oplog.info("reloading (SIGHUP)")
        service.reload()
        notify.ready("reloaded")

    def started(_: object) -> None:
        nonlocal listening
        listening = True
        oplog.info("%s", service.describe())
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))
        if isinstance(notify, SupervisorLink):
            notify.share_cache(service.authenticator.cache, service.metrics.verified_shared)
        notify.ready(f"serving {len(service.ports)} listeners")
        notify.start_watchdog(reactor)
        if ready is not None:
            ready(service)

    def failed(failure: Any) -> None:
        nonlocal exit_code
        if stopping:  # a start cut short by a stop is not a failure
            return
        exc = failure.value
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, CannotListenError):
            host = f"[{exc.interface}]" if ":" in exc.interface else exc.interface
            error = exc.socketError.strerror if exc.socketError is not None else "in use"
            reason = f"cannot listen on {host}:{exc.port} ({error}){in_use_hint}"
        sys.stderr.write(f"{name}: cannot start: {reason}\n")
        exit_code = 1
        stop_reactor()

    def run() -> None:
        # Twisted's own handlers call reactor.stop() on every signal: a second one while
        # stopping raises ReactorNotRunning, and after the reactor stopped they do nothing.
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, on_signal)
        if isinstance(notify, SupervisorLink):
            notify.connect(reactor, supervisor_gone)
        defer.ensureDeferred(service.start()).addCallback(started).addErrback(failed)

    async def stop() -> None:  # also after a start that failed midway: its pools must end
        if isinstance(notify, SupervisorLink):
            notify.ending()
        notify.stopping()
        notify.stop_watchdog()
        try:
            await service.stop()
        except Exception as exc:
            sys.stderr.write(f"{name}: while stopping: {exc or type(exc).__name__}\n")

    reactor.callWhenRunning(run)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop()))
    globalLogPublisher.addObserver(warning)
    try:
        reactor.run()
    finally:
        globalLogPublisher.removeObserver(warning)
        if listening:
            oplog.info("stopped")
        unconfigure_log(handler)
    if not stopping:  # a failed start: Twisted's handlers would now do nothing; end the exit
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda number, _: os._exit(128 + number))
    return exit_code
