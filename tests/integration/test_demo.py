"""`apppass demo` (what `make demo` runs) works as it says: the commands it prints succeed, and
the portal it prints signs in with the printed password and makes a code that works."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers.common import free_port
from tests.support.webclient import WebClient

pytestmark = pytest.mark.integration


def test_demo_prints_commands_that_work(tmp_path):
    exe = Path(sys.executable).parent / "apppass"
    ports = {p: free_port() for p in ("imap", "pop3", "smtp", "web")}
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
        # The portal: sign in with the printed password, create a code, use it.
        printed = "".join(lines)
        assert f"http://127.0.0.1:{ports['web']}/" in printed
        password = re.search(r"portal password: (\S+)", printed).group(1)
        web = WebClient("127.0.0.1", ports["web"])
        assert web.sign_in("demo", password).path == "/codes"
        form = web.get("/codes/new")
        created = web.post(
            "/codes/new",
            {
                "csrf": form.hidden("csrf", "/codes/new"),
                "nonce": form.hidden("nonce", "/codes/new"),
                "label": "my laptop",
                "scopes": ["imap"],
                "expires": "default",
            },
        )
        assert created.status == 201
        code = created.element_text("new-code")
        command = commands[0].replace(re.search(r"demo:([^']+)", commands[0]).group(1), code)
        result = subprocess.run(
            ["bash", "-c", command.replace("curl ", "curl -sS --max-time 20 ")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0 and "EXISTS" in result.stdout, "the portal's code failed"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0
