"""Plumbing shared by the test-server fixtures: ports, short temp dirs, processes.

Every real server the integration tests start (Dovecot, Postfix, slapd, Samba) runs
from a generated config in a short folder under /tmp, listens on 127.0.0.1 high ports and is
stopped by PID. Nothing here sleeps to synchronise: readiness is polled against a deadline.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

LOOPBACK = "127.0.0.1"

# Unix socket paths are limited by sun_path: 108 bytes on Linux (unix(7)), including the NUL.
# Dovecot and Postfix put sockets a few levels below their folders, so those folders stay short.
UNIX_PATH_MAX = 107

# How many lines of a server's log an error message quotes.
LOG_TAIL_LINES = 40

# Readiness polling: how often, and how long by default. A cold Dovecot or Postfix start is
# about 0.1-0.3 s here; the deadline is generous for a loaded CI machine.
POLL_INTERVAL = 0.02
DEFAULT_DEADLINE = 30.0

# Test ports come from below the kernel's ephemeral range (ip_local_port_range, 32768-60999
# by default), so an outgoing connection can never take a port between its allocation and
# the server's bind.
PORT_RANGE_LOW = 20000
PORT_RANGE_HIGH_DEFAULT = 32767

# After SIGKILL, how long to wait for the kernel to reap a process.
STOP_KILL_WAIT = 10.0
# With signal_group, SIGTERM is repeated this often until the leader exits.
STOP_RESIGNAL_INTERVAL = 0.2

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-test-deps"

T = TypeVar("T")


class ServerError(RuntimeError):
    """A test server failed to start, stay up or do what a fixture asked."""


# --- ports --------------------------------------------------------------------------------

_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return PORT_RANGE_HIGH_DEFAULT + 1
    return low


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on host:port (bound the way servers bind, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    """A loopback TCP port that is free now and was not handed out before in this process."""
    high = min(_ephemeral_low() - 1, 65535)
    low = PORT_RANGE_LOW if high > PORT_RANGE_LOW + 1000 else 1024
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randint(low, high)
        if port in _handed_out:
            continue
        if port_is_free(port, host):
            _handed_out.add(port)
            return port
    raise ServerError(f"no free port found in {low}-{high} on {host}")


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    return [free_port(host) for _ in range(count)]


# --- waiting ------------------------------------------------------------------------------


def wait_until(
    condition: Callable[[], T | None],
    timeout: float = DEFAULT_DEADLINE,
    what: str = "condition",
    interval: float = POLL_INTERVAL,
    process: ServerProcess | None = None,
) -> T:
    """Poll condition() until it returns something truthy, and return that.

    Raises ServerError when the deadline passes, or at once when process (if given) has
    exited, quoting the tail of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if process is not None and not process.running:
            raise ServerError(
                f"{process.name} exited (status {process.returncode}) while waiting for "
                f"{what}\n{process.log_tail()}"
            )
        if time.monotonic() >= deadline:
            tail = f"\n{process.log_tail()}" if process is not None else ""
            raise ServerError(f"timed out after {timeout:.1f}s waiting for {what}{tail}")
        time.sleep(interval)


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    host: str = LOOPBACK,
    timeout: float = DEFAULT_DEADLINE,
    process: ServerProcess | None = None,
) -> None:
    """Wait until host:port accepts a TCP connection."""
    wait_until(
        lambda: port_accepts(port, host), timeout, f"{host}:{port} to accept", process=process
    )


def unix_socket_accepts(path: str | os.PathLike[str]) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(os.fspath(path))
            return True
    except OSError:
        return False


def wait_for_unix_socket(
    path: str | os.PathLike[str],
    timeout: float = DEFAULT_DEADLINE,
    process: ServerProcess | None = None,
) -> None:
    wait_until(lambda: unix_socket_accepts(path), timeout, f"unix socket {path}", process=process)


# --- folders ------------------------------------------------------------------------------


def short_tempdir(prefix: str, mode: int = 0o755) -> Path:
    """A fresh folder directly under /tmp (short, so unix sockets inside fit in 108 bytes).

    mkdtemp makes it 0700; servers that drop privileges must traverse it, hence mode.
    """
    path = Path(os.path.realpath(tempfile.mkdtemp(prefix=prefix, dir="/tmp")))
    path.chmod(mode)
    return path


def check_socket_path(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if len(text.encode()) > UNIX_PATH_MAX:
        raise ServerError(f"unix socket path too long ({len(text)} > {UNIX_PATH_MAX}): {text}")
    return text


def remove_tree(path: Path) -> None:
    """Remove a server folder unless APPPASS_KEEP_SERVERS is set (to read logs afterwards)."""
    if os.environ.get("APPPASS_KEEP_SERVERS"):
        return
    shutil.rmtree(path, ignore_errors=True)


def chown(path: Path, user: str, group: str | None = None) -> None:
    shutil.chown(path, user, group if group is not None else user)


# --- log files ----------------------------------------------------------------------------


class LogFile:
    """A server's log file, read from a mark so a test sees only what it caused."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The current end of the log, to pass as since= later."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, mark: int) -> str:
        try:
            with self.path.open("rb") as fh:
                fh.seek(mark)
                return fh.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(
        self, needle: str | Callable[[str], bool], since: int = 0, timeout: float = 10.0
    ) -> str:
        """Wait until the log (from since) contains needle, or satisfies it; return that text."""
        if isinstance(needle, str):

            def found(text: str) -> bool:
                return needle in text

            what = f"{needle!r} in {self.path}"
        else:
            found = needle
            what = f"a matching entry in {self.path}"

        def check() -> str | None:
            text = self.since(since)
            return text if found(text) else None

        try:
            return wait_until(check, timeout, what)
        except ServerError as exc:
            recent = self.since(since)[-4000:]
            raise ServerError(f"{exc}\n--- {self.path} since mark ---\n{recent}") from None


# --- processes ----------------------------------------------------------------------------


class ServerProcess:
    """One foreground server process in its own process group, with output captured to a file.

    stop() sends SIGTERM to the process (or to its whole group with signal_group: Dovecot's
    master sleeps a second at shutdown unless its children are already gone), gives it
    stop_grace seconds, then kills whatever is left of the group with SIGKILL (children that
    outlived their master, or a master still waiting for children that were themselves
    still starting when the signal came). Every started process is also stopped at
    interpreter exit, as a backstop for a crashed test session.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        output: Path,
        logs: Iterable[Path] = (),
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        signal_group: bool = False,
        stop_grace: float = 10.0,
    ) -> None:
        self.name = name
        self.signal_group = signal_group
        self.stop_grace = stop_grace
        self.argv = list(argv)
        self.output = output
        self.logs = [LogFile(p) for p in logs]
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def start(self) -> None:
        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        with self.output.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        _live.add(self)

    def stop(self) -> None:
        """SIGTERM, up to stop_grace seconds to exit, then SIGKILL for the whole group."""
        popen = self.popen
        if popen is None:
            return
        pgid = popen.pid  # start_new_session: the process group is the leader's pid
        deadline = time.monotonic() + self.stop_grace
        while popen.poll() is None:
            # A child that was still starting may have missed the first SIGTERM to the group:
            # send it again now and then, until the deadline.
            try:
                if self.signal_group:
                    os.killpg(pgid, signal.SIGTERM)
                else:
                    popen.terminate()
            except ProcessLookupError:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                _kill_group(pgid)
                popen.kill()
                popen.wait(STOP_KILL_WAIT)
                break
            try:
                popen.wait(
                    min(remaining, STOP_RESIGNAL_INTERVAL) if self.signal_group else remaining
                )
            except subprocess.TimeoutExpired:
                pass
        # Children that outlived the leader (they share its process group).
        _kill_group(pgid)
        _live.discard(self)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        parts = []
        for log in [LogFile(self.output), *self.logs]:
            text = log.tail(lines)
            parts.append(f"--- {log.path} (last {lines} lines) ---\n{text or '(empty)'}")
        return "\n".join(parts)


_live: set[ServerProcess] = set()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _stop_leftovers() -> None:
    for process in list(_live):
        process.stop()


def run_checked(
    argv: Sequence[str], what: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> str:
    """Run a short command; on failure raise ServerError with its output."""
    proc = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=timeout
    )
    if proc.returncode != 0:
        raise ServerError(
            f"{what} failed (exit {proc.returncode}): {' '.join(map(str, argv))}\n"
            f"{proc.stdout}{proc.stderr}"
        )
    return proc.stdout + proc.stderr


# --- packages -----------------------------------------------------------------------------


def ensure_installed(paths: Iterable[str]) -> None:
    """Run scripts/install-test-deps when any of these executables is missing."""
    missing = [p for p in paths if not (os.path.exists(p) or shutil.which(p))]
    if not missing:
        return
    run_checked(
        ["bash", str(INSTALL_SCRIPT)], f"installing test packages (missing {missing})", timeout=900
    )
    still = [p for p in missing if not (os.path.exists(p) or shutil.which(p))]
    if still:
        raise ServerError(f"still missing after {INSTALL_SCRIPT}: {still}")
