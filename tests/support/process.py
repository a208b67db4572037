"""Running a real `apppass` command in a test: its output in files, waits with deadlines."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.common import free_port, port_accepts

APPPASS = Path(sys.executable).parent / "apppass"

# A start, or a stop, is well under a second here; the deadline is for a loaded CI machine.
PROMPTLY = 15.0


@contextlib.contextmanager
def taken_port() -> Iterator[int]:
    """A loopback port that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock.getsockname()[1]


class Process:
    """A real apppass command; stdout and stderr go to files (a pipe nobody reads can block)."""

    def __init__(self, folder: Path, *args: str, env: dict[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout", folder / "stderr"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.popen = subprocess.Popen(
                [str(APPPASS), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env
            )

    def wait(self, timeout: float = PROMPTLY) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            pytest.fail(f"still running {timeout:g}s later; stderr:\n{self.stderr}")

    def wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + PROMPTLY
        while not port_accepts(port):
            assert self.popen.poll() is None, f"exited early; stderr:\n{self.stderr}"
            assert time.monotonic() < deadline, f"not listening on {port}; stderr:\n{self.stderr}"
            time.sleep(0.05)

    def signal(self, *signals: signal.Signals) -> None:
        for number in signals:
            self.popen.send_signal(number)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
