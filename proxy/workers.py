"""`apppass serve` with serve.workers above 1: a small supervisor. It binds every listening
socket (mail and web) itself, migrates the store once, and starts that many worker processes
(`apppass serve --worker N`, proxy/workerlink.py) that adopt the sockets and each run their own
reactor, thread pools and argon2 pool. It restarts a worker that dies (with a back-off, giving up
when one keeps dying during its start), passes SIGHUP, SIGTERM and SIGINT on, and alone speaks to
systemd: READY=1 once every worker is ready, the watchdog from its own loop (a worker that stops
answering is killed and restarted). Why inherited sockets and not SO_REUSEPORT:
docs/architecture.md, "Worker processes".

The supervisor runs no reactor: one select loop over the workers' links and a signal pipe.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config import Settings
from proxy.metrics import MULTIPROCESS_DIR
from proxy.oplog import configure as configure_log
from proxy.oplog import log as oplog
from proxy.oplog import unconfigure as unconfigure_log
from proxy.reloading import applied_live, needs_restart, read_again, report_restart, set_log_level
from proxy.sdnotify import Notifier
from proxy.workerlink import KEY, VERIFIED, WorkerRole

# Restart back-off: a worker that dies soon after its start waits 0.25 s, then twice as long
# each time, up to 30 s (systemd's RestartSec=100ms with RestartSteps and RestartMaxDelaySec
# grows the same way); one that ran this long before dying is restarted at once.
RESTART_FIRST_SECONDS = 0.25
RESTART_MAX_SECONDS = 30.0
STABLE_SECONDS = 10.0  # systemd's StartLimitIntervalSec default

# A worker that dies before it is ready this many times in a row: the supervisor gives up
# (systemd's StartLimitBurst default).
MAX_START_FAILURES = 5

# The longest the loop sleeps: restarts and watchdog pings are due within this.
LOOP_SECONDS = 1.0

# The signals the supervisor handles; each wakes the loop through a pipe.
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)

# Lines waiting for a worker that does not read its link are dropped past this (cache entries:
# a worker without one verifies the code itself).
OUTBOX_MAX = 256 * 1024

# What a worker inherits that only the supervisor may use: systemd's socket and watchdog.
NOT_FOR_WORKERS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def available_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The CPUs this process may use: its affinity mask (a cpuset), and no more than its
    cgroup's CPU quota allows (`docker run --cpus=2`, Kubernetes CPU limits, systemd's
    CPUQuota=), which the affinity mask does not show."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    return cpus if quota is None else max(1, min(cpus, quota))


def cgroup_cpu_quota(root: str, own: str = "/proc/self/cgroup") -> int | None:
    """The smallest CPU quota (cgroup v2 `cpu.max`: quota and period in microseconds) on the
    way from this process's cgroup up to the root, rounded up to whole CPUs; None without one
    (no limit, cgroup v1, or files that cannot be read)."""
    try:
        with open(own) as lines:
            path = next((ln[3:].strip() for ln in lines if ln.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    limits = []
    parts = [p for p in path.split("/") if p and p != ".."]
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(root, *parts[:depth], "cpu.max")) as f:
                quota, period = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            limits.append(-(-int(quota) // int(period)))
    return min(limits) if limits else None


def resolve_workers(setting: int | str, cpus: Callable[[], int] = available_cpus) -> int:
    """serve.workers as a number: `auto` is one per available CPU."""
    if setting == "auto":
        return max(1, cpus())
    return int(setting)


class Backoff:
    """When to restart one worker slot after its worker died."""

    def __init__(self) -> None:
        self.quick = 0  # deaths in a row soon after a start
        self.start_failures = 0  # deaths in a row before ready

    def exited(self, *, was_ready: bool, uptime: float) -> float | None:
        """Seconds to wait before the next start, or None: give up."""
        if was_ready and uptime >= STABLE_SECONDS:
            self.quick = self.start_failures = 0
            return 0.0
        self.start_failures = 0 if was_ready else self.start_failures + 1
        if self.start_failures >= MAX_START_FAILURES:
            return None
        self.quick += 1
        return min(RESTART_MAX_SECONDS, RESTART_FIRST_SECONDS * 2 ** (self.quick - 1))


def describe_exit(status: int) -> str:
    """A Popen return code in words."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"


class CannotStart(Exception):
    """The supervisor cannot start (a port in use, the store unreachable)."""


def bind_listeners(settings: Settings) -> dict[str, socket.socket]:
    """One listening socket per mail and web listener, as Twisted's own ports would bind it."""
    from proxy.service import LISTEN_BACKLOG

    sockets: dict[str, socket.socket] = {}
    listeners: list[Any] = [*settings.listeners, *settings.web.listeners]
    for listener in listeners:
        family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted does
            sock.bind((listener.host, listener.port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)  # shared by the workers' reactors
        except OSError as exc:
            sock.close()
            for other in sockets.values():
                other.close()
            host = f"[{listener.host}]" if ":" in listener.host else listener.host
            raise CannotStart(
                f"cannot listen on {host}:{listener.port} ({exc.strerror or exc})"
            ) from None
        sockets[listener.name] = sock
    return sockets


def migrate_store(settings: Settings) -> None:
    """Bring the store's schema up to date once, before the workers open it together."""
    from proxy.codes.open import open_store

    try:
        open_store(settings.store).close()
    except Exception as exc:  # StoreUnavailable, or a schema newer than this apppass
        raise CannotStart(str(exc) or type(exc).__name__) from None


# The supervisor's metrics folder in the temporary directory: this, its pid, a random part.
METRICS_PREFIX = "apppass-metrics-"


@dataclass
class Worker:
    """One worker slot: the process now in it, and its restart history."""

    number: int
    backoff: Backoff = field(default_factory=Backoff)
    popen: subprocess.Popen | None = None
    link: socket.socket | None = None
    pending: bytes = b""  # read from the link, short of a line
    outbox: bytes = b""  # lines for the worker its link has not taken yet
    ready: bool = False
    started: float = 0.0
    heard: float = 0.0
    restart_at: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else 0


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        count: int,
        sockets: dict[str, socket.socket],
        notify: Notifier,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.count = count
        self.sockets = sockets
        self.notify = notify
        self.clock = clock
        self.workers = [Worker(n) for n in range(1, count + 1)]
        remove_stale_metrics(tempfile.gettempdir())
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_PREFIX}{os.getpid()}-")
        self.env = {k: v for k, v in os.environ.items() if k not in NOT_FOR_WORKERS}
        self.env[MULTIPROCESS_DIR] = self.metrics_dir
        self.signals: list[int] = []
        self.stopping = False
        self.exit_code = 0
        self.all_ready = False
        self.reloading: set[int] = set()  # workers whose reload is not done
        self.next_ping = 0.0
        self.cache_key = os.urandom(32)  # the workers' shared verified cache (workerlink.py)

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_write.fileno(), warn_on_full_buffer=False)
        old = {number: signal.signal(number, self._on_signal) for number in HANDLED}
        try:
            for worker in self.workers:
                self._start(worker)
            while not (self.stopping and not self._alive()):
                self._step(wake_read)
        finally:
            for number, handler in old.items():
                signal.signal(number, handler)
            signal.set_wakeup_fd(old_wakeup)
            wake_read.close()
            wake_write.close()
            self._close_sockets()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.exit_code

    def _on_signal(self, number: int, frame: Any) -> None:
        self.signals.append(number)

    def _step(self, wake: socket.socket) -> None:
        links = {w.link: w for w in self.workers if w.link is not None}
        waiting = [link for link, w in links.items() if w.outbox]
        readable, writable, _ = select.select([wake, *links], waiting, [], self._timeout())
        for sock in writable:
            self._flush(links[sock])
        for sock in readable:
            if sock is wake:
                try:
                    while wake.recv(512):
                        pass
                except BlockingIOError:
                    pass
            else:
                self._heard(links[sock])
        while self.signals:
            self._signalled(self.signals.pop(0))
        now = self.clock()
        for worker in self.workers:
            if worker.popen is not None and worker.popen.poll() is not None:
                self._exited(worker, now)
            elif (
                worker.popen is None and worker.restart_at is not None and worker.restart_at <= now
            ):
                self._start(worker)
        self._watchdog(now)

    def _timeout(self) -> float:
        now = self.clock()
        due = [w.restart_at for w in self.workers if w.popen is None and w.restart_at is not None]
        soonest = min([now + LOOP_SECONDS, *due])
        if self.notify.watchdog_seconds > 0:
            soonest = min(soonest, self.next_ping)
        return max(0.0, soonest - now)

    def _alive(self) -> list[Worker]:
        return [w for w in self.workers if w.popen is not None]

    # -- workers ---------------------------------------------------------------------------------

    def _start(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair()
        ours.sendall(KEY + self.cache_key.hex().encode() + b"\n")  # there before the worker reads
        theirs.setblocking(False)
        role = WorkerRole(
            worker.number,
            self.count,
            theirs.fileno(),
            {name: sock.fileno() for name, sock in self.sockets.items()},
        )
        argv = [sys.executable, "-m", "proxy.cli", "-c", str(self.settings.source), "serve"]
        try:
            worker.popen = subprocess.Popen(
                [*argv, *role.argv()],
                stdin=subprocess.DEVNULL,
                pass_fds=(role.link, *role.sockets.values()),
                env=self.env,
                # Its own process group: a terminal's Ctrl-C reaches the supervisor only, which
                # passes it on once (a second SIGINT would cut the workers' grace short).
                start_new_session=True,
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.link, worker.pending, worker.outbox, worker.ready = ours, b"", b"", False
        worker.started = worker.heard = self.clock()
        worker.restart_at = None
        oplog.info("worker %d started (pid %d)", worker.number, worker.pid)

    def _heard(self, worker: Worker) -> None:
        assert worker.link is not None
        try:
            data = worker.link.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the worker is ending; its exit is seen by poll()
            worker.link.close()
            worker.link = None
            return
        worker.heard = self.clock()
        *words, worker.pending = (worker.pending + data).split(b"\n")
        for word in words:
            if word == b"ready":
                self._worker_ready(worker)
            elif word.startswith(VERIFIED):
                self._pass_on(worker, word + b"\n")

    def _pass_on(self, source: Worker, line: bytes) -> None:
        """A cache entry one worker verified, for every other worker."""
        for worker in self.workers:
            if worker is not source and worker.link is not None:
                if len(worker.outbox) < OUTBOX_MAX:
                    worker.outbox += line
                self._flush(worker)

    def _flush(self, worker: Worker) -> None:
        """Write what the link takes now; select() says when it takes the rest."""
        assert worker.link is not None
        try:
            sent = worker.link.send(worker.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # the worker is ending; its exit is seen by poll()
            sent = len(worker.outbox)
        worker.outbox = worker.outbox[sent:]

    def _worker_ready(self, worker: Worker) -> None:
        first = not worker.ready
        worker.ready = True
        if first:
            oplog.info("worker %d (pid %d) is ready", worker.number, worker.pid)
        self.reloading.discard(worker.number)
        if not self.all_ready and all(w.ready for w in self.workers):
            self.all_ready = True
            oplog.info("serving with %d workers", self.count)
            self.notify.ready(f"serving with {self.count} workers")
        elif self.all_ready and not first and not self.reloading and not self.stopping:
            self.notify.ready("reloaded")

    def _exited(self, worker: Worker, now: float) -> None:
        assert worker.popen is not None
        status, pid = worker.popen.returncode, worker.pid
        what = describe_exit(status)
        if worker.link is not None:
            worker.link.close()
        worker.popen, worker.link = None, None
        self.reloading.discard(worker.number)
        _forget_metrics(pid, self.metrics_dir)
        if self.stopping:
            oplog.info("worker %d (pid %d) %s", worker.number, pid, what)
            return
        delay = worker.backoff.exited(was_ready=worker.ready, uptime=now - worker.started)
        if delay is None:
            oplog.error(
                "worker %d (pid %d) %s before it was ready, %d times in a row; giving up",
                worker.number,
                pid,
                what,
                MAX_START_FAILURES,
            )
            sys.stderr.write(
                f"apppass: cannot start: worker {worker.number} {what} before it was ready, "
                f"{MAX_START_FAILURES} times in a row (its reason is above)\n"
            )
            self.exit_code = 1
            self._stop(signal.SIGTERM)
            return
        when = f" in {delay:g}s" if delay else ""
        oplog.warning("worker %d (pid %d) %s; restarting it%s", worker.number, pid, what, when)
        worker.restart_at = now + delay

    # -- signals and systemd ---------------------------------------------------------------------

    def _signalled(self, number: int) -> None:
        if number == signal.SIGCHLD:
            return  # the loop polls every worker
        if number == signal.SIGHUP:
            if self.stopping:
                return
            oplog.info("reloading (SIGHUP): passing it on (%d workers running)", len(self._alive()))
            self.notify.reloading()
            self._reload_config()
            self.reloading = {w.number for w in self._alive() if w.ready}
            self._send(signal.SIGHUP)
            if not self.reloading:
                self.notify.ready("reloaded")
            return
        self._stop(number)

    def _reload_config(self) -> None:
        """The supervisor's own share of a reload: its log level, and saying once (not once
        per worker) what needs a restart or that the file has errors."""
        new = read_again(self.settings)
        if new is None:
            return
        if new.log.level != self.settings.log.level:
            set_log_level(new.log.level)
        report_restart(needs_restart(self.settings, new))
        self.settings = applied_live(self.settings, new)

    def _stop(self, number: int) -> None:
        """The first SIGTERM/SIGINT drains every worker; a later one cuts their grace short."""
        if not self.stopping:
            self.stopping = True
            name = signal.Signals(number).name
            oplog.info("stopping (%s): draining the workers (%d running)", name, len(self._alive()))
            self.notify.stopping("draining")
            self._close_sockets()  # the port closes once every worker has closed its copy
            for worker in self.workers:
                worker.restart_at = None
        self._send(number)

    def _send(self, number: int) -> None:
        for worker in self._alive():
            try:
                os.kill(worker.pid, number)
            except ProcessLookupError:
                pass  # it just ended; poll() will say so

    def _watchdog(self, now: float) -> None:
        """Ping systemd from this loop; kill a ready worker that went silent (a hung reactor)."""
        limit = self.notify.watchdog_seconds
        if limit <= 0:
            return
        if now >= self.next_ping:
            self.notify.send("WATCHDOG=1")
            self.next_ping = now + limit / 2
        for worker in self._alive():
            if worker.ready and not self.stopping and now - worker.heard > limit:
                oplog.error(
                    "worker %d (pid %d) has not answered for %.0fs; killing it",
                    worker.number,
                    worker.pid,
                    now - worker.heard,
                )
                worker.heard = now  # once: its exit comes next
                os.kill(worker.pid, signal.SIGKILL)

    def _close_sockets(self) -> None:
        for sock in self.sockets.values():
            sock.close()


def remove_stale_metrics(folder: str) -> None:
    """Remove the metrics folders of supervisors that no longer run: one killed with SIGKILL
    (or by the OOM killer) had no chance to remove its own."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        found = re.fullmatch(rf"{METRICS_PREFIX}(\d+)-\w+", entry.name)
        try:
            if not found or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(found.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue  # alive (another user's pid now), or gone meanwhile


def _forget_metrics(pid: int, folder: str) -> None:
    """A dead worker's live gauges leave the sums (its counters stay: totals include them)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, folder)


def supervise(settings: Settings, count: int) -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit status as `serve`'s."""
    handler = configure_log(settings.log)
    sockets: dict[str, socket.socket] = {}
    try:
        try:
            sockets = bind_listeners(settings)
            migrate_store(settings)
        except CannotStart as exc:
            for sock in sockets.values():
                sock.close()
            sys.stderr.write(f"apppass: cannot start: {exc}\n")
            return 1
        oplog.info("starting %d workers", count)
        code = Supervisor(settings, count, sockets, Notifier()).run()
        oplog.info("stopped")
        return code
    finally:
        unconfigure_log(handler)


def serve_or_supervise(settings: Settings, args: Any) -> int:
    """`apppass serve`: one process (serve.workers 1), a worker (--worker, from the
    supervisor), or the supervisor of serve.workers processes."""
    from proxy.daemon import serve

    if args.worker is not None:
        role = WorkerRole.parse(args.worker, args.workers, args.link, args.listen)
        return serve(settings, name=f"apppass worker {role.number}", worker=role)
    count = resolve_workers(settings.serve.workers)
    return supervise(settings, count) if count > 1 else serve(settings)
