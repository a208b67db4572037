"""Telling systemd how the daemon is doing (sd_notify(3)), without a library: READY=1 once the
listeners are bound and the store is migrated, RELOADING=1 / READY=1 around a reload,
STOPPING=1, STATUS= lines, and the watchdog ping while the reactor turns.

Outside systemd (no $NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import task


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written "@name" and means "\0name".
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_seconds = int(env.get("WATCHDOG_USEC", "0") or 0) / 1_000_000
        self._loop: task.LoopingCall | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                pass  # systemd went away: nothing to tell

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", "STATUS=reloading")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def start_watchdog(self, reactor: Any) -> None:
        """Ping at half the watchdog interval from the reactor: a hung reactor stops the pings
        and systemd restarts the daemon."""
        if not self.address or self.watchdog_seconds <= 0:
            return
        self._loop = task.LoopingCall(self.send, "WATCHDOG=1")
        self._loop.clock = reactor
        self._loop.start(self.watchdog_seconds / 2, now=True)

    def stop_watchdog(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
