"""`apppass serve` and `apppass demo` as real processes: a port in use is a prompt, clear failure;
the first SIGTERM or SIGINT stops them in every state, further ones are ignored, never a
traceback."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.servers.common import free_port, port_accepts
from tests.support.process import PROMPTLY, Process, taken_port

pytestmark = pytest.mark.integration


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def serve(
    tmp_path: Path,
    processes: list,
    listeners: dict[str, int],
    upstream_port: int,
    upstream_host: str = "127.0.0.1",
):
    """`apppass serve` with one listener per protocol, in front of upstream_host:upstream_port."""
    (tmp_path / "users.yaml").write_text("accounts: {alice: {id: key-alice}}\n")
    (tmp_path / "master").write_text("master-Secret-1\n")
    master = {"master_user": "proxy", "master_password_file": "master"}
    config = {
        "store": {"sqlite": "codes.db"},
        "directory": {"static": "users.yaml"},
        "audit": {"file": "audit.jsonl"},
        "listeners": [
            {
                "protocol": protocol,
                "bind": f"127.0.0.1:{port}",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
            for protocol, port in listeners.items()
        ],
        "upstream": {
            protocol: {
                "host": upstream_host,
                "port": upstream_port,
                "tls": "none",
                **({"login": "xclient"} if protocol == "smtp" else master),
            }
            for protocol in listeners
        },
    }
    (tmp_path / "apppass.yaml").write_text(yaml.safe_dump(config))
    process = Process(tmp_path / "serve", "-c", str(tmp_path / "apppass.yaml"), "serve")
    processes.append(process)
    return process


def demo(tmp_path: Path, processes: list, ports: dict[str, int]) -> Process:
    process = Process(
        tmp_path / "run",
        "demo",
        "--dir",
        str(tmp_path / "demo"),
        *(f"--{protocol}-port={port}" for protocol, port in ports.items()),
    )
    processes.append(process)
    return process


def demo_ports() -> dict[str, int]:
    return {protocol: free_port() for protocol in ("imap", "pop3", "smtp")}


# --- cannot start: a prompt exit 1 with the reason ---------------------------------------------


def test_serve_exits_at_once_when_its_port_is_taken(tmp_path, processes):
    with taken_port() as port:
        process = serve(tmp_path, processes, {"imap": port}, free_port())
        assert process.wait() == 1
    assert process.stderr == (
        f"apppass: cannot start: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    )


@pytest.mark.parametrize("taken", ["imap", "smtp"])
def test_demo_exits_at_once_when_a_port_is_taken(tmp_path, processes, taken):
    ports = demo_ports()
    with taken_port() as port:
        ports[taken] = port
        process = demo(tmp_path, processes, ports)
        assert process.wait() == 1
    assert process.stderr == (
        f"apppass demo: cannot start: cannot listen on 127.0.0.1:{port} (Address already in use); "
        "is another demo running?\n"
    )


# --- running: the first signal stops, further ones are ignored ---------------------------------

SIGNALS = {
    "SIGTERM": (signal.SIGTERM,),
    "SIGINT": (signal.SIGINT,),
    "SIGTERM twice": (signal.SIGTERM, signal.SIGTERM),
    "SIGINT then SIGTERM": (signal.SIGINT, signal.SIGTERM),
    "SIGTERM three times": (signal.SIGTERM, signal.SIGTERM, signal.SIGTERM),
}


@pytest.mark.parametrize("signals", list(SIGNALS.values()), ids=list(SIGNALS))
def test_serve_stops_cleanly_on_the_first_signal(tmp_path, processes, signals):
    port = free_port()
    process = serve(tmp_path, processes, {"imap": port}, free_port())
    process.wait_for_port(port)
    process.signal(*signals)
    assert process.wait() == 0, process.stderr
    assert "Traceback" not in process.stderr and "ReactorNotRunning" not in process.stderr
    assert not port_accepts(port)


@pytest.mark.parametrize("signals", list(SIGNALS.values()), ids=list(SIGNALS))
def test_demo_stops_cleanly_on_the_first_signal(tmp_path, processes, signals):
    ports = demo_ports()
    process = demo(tmp_path, processes, ports)
    process.wait_for_port(ports["smtp"])
    process.signal(*signals)
    assert process.wait() == 0, process.stderr
    assert "Traceback" not in process.stderr and "ReactorNotRunning" not in process.stderr


def test_serve_stops_on_a_signal_while_it_is_still_starting(tmp_path, processes):
    """SMTP asks the upstream for its EHLO before serving; an upstream that accepts and never
    answers holds the start (up to upstream.timeout, 30 s): SIGTERM still stops it at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", free_port()))
        silent.listen()
        silent.settimeout(PROMPTLY)
        process = serve(tmp_path, processes, {"smtp": free_port()}, silent.getsockname()[1])
        probe, _ = silent.accept()  # the start is now waiting for the upstream's greeting
        with probe:
            process.signal(signal.SIGTERM, signal.SIGTERM)
            assert process.wait() == 0, process.stderr
    assert "Traceback" not in process.stderr


# --- clear text to another machine: allowed when written, said at start ------------------------


def test_serve_audits_clear_text_credentials_at_start(tmp_path, processes):
    """192.0.2.1 (TEST-NET-1) is never loopback; the start goes on whether it answers or not."""
    port = free_port()
    process = serve(tmp_path, processes, {"imap": port}, 143, upstream_host="192.0.2.1")
    process.wait_for_port(port)  # the warning is audited before the listeners open
    process.signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [e["warning"] for e in audit if e["event"] == "config_warning"] == [
        "upstream.imap: tls is none, so the master password goes to 192.0.2.1:143 in clear "
        "text; use tls: starttls or implicit"
    ]
    assert "master-Secret-1" not in (tmp_path / "audit.jsonl").read_text()


def test_serve_is_quiet_about_clear_text_on_loopback(tmp_path, processes):
    port = free_port()
    process = serve(tmp_path, processes, {"imap": port}, free_port())
    process.wait_for_port(port)
    process.signal(signal.SIGTERM)
    assert process.wait() == 0, process.stderr
    assert '"config_warning"' not in (tmp_path / "audit.jsonl").read_text()
