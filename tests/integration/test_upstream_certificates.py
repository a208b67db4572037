"""An upstream certificate with a malformed name (an IP address written as a DNS name, the usual
mistake of a hand-made certificate): the names that are valid still verify, the malformed one is
one warning line per upstream, never a traceback per login; and a certificate left with no valid
name for the upstream is refused, where Twisted's own check let it through (it logs the
malformed name as a traceback and then accepts the certificate unchecked)."""

from __future__ import annotations

import imaplib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import pytest_twisted
import yaml
from service_identity import VerificationError
from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface import implementer

import proxy.tls
from proxy.tls import ServerTLS, upstream_tls
from tests.servers.common import free_port, port_accepts, short_tempdir
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER, Dovecot
from tests.support.ca import CertFiles, TestCA

pytestmark = pytest.mark.integration

APPPASS = sys.executable.rsplit("/", 1)[0] + "/apppass"
DEADLINE = 30.0
CREATE = ("codes", "create", "alice", "--label", "laptop", "--json")
WARNING = (
    'its certificate names "127.0.0.1" as a DNS name, which it cannot be (an IP address belongs '
    "in an IP address SAN); that name is ignored"
)


@pytest.fixture(scope="module")
def ip_as_dns_name(test_ca: TestCA) -> CertFiles:
    """DNS:127.0.0.1 (malformed) next to IP:127.0.0.1 (what a client checks an address with)."""
    return test_ca.issue("ip-as-dns-name", dns_names=("127.0.0.1",), ips=("127.0.0.1",))


@pytest.fixture(scope="module")
def only_ip_as_dns_name(test_ca: TestCA) -> CertFiles:
    """DNS:127.0.0.1 and nothing else: no valid name at all."""
    return test_ca.issue("only-ip-as-dns-name", dns_names=("127.0.0.1",), ips=())


@pytest.fixture
def twisted_log(monkeypatch) -> Iterator[list[dict]]:
    """Twisted's log events while the test runs, with no certificate warning given before."""
    monkeypatch.setattr(proxy.tls, "_WARNED", set())
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@implementer(IHandshakeListener)
class Handshake(protocol.Protocol):
    def __init__(self, result: defer.Deferred):
        self.result = result

    def handshakeCompleted(self):
        self.result.callback(True)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.result.called:
            self.result.errback(reason)


async def handshake(files: CertFiles, creator) -> bool:
    port = reactor.listenSSL(
        0,
        protocol.Factory.forProtocol(protocol.Protocol),
        ServerTLS(str(files.cert), str(files.key)),
        interface="127.0.0.1",
    )
    try:
        result: defer.Deferred = defer.Deferred()
        reactor.connectSSL(
            "127.0.0.1",
            port.getHost().port,
            protocol.ClientFactory.forProtocol(lambda: Handshake(result)),
            creator,
        )
        return await result.addTimeout(10, reactor)
    finally:
        await port.stopListening()


# --- the verification itself (in this process, against a Twisted TLS listener) ----------------


@pytest_twisted.ensureDeferred
async def test_a_malformed_name_is_ignored_and_said_once(test_ca, ip_as_dns_name, twisted_log):
    for _ in range(3):  # each connection makes its own creator, as the proxy's logins do
        assert await handshake(ip_as_dns_name, upstream_tls("127.0.0.1", ca_file=str(test_ca.ca)))
    warnings = [e for e in twisted_log if e["log_level"] is LogLevel.warn]
    assert [(e["host"], e["problem"]) for e in warnings] == [("127.0.0.1", WARNING)]
    assert not [e for e in twisted_log if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_a_malformed_wildcard_is_ignored_too(test_ca, twisted_log):
    files = test_ca.issue("bad-wildcard", dns_names=("*.*.example.test", "localhost"), ips=())
    assert await handshake(files, upstream_tls("localhost", ca_file=str(test_ca.ca)))
    warnings = [e["problem"] for e in twisted_log if e["log_level"] is LogLevel.warn]
    assert warnings == [
        'its certificate names "*.*.example.test" as a DNS name, which it cannot be; that name '
        "is ignored"
    ]
    assert not [e for e in twisted_log if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_a_certificate_without_a_valid_name_is_refused(
    test_ca, only_ip_as_dns_name, twisted_log
):
    with pytest.raises(VerificationError):
        await handshake(only_ip_as_dns_name, upstream_tls("127.0.0.1", ca_file=str(test_ca.ca)))
    assert not [e for e in twisted_log if e.get("log_failure") is not None]


@pytest_twisted.ensureDeferred
async def test_a_certificate_without_any_name_is_refused(test_ca, twisted_log):
    no_names = test_ca.issue("no-names", dns_names=(), ips=())  # the subject CN only
    with pytest.raises(VerificationError):
        await handshake(no_names, upstream_tls("localhost", ca_file=str(test_ca.ca)))
    assert not [e for e in twisted_log if e.get("log_failure") is not None]


# --- the proxy as it runs: `apppass serve` in front of a real Dovecot ---------------------------


@pytest.fixture(scope="module")
def dovecot_ip_as_dns_name(ip_as_dns_name) -> Iterator[Dovecot]:
    server = Dovecot(ip_as_dns_name, root=short_tempdir("dcc-"))
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def serve(tmp_path, dovecot: Dovecot, test_ca: TestCA) -> tuple[subprocess.Popen, int]:
    (tmp_path / "users.yaml").write_text(
        yaml.safe_dump({"accounts": {"alice": {"id": "key-alice", "upstream": "alice"}}})
    )
    (tmp_path / "master").write_text(MASTER_PASSWORD + "\n")
    port = free_port()
    config = {
        "store": {"sqlite": "codes.db"},
        "directory": {"static": "users.yaml"},
        "codes": {"argon2": {"memory_kib": 8192, "time_cost": 1}},
        "audit": {"file": "audit.jsonl"},
        "listeners": [
            {
                "protocol": "imap",
                "bind": f"127.0.0.1:{port}",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        "upstream": {
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imaps_port,
                "tls": "implicit",
                "ca_file": str(test_ca.ca),
                "master_user": MASTER_USER,
                "master_password_file": "master",
            }
        },
    }
    (tmp_path / "apppass.yaml").write_text(yaml.safe_dump(config))
    with (tmp_path / "stderr").open("w") as err:
        proc = subprocess.Popen(
            [APPPASS, "-c", str(tmp_path / "apppass.yaml"), "serve"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + DEADLINE
    while not port_accepts(port):
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        assert time.monotonic() < deadline, "apppass serve did not start listening"
        time.sleep(0.05)
    return proc, port


def test_apppass_serve_says_it_once_and_logs_in(tmp_path, dovecot_ip_as_dns_name, test_ca):
    proc, port = serve(tmp_path, dovecot_ip_as_dns_name, test_ca)
    try:
        created = subprocess.run(
            [APPPASS, "-c", str(tmp_path / "apppass.yaml"), *CREATE],
            capture_output=True,
            text=True,
            check=True,
        )
        code = json.loads(created.stdout)["code"]
        for _ in range(3):
            with imaplib.IMAP4("127.0.0.1", port, timeout=DEADLINE) as client:
                client.login("alice", code)
                assert client.select("INBOX")[0] == "OK"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    stderr = (tmp_path / "stderr").read_text()
    warnings = [line for line in stderr.splitlines() if " warning " in line]
    assert [w.split(" warning ", 1)[1] for w in warnings] == [f"upstream 127.0.0.1: {WARNING}"]
    assert "Traceback" not in stderr
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["message"] for e in audit if e["event"] == "warning"] == [
        f"upstream 127.0.0.1: {WARNING}"
    ]
