"""Real `apppass serve` nodes for the multi-node test: each a process of its own with its own
config and ports, all on one store; and what a test reads from them (/readyz, /metrics, the
audit log, the CLI with the node's config)."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.servers.common import wait_until
from tests.support.process import APPPASS, PROMPTLY, Process


class Node:
    """One node: `folder/apppass.yaml` (written from `config`), `listeners` (name -> port),
    `health` (the port of its web listener with serve: [metrics, health])."""

    def __init__(self, name: str, folder: Path, config: dict, health: int) -> None:
        self.name = name
        self.folder = folder
        self.health = health
        self.listeners = {
            item["name"]: int(item["bind"].rsplit(":", 1)[1]) for item in config["listeners"]
        }
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "apppass.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.process: Process | None = None
        self.starts = 0

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """`apppass serve`, each start with its own stdout/stderr folder (serve-1, serve-2…)."""
        self.starts += 1
        self.process = Process(
            self.folder / f"serve-{self.starts}", "-c", str(self.config), "serve"
        )

    def wait_ready(self, timeout: float = PROMPTLY) -> dict:
        """Until /readyz answers 200 (failing at once if the process exits); its JSON."""

        def ready() -> dict | None:
            assert self.running, f"{self.name} exited; stderr:\n{self.stderr}"
            status, body = self.get("/readyz")
            return json.loads(body) if status == 200 else None

        return wait_until(ready, timeout, f"{self.name} /readyz 200", interval=0.05)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    @property
    def stderr(self) -> str:
        return self.process.stderr if self.process is not None else ""

    def kill(self) -> None:
        """SIGKILL, and reaped: its sockets are closed when this returns."""
        assert self.process is not None
        self.process.kill()

    def stop(self) -> int | None:
        """SIGTERM (a drain of serve.shutdown_grace); the exit status."""
        if not self.running:
            return None
        assert self.process is not None
        self.process.signal(signal.SIGTERM)
        return self.process.wait()

    # --- what operators and tests read --------------------------------------------------

    def get(self, path: str) -> tuple[int, bytes]:
        """GET on the node's ops listener: (status, body); (0, b"") when nothing answers."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health}{path}", timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()
        except OSError:
            return 0, b""

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples `name` whose labels include `labels`, scraped now."""
        status, body = self.get("/metrics")
        assert status == 200, f"{self.name} /metrics answered {status}"
        return sum(
            sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def audit_events(self, event: str | None = None) -> list[dict[str, Any]]:
        path = self.folder / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        events = [json.loads(line) for line in lines if line.strip()]
        return [e for e in events if event is None or e.get("event") == event]

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`apppass -c <this node's config> …` as a process of its own."""
        return subprocess.run(
            [str(APPPASS), "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
