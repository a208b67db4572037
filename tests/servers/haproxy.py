"""HAProxy 2.6 for integration tests, run from the shipped example (deploy/haproxy.cfg) with its
addresses moved to loopback high ports, so that the example itself is what the tests exercise.

`from_example` changes only where things are, line by line:

    bind :PORT …                   in frontend F  ->  bind 127.0.0.1:<binds[F]> …
    … crt PATH …                                  ->  … crt <crt> …  (the test's cert and key)
    server NAME HOST:PORT …        in backend B   ->  server NAME 127.0.0.1:<node.ports[B]>
                                                      port <node.health> …
    global                                        +   stats socket <stats>  (to read UP/DOWN)

and, where the hard open-files limit is too low for the example's `maxconn`, HAProxy runs with
`-n` (its connection limit) lowered to fit.

Balancing, timeouts, health checks, retries, PROXY protocol and HTTP headers stay the
example's. A frontend, backend or server of the example that the test does not map, or a
mapping the example does not use, is an error: a test never runs an outdated copy.

    haproxy.cfg   the generated config     output.log   HAProxy's warnings and alerts
    stats         the stats socket (`show stat`: each server's state)
"""

from __future__ import annotations

import csv
import io
import re
import resource
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tests.servers.common import (
    LOOPBACK,
    REPO_ROOT,
    ServerError,
    ServerProcess,
    check_socket_path,
    ensure_installed,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_for_port,
    wait_until,
)

HAPROXY = "/usr/sbin/haproxy"
EXAMPLE = REPO_ROOT / "deploy" / "haproxy.cfg"

# HAProxy stops at once on SIGTERM (a hard stop: its sessions are cut).
STOP_GRACE = 5.0

# HAProxy wants two descriptors per connection plus some of its own (listeners, checks, logs),
# and refuses to start when `global maxconn` needs more than the hard open-files limit allows
# (a container's can be 20000): then `-n` lowers the connection limit to what fits.
FDS_PER_CONNECTION = 2
FDS_OWN = 100

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers)\b\s*(\S*)")
_BIND = re.compile(r"^(\s+bind\s+)\S*:\d+(.*)$")
_SERVER = re.compile(r"^(\s+server\s+)(\S+)\s+\S+:\d+(.*)$")
_CRT = re.compile(r"(\bcrt\s+)\S+")
_MAXCONN = re.compile(r"^\s+maxconn\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class NodePorts:
    """Where one node of the example (`server NAME …`) listens in a test: its port for each
    backend, and the port of its web listener that serves /readyz (the health checks)."""

    ports: Mapping[str, int]
    health: int


def from_example(
    example: str,
    binds: Mapping[str, int],
    nodes: Mapping[str, NodePorts],
    crt: Path,
    stats: Path,
) -> str:
    """The example with its frontends bound to 127.0.0.1:binds[frontend], its servers at
    127.0.0.1 on the test's ports, `crt` as its certificate and a stats socket (module doc)."""
    out: list[str] = []
    section, name = "", ""
    seen_binds: set[str] = set()
    seen_servers: set[tuple[str, str]] = set()
    for line in example.splitlines():
        if found := _SECTION.match(line):
            section, name = found.group(1), found.group(2)
            out.append(line)
            if section == "global":
                out.append(f"    stats socket {check_socket_path(stats)} level user")
            continue
        line = _CRT.sub(lambda m: f"{m.group(1)}{crt}", line)
        if (bind := _BIND.match(line)) and section == "frontend":
            if name not in binds:
                raise ServerError(f"{EXAMPLE.name}: frontend {name} has no test port")
            seen_binds.add(name)
            line = f"{bind.group(1)}{LOOPBACK}:{binds[name]}{bind.group(2)}"
        elif (server := _SERVER.match(line)) and section == "backend":
            node = nodes.get(server.group(2))
            if node is None or name not in node.ports:
                raise ServerError(
                    f"{EXAMPLE.name}: backend {name} server {server.group(2)} unmapped"
                )
            seen_servers.add((server.group(2), name))
            port = node.ports[name]
            line = f"{server.group(1)}{server.group(2)} {LOOPBACK}:{port} port {node.health}"
            line += server.group(3)
        out.append(line)
    unused = set(binds) - seen_binds
    unused_servers = {(n, b) for n, node in nodes.items() for b in node.ports} - seen_servers
    if unused or unused_servers:
        raise ServerError(
            f"{EXAMPLE.name} has no frontend {sorted(unused)} / servers {sorted(unused_servers)}"
        )
    return "\n".join(out) + "\n"


def _connection_limit(config: str) -> list[str]:
    """`-n N` when the config's first maxconn (global) needs more descriptors than we have."""
    found = _MAXCONN.search(config)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if found is None or hard == resource.RLIM_INFINITY:
        return []
    fits = (hard - FDS_OWN) // FDS_PER_CONNECTION
    return ["-n", str(fits)] if int(found.group(1)) > fits else []


def ensure_haproxy() -> None:
    ensure_installed((HAPROXY,))


class HAProxy:
    """A private HAProxy (`haproxy -db`: foreground) from a generated config; stopped by PID."""

    def __init__(self, config: str, ports: list[int], root: Path) -> None:
        self.root = root
        self.ports = ports  # what it binds: start() waits for each
        self.config_path = root / "haproxy.cfg"
        self.config_path.write_text(config)
        self.process = ServerProcess(
            "haproxy",
            [HAPROXY, "-db", *_connection_limit(config), "-f", str(self.config_path)],
            output=root / "output.log",
            stop_grace=STOP_GRACE,
        )

    @classmethod
    def from_example(
        cls, binds: Mapping[str, int], nodes: Mapping[str, NodePorts], crt: Path
    ) -> HAProxy:
        root = short_tempdir("hx-")
        config = from_example(EXAMPLE.read_text(), binds, nodes, crt, root / "stats")
        return cls(config, list(binds.values()), root)

    @property
    def stats_path(self) -> Path:
        return self.root / "stats"

    def start(self, timeout: float = 30.0) -> None:
        ensure_haproxy()
        run_checked([HAPROXY, "-c", "-q", "-f", str(self.config_path)], "haproxy -c")
        self.process.start()
        try:
            for port in self.ports:
                wait_for_port(port, LOOPBACK, timeout, self.process)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.root)

    def server_states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> HAProxy's view of it: "UP", "DOWN", "UP 1/2" (going down)…"""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.stats_path))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {
            (row["pxname"], row["svname"]): row["status"]
            for row in rows
            if row.get("svname") not in (None, "FRONTEND", "BACKEND")
        }

    def wait_for_state(self, server: str, state: str, timeout: float = 15.0) -> None:
        """Until every backend's `server` is in `state` (UP or DOWN) as HAProxy sees it."""

        def reached() -> bool:
            mine = [s for (_, name), s in self.server_states().items() if name == server]
            return bool(mine) and all(s == state for s in mine)

        wait_until(reached, timeout, f"haproxy to see {server} {state}", process=self.process)

    def log_text(self) -> str:
        try:
            return (self.root / "output.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
