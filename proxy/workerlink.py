"""A worker process's side of serve.workers (proxy/workers.py is the supervisor): which worker it
is, the listening sockets the supervisor bound and passed on, and the link to the supervisor.

The link stands in for systemd's notifications (proxy/sdnotify.py has the same methods): a
worker tells the supervisor that it is ready, reloading or stopping and, while its reactor
turns, that it is alive; only the supervisor speaks to systemd. When the link closes the
supervisor is gone, and the worker drains as on SIGTERM rather than serve on unsupervised.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, task

# How often a ready worker tells the supervisor it is alive: the supervisor restarts one that
# stays silent for systemd's watchdog interval (30 s in systemd/apppass.service).
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor told a worker on its command line."""

    number: int  # 1 … count, shown in its log lines
    count: int  # how many workers share the listeners (each holds its part of the caps)
    link: int  # file descriptor of its end of the link
    sockets: dict[str, int] = field(default_factory=dict)  # listener name -> listening socket

    @classmethod
    def parse(cls, number: int, count: int, link: int, listen: list[str]) -> WorkerRole:
        sockets = {}
        for item in listen:
            name, _, fd = item.rpartition("=")
            sockets[name] = int(fd)
        return cls(number, count, link, sockets)

    def argv(self) -> list[str]:
        """The `apppass serve` options that give a worker this role."""
        out = ["--worker", str(self.number), "--workers", str(self.count), "--link", str(self.link)]
        for name, fd in self.sockets.items():
            out += ["--listen", f"{name}={fd}"]
        return out


class _Link(protocol.Protocol):
    def __init__(self, lost: Callable[[], None]) -> None:
        self.lost: Callable[[], None] | None = lost

    def dataReceived(self, data: bytes) -> None:
        """The supervisor says nothing on the link: its word comes as signals."""

    def connectionLost(self, reason: Any = None) -> None:
        if self.lost is not None:
            self.lost()


class SupervisorLink:
    """Notifier's methods (proxy/sdnotify.py), told to the supervisor one word a line."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role
        self._transport: Any = None
        self._link: _Link | None = None
        self._loop: task.LoopingCall | None = None

    def connect(self, reactor: Any, lost: Callable[[], None]) -> None:
        """Adopt the link; `lost` runs when the supervisor's end closes."""
        link = self._link = _Link(lost)
        factory = protocol.Factory.forProtocol(lambda: link)
        self._transport = reactor.adoptStreamConnection(self.role.link, socket.AF_UNIX, factory)
        os.close(self.role.link)  # the reactor holds its own copy

    def ending(self) -> None:
        """The worker stops on its own: the link closing with it is no news."""
        if self._link is not None:
            self._link.lost = None

    def send(self, word: str) -> None:
        if self._transport is not None and self._transport.connected:
            self._transport.write(word.encode() + b"\n")

    def ready(self, status: str) -> None:
        self.send("ready")

    def reloading(self) -> None:
        self.send("reloading")

    def stopping(self, status: str = "stopping") -> None:
        self.send("stopping")

    def start_watchdog(self, reactor: Any) -> None:
        self._loop = task.LoopingCall(self.send, "alive")
        self._loop.clock = reactor
        self._loop.start(HEARTBEAT_SECONDS, now=True)

    def stop_watchdog(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
