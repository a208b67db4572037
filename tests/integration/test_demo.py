"""`apppass demo` (what `make demo` runs) works as it says: the commands it prints succeed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers.common import free_port

pytestmark = pytest.mark.integration


def test_demo_prints_commands_that_work(tmp_path):
    exe = Path(sys.executable).parent / "apppass"
    ports = {p: free_port() for p in ("imap", "pop3", "smtp")}
    proc = subprocess.Popen(
        [
            str(exe),
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            *(f"--{p}-port={port}" for p, port in ports.items()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("Revoke it:") for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, "the demo did not start"
            lines.append(proc.stdout.readline())
        commands = [line.strip() for line in lines if line.startswith(("  curl", "  printf"))]
        assert len(commands) == 5, f"{len(commands)} commands printed"  # they hold the code
        outputs = []
        for command in commands:
            result = subprocess.run(
                ["bash", "-c", command.replace("curl ", "curl -sS --max-time 20 ")],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 0, result.stderr  # not the command: it holds the code
            outputs.append(result.stdout)
        assert "EXISTS" in outputs[0]
        assert "Welcome to the apppass sandbox" in outputs[1] and "Welcome" in outputs[2]
        assert "sent through apppass" in outputs[4] and "Authenticated sender: demo" in outputs[4]
        listing = subprocess.run(
            [str(exe), "-c", str(tmp_path / "demo" / "apppass.yaml"), "codes", "list"],
            capture_output=True,
            text=True,
        )
        assert " 5/- " in listing.stdout, listing.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
