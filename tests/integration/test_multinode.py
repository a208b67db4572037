"""Several nodes, for real: two `apppass serve` processes (each its own config and ports) on one
PostgreSQL store, behind HAProxy run from the shipped deploy/haproxy.cfg (tests/servers/
haproxy.py moves its ports to loopback and changes nothing else), in front of the real Dovecot
and Postfix. Every client goes through HAProxy, from an address of its own in 127.0.0.0/8 that
HAProxy passes on with PROXY protocol v2.

What must hold across nodes: every frontend of the example reaches a node that sees the real
client; 200 logins racing for a code with max_uses=10 give exactly 10 sessions; a revocation
made with one node's config ends the code's sessions on every node within 2 s, each client
hearing `* BYE`; node1 killed with SIGKILL under load loses or doubles no use, HAProxy sends
new clients to node2, and node1 comes back cleanly.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest
import yaml

from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import Issued, issue_code
from proxy.codes.open import open_store
from proxy.codes.store import SqlCodeStore
from proxy.config import load
from proxy.directory.open import open_directory
from tests.integration.harness import FAST_ARGON2, USERS
from tests.servers.common import LOOPBACK, free_port, wait_until
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.servers.haproxy import HAProxy, NodePorts
from tests.servers.postgres import PgDatabase
from tests.support.cluster import Node
from tests.support.process import PROMPTLY

pytestmark = pytest.mark.integration

# The example's server names; node1 is the one the tests kill ("node A").
NODES = ("node1", "node2")
# The example's frontends (and so its backends): each maps to a node listener of that name.
MAIL_FRONTENDS = ("imaps", "pop3s", "submissions", "submission")
PORTAL = "portal"

# The issue's figures: 200 logins race for a code that allows 10 uses.
RACERS, MAX_USES = 200, 10
# A revocation ends sessions on every node within this (README "Revocation is immediate").
REVOKED_WITHIN = 2.0
# The load while node1 is killed: clients logging in one after another, each with a code of
# its own; node1 dies after KILL_AFTER logins succeeded, and the load runs on until as many
# more did. Every other code has max_uses=1 (a held place, then counted), the rest no limit.
WORKERS, KILL_AFTER, LOAD_CODES = 8, 20, 160
# HAProxy checks every 2 s and needs 2 answers either way (the example's inter, fall, rise).
CHECKS_NOTICE = 15.0


def source(group: int, index: int) -> str:
    """A client address of its own on loopback (never HAProxy's 127.0.0.1)."""
    return f"127.0.{group}.{index + 1}"


@dataclass
class Cluster:
    nodes: dict[str, Node]
    haproxy: HAProxy
    binds: dict[str, int]  # frontend -> HAProxy's port
    store: SqlCodeStore  # the test's own connection to the shared store
    database: PgDatabase
    tls: ssl.SSLContext  # a client's: trusts the test CA
    issuer: Callable[..., Issued]  # issue_code with node1's settings, on the shared store

    def issue(self, login: str, label: str, **kw) -> tuple[int, str]:
        """A new code, as `apppass codes create` on any node would make it: (id, code)."""
        issued = self.issuer(login=login, label=label, **kw)
        return issued.record.id, issued.code.grouped()


def node_config(
    folder: Path, database: PgDatabase, dovecot, postfix, test_ca, web: int, health: int
) -> dict:
    """A node's apppass.yaml: mail listeners named as the example's backends, each behind
    HAProxy on a port of its own; its ops listener on `health`, portal and API on `web`."""
    tls = {"cert_file": str(test_ca.cert), "key_file": str(test_ca.key)}
    behind = {"proxy_protocol_from": ["127.0.0.0/8"], **tls}

    def on_port() -> dict:
        return {"bind": f"{LOOPBACK}:{free_port()}", **behind}

    upstream = {"host": LOOPBACK, "tls": "starttls", "ca_file": str(test_ca.ca)}
    master = {"master_user": MASTER_USER, "master_password_file": str(folder.parent / "master")}
    return {
        "store": database.config(),
        "directory": {"static": str(folder.parent / "users.yaml")},
        "policy": {"legacy_group": "legacy-mail"},
        "codes": {"argon2": FAST_ARGON2, "max_per_account": 1000},
        "auth": {"failure_delay": "0s"},
        "audit": {"file": "audit.jsonl"},
        "serve": {"shutdown_grace": "1s"},
        "listeners": [
            {"name": "imaps", "protocol": "imap", "tls": "implicit", **on_port()},
            {"name": "pop3s", "protocol": "pop3", "tls": "implicit", **on_port()},
            {"name": "submissions", "protocol": "smtp", "tls": "implicit", **on_port()},
            {"name": "submission", "protocol": "smtp", "tls": "starttls", **on_port()},
        ],
        "upstream": {
            "imap": {**upstream, "port": dovecot.imap_port, **master},
            "pop3": {**upstream, "port": dovecot.pop3_port, **master},
            "smtp": {**upstream, "port": postfix.smtp_port, "login": "xclient"},
        },
        "web": {
            "listeners": [
                {"bind": f"{LOOPBACK}:{health}", "tls": "none", "serve": ["metrics", "health"]},
                {"bind": f"{LOOPBACK}:{web}", "tls": "none", "serve": ["portal", "api"]},
            ],
            "trusted_proxies": ["127.0.0.1/32"],  # HAProxy; the clients have other addresses
        },
    }


@pytest.fixture(scope="module")
def cluster(postgres, dovecot, postfix, test_ca, tmp_path_factory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    (root / "users.yaml").write_text(yaml.safe_dump(USERS))
    (root / "master").write_text(MASTER_PASSWORD + "\n")
    (root / "haproxy.pem").write_text(test_ca.cert.read_text() + test_ca.key.read_text())
    with contextlib.ExitStack() as stack:
        database = PgDatabase(postgres)
        stack.callback(postgres.drop_database, database.name)
        nodes, web = {}, {}
        for name in NODES:
            web[name], health = free_port(), free_port()
            config = node_config(
                root / name, database, dovecot, postfix, test_ca, web[name], health
            )
            nodes[name] = Node(name, root / name, config, health)
        for node in nodes.values():  # both at once: they migrate the empty database together
            node.start()
            stack.callback(node.stop)
        for node in nodes.values():
            node.wait_ready()
        binds = {frontend: free_port() for frontend in (*MAIL_FRONTENDS, PORTAL)}
        haproxy = HAProxy.from_example(
            binds,
            {
                name: NodePorts({**node.listeners, PORTAL: web[name]}, node.health)
                for name, node in nodes.items()
            },
            crt=root / "haproxy.pem",
        )
        haproxy.start()
        stack.callback(haproxy.cleanup)
        for name in NODES:
            haproxy.wait_for_state(name, "UP")
        settings = load(nodes["node1"].config)
        store = open_store(settings.store)
        stack.callback(store.close)
        directory = open_directory(settings.directory, settings.policy)

        def issue(**kw) -> Issued:
            return issue_code(settings, directory, store, CodeHasher(settings.codes.argon2), **kw)

        tls = ssl.create_default_context(cafile=str(test_ca.ca))
        yield Cluster(nodes, haproxy, binds, store, database, tls, issue)


# --- clients ---------------------------------------------------------------------------------


def connect(cluster: Cluster, frontend: str, client: str) -> tuple[ssl.SSLSocket, BinaryIO]:
    """A TLS connection through HAProxy from `client`; (socket, its reader) after the greeting."""
    raw = socket.create_connection(
        (LOOPBACK, cluster.binds[frontend]), timeout=PROMPTLY, source_address=(client, 0)
    )
    sock = cluster.tls.wrap_socket(raw, server_hostname=LOOPBACK)
    reader: BinaryIO = sock.makefile("rb")
    greeting = reader.readline()
    assert greeting.startswith((b"* OK", b"+OK")), greeting
    return sock, reader


def tagged(reader: BinaryIO, tag: bytes = b"a") -> bytes:
    """The tagged IMAP reply (untagged lines before it skipped); b"" if the connection ended."""
    while line := reader.readline():
        if line.startswith(tag + b" "):
            return line
    return b""


def imap_login(cluster: Cluster, client: str, login: str, code: str) -> bytes:
    """One login through HAProxy and out again: the tagged reply, or b"" when the connection
    was cut (reset, closed or silent) before it came."""
    try:
        sock, reader = connect(cluster, "imaps", client)
        with sock:
            sock.sendall(f'a LOGIN {login} "{code}"\r\n'.encode())
            reply = tagged(reader)
            if reply.startswith(b"a OK"):
                sock.sendall(b"b LOGOUT\r\n")
                tagged(reader, b"b")
            return reply
    except (OSError, AssertionError):  # ssl.SSLError and timeouts are OSErrors
        return b""


def kind(reply: bytes) -> str:
    """What a tagged reply says, short: "OK", "NO [EXPIRED]"…, or "cut" for none."""
    if not reply:
        return "cut"
    status, _, rest = reply.decode(errors="replace").split(" ", 1)[1].partition(" ")
    if status == "OK" or not rest.startswith("["):
        return status
    return f"{status} {rest.split(']', 1)[0]}]"


def holder(cluster: Cluster, code_id: int, client: str) -> str:
    """The node that granted `client` a login with the code (its audit log, which also shows
    that the client's own address came through HAProxy)."""

    def find() -> str | None:
        for name, node in cluster.nodes.items():
            for event in node.audit_events("auth"):
                if (event.get("code"), event.get("client"), event["result"]) == (
                    code_id,
                    client,
                    "grant",
                ):
                    return name
        return None

    return wait_until(find, PROMPTLY, f"the grant to {client}")


def live_sessions(cluster: Cluster) -> float:
    return sum(node.metric("apppass_sessions", protocol="imap") for node in cluster.nodes.values())


# --- tests -----------------------------------------------------------------------------------


def test_every_frontend_of_the_example_reaches_a_ready_node_that_sees_the_client(cluster):
    for node in cluster.nodes.values():
        ready = node.wait_ready()
        assert set(ready["checks"]) == {
            "store",
            "directory",
            "upstream_imap",
            "upstream_pop3",
            "upstream_smtp",
        }
        assert node.get("/healthz")[0] == 200
    code_id, code = cluster.issue("alice", "every frontend")
    clients = {frontend: source(10, i) for i, frontend in enumerate(MAIL_FRONTENDS)}

    assert imap_login(cluster, clients["imaps"], "alice", code).startswith(b"a OK")
    sock, reader = connect(cluster, "pop3s", clients["pop3s"])
    with sock:
        sock.sendall(f"USER alice\r\nPASS {code}\r\n".encode())
        assert reader.readline().startswith(b"+OK") and reader.readline().startswith(b"+OK")
        sock.sendall(b"QUIT\r\n")
    with smtplib.SMTP_SSL(
        LOOPBACK,
        cluster.binds["submissions"],
        context=cluster.tls,
        source_address=(clients["submissions"], 0),
        timeout=PROMPTLY,
    ) as smtp:
        assert smtp.login("alice", code)[0] == 235
    with smtplib.SMTP(
        LOOPBACK,
        cluster.binds["submission"],
        source_address=(clients["submission"], 0),
        timeout=PROMPTLY,
    ) as smtp:
        smtp.starttls(context=cluster.tls)
        assert smtp.login("alice", code)[0] == 235
    for frontend, client in clients.items():  # PROXY protocol v2 on every mail backend
        assert holder(cluster, code_id, client) in NODES, frontend
    assert cluster.store.get(code_id).use_count == len(MAIL_FRONTENDS)

    # The portal frontend ends TLS and names the client in X-Forwarded-For (-Proto: https).
    portal_client = source(10, 99)
    conn = http.client.HTTPSConnection(
        LOOPBACK,
        cluster.binds[PORTAL],
        context=cluster.tls,
        timeout=PROMPTLY,
        source_address=(portal_client, 0),
    )
    try:
        conn.request("GET", "/api/v1/openapi.json")
        reply = conn.getresponse()
        assert reply.status == 200 and reply.read().startswith(b"{")
        assert reply.getheader("Strict-Transport-Security", "").startswith("max-age=")
    finally:
        conn.close()
    api_clients = {e.get("client") for n in cluster.nodes.values() for e in n.audit_events("api")}
    assert portal_client in api_clients

    grants = sum(
        node.metric("apppass_logins_total", outcome="grant") for node in cluster.nodes.values()
    )
    assert grants >= len(MAIL_FRONTENDS)


def test_200_logins_racing_for_a_code_with_10_uses_on_both_nodes_give_exactly_10_sessions(
    cluster,
):
    code_id, code = cluster.issue("alice", "raced", max_uses=MAX_USES)
    wait_until(lambda: live_sessions(cluster) == 0, PROMPTLY, "no IMAP session left")
    before = {
        name: node.metric("apppass_logins_total", protocol="imap")
        for name, node in cluster.nodes.items()
    }
    start = threading.Barrier(RACERS, timeout=PROMPTLY)

    def racer(index: int) -> tuple[bytes, ssl.SSLSocket]:
        sock, reader = connect(cluster, "imaps", source(11, index))
        start.wait()  # every client connected and greeted: now all log in at once
        sock.sendall(f'a LOGIN alice "{code}"\r\n'.encode())
        return tagged(reader), sock

    with ThreadPoolExecutor(RACERS) as pool:
        results = list(pool.map(racer, range(RACERS)))
    try:
        replies = collections.Counter(kind(reply) for reply, _ in results)
        assert replies == {"OK": MAX_USES, "NO [EXPIRED]": RACERS - MAX_USES}, replies
        # Ten live sessions, wherever they are, and ten uses counted in the shared store.
        wait_until(lambda: live_sessions(cluster) == MAX_USES, PROMPTLY, "10 live sessions")
        assert cluster.store.get(code_id).use_count == MAX_USES
        served = {
            name: node.metric("apppass_logins_total", protocol="imap") - before[name]
            for name, node in cluster.nodes.items()
        }
        assert sum(served.values()) == RACERS
        assert all(count > 0 for count in served.values()), served
    finally:
        for _, sock in results:
            sock.close()
    assert cluster.store.get(code_id).use_count == MAX_USES


def test_a_revocation_with_one_nodes_config_ends_the_idle_sessions_on_both_within_2s(cluster):
    code_id, code = cluster.issue("printer1", "idle phone")
    held: dict[str, tuple[ssl.SSLSocket, BinaryIO]] = {}
    for index in range(6):  # leastconn sends the next client to the node with fewer sessions
        client = source(12, index)
        sock, reader = connect(cluster, "imaps", client)
        sock.sendall(f'a LOGIN printer1 "{code}"\r\nb SELECT INBOX\r\nc IDLE\r\n'.encode())
        while not reader.readline().startswith(b"+"):
            pass
        name = holder(cluster, code_id, client)
        if name in held:
            sock.close()
        else:
            held[name] = (sock, reader)
        if len(held) == len(NODES):
            break
    try:
        assert set(held) == set(NODES)
        # node1's config, in a process of its own: the store's record of the change reaches
        # node2's serve (and node1's) without any word between the nodes.
        revoked = cluster.nodes["node1"].cli("codes", "revoke", str(code_id))
        assert revoked.returncode == 0, revoked.stderr
        since = time.monotonic()

        def goodbye(name: str) -> tuple[bytes, float]:
            sock, _ = held[name]
            rest = b""
            while chunk := sock.recv(4096):
                rest += chunk
            return rest, time.monotonic() - since

        with ThreadPoolExecutor(len(NODES)) as pool:
            ended = dict(zip(NODES, pool.map(goodbye, NODES), strict=True))
    finally:
        for sock, _ in held.values():
            sock.close()
    for name, (rest, seconds) in ended.items():
        assert rest.endswith(f"* BYE app password {code_id} revoked\r\n".encode()), (name, rest)
        assert seconds < REVOKED_WITHIN, (name, seconds)


@dataclass
class Login:
    code_id: int
    max_uses: int | None
    started: float
    reply: bytes = b""


def test_node1_killed_under_load_loses_no_use_and_comes_back(cluster):
    with ThreadPoolExecutor(WORKERS) as pool:
        issued = list(
            pool.map(
                lambda i: (cluster.issue("alice", f"load {i}", max_uses=i % 2 or None), i % 2),
                range(LOAD_CODES),
            )
        )
    todo = collections.deque(issued)
    logins: list[Login] = []
    lock = threading.Lock()
    stop = threading.Event()
    killed: list[float] = []

    def worker(index: int) -> None:
        while not stop.is_set():
            with lock:
                if not todo:
                    return
                (code_id, code), max_uses = todo.popleft()
            login = Login(code_id, max_uses or None, time.monotonic())
            login.reply = imap_login(cluster, source(13, index), "alice", code)
            with lock:
                logins.append(login)

    def succeeded(after: float = 0.0) -> int:
        with lock:
            return sum(1 for x in logins if x.reply.startswith(b"a OK") and x.started > after)

    node1, node2 = cluster.nodes["node1"], cluster.nodes["node2"]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: succeeded() >= KILL_AFTER, PROMPTLY, "logins before the kill")
        assert node1.metric("apppass_logins_total", outcome="grant") > 0  # both were serving
        assert node2.metric("apppass_logins_total", outcome="grant") > 0
        node1.kill()
        killed.append(time.monotonic())
        wait_until(lambda: succeeded(killed[0]) >= KILL_AFTER, PROMPTLY, "logins after the kill")
    finally:
        stop.set()
        for thread in threads:
            thread.join(PROMPTLY)
    # The checks (its /readyz no longer answers) take node1 out.
    cluster.haproxy.wait_for_state("node1", "DOWN", CHECKS_NOTICE)

    # Every login that began after the kill went to node2 and succeeded: no client was sent to
    # the dead node. Those in flight at the kill may have been cut, nothing else failed.
    after = [x for x in logins if x.started > killed[0]]
    assert after and all(x.reply.startswith(b"a OK") for x in after), collections.Counter(
        kind(x.reply) for x in after
    )
    cut = [x for x in logins if x.reply == b""]
    assert len(cut) <= WORKERS
    assert all(x.reply.startswith(b"a OK") for x in logins if x not in cut), collections.Counter(
        kind(x.reply) for x in logins
    )

    # No use lost or doubled: a login the client saw succeed counted exactly once; one cut by
    # the kill at most once (node1 may have counted it just before dying); codes never tried
    # not at all. A place node1 held for a cut login lapses by itself (RESERVATION_SECONDS).
    records = cluster.store.get_many([code_id for (code_id, _), _ in issued])
    tried = {x.code_id: x for x in logins}
    for (code_id, _), _ in issued:
        login = tried.get(code_id)
        uses = records[code_id].use_count
        if login is None:
            assert uses == 0, code_id
        elif login.reply:
            assert uses == 1, (code_id, login)
        else:
            assert uses in (0, 1), (code_id, login)
    seen = succeeded()
    counted = sum(records[code_id].use_count for code_id in tried)
    assert seen <= counted <= seen + len(cut)
    with cluster.database.admin() as conn:
        held = {row[0] for row in conn.execute("SELECT code_id FROM reservations")}
    assert held <= {x.code_id for x in cut if x.max_uses}, held

    # node1 starts again on the same store and ports, is ready, and HAProxy sends it logins.
    node1.start()
    node1.wait_ready()
    cluster.haproxy.wait_for_state("node1", "UP", CHECKS_NOTICE)
    _, code = cluster.issue("alice", "after the restart")

    def node1_serves() -> bool:
        assert imap_login(cluster, source(14, 0), "alice", code).startswith(b"a OK")
        return node1.metric("apppass_logins_total", outcome="grant") > 0

    wait_until(node1_serves, PROMPTLY, "a login on node1 again")
    assert node1.running and "Traceback" not in node1.stderr, node1.stderr
    assert node2.running and "Traceback" not in node2.stderr, node2.stderr
