"""Run apppass in the test process (on pytest-twisted's reactor) in front of real servers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from twisted.internet import reactor

from proxy.audit import Audit
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.config import load
from proxy.service import Service
from tests.servers.common import free_port

# Accounts of the proxy's static directory; upstream identities are the Dovecot users.
USERS = {
    "accounts": {
        "alice": {
            "id": "key-alice",
            "aliases": ["alice@example.test"],
            "upstream": "alice",
            "groups": ["legacy-mail"],
        },
        "bob": {"id": "key-bob", "upstream": "bob", "groups": ["staff"]},
        "printer1": {"id": "key-printer1", "upstream": "printer1", "groups": ["legacy-mail"]},
        "demo": {"id": "key-demo", "upstream": "demo", "groups": ["legacy-mail"]},
        "ghost": {
            "id": "key-ghost",
            "upstream": "ghost",
            "groups": ["legacy-mail"],
        },  # not upstream
    }
}

FAST_ARGON2 = {"memory_kib": 8192, "time_cost": 1, "threads": 2}


@dataclass
class ProxyHarness:
    folder: Path
    service: Service
    events: list = field(default_factory=list)

    @property
    def settings(self):
        return self.service.settings

    @property
    def store(self):
        return self.service.sync_store

    def port(self, name: str) -> int:
        return self.service.port_of(name)

    def issue(self, login: str = "alice", label: str = "test device", **kw) -> tuple[int, str]:
        """A new code for `login`: (id, code as shown to the user)."""
        issued = issue_code(
            self.settings,
            self.service.directory,
            self.store,
            self._hasher,
            login=login,
            label=label,
            **kw,
        )
        return issued.record.id, issued.code.grouped()

    @property
    def _hasher(self) -> CodeHasher:
        return CodeHasher(self.settings.codes.argon2)

    def audit_events(self, event: str | None = None, session: str | None = None) -> list[dict]:
        return [
            e
            for e in self.events
            if (event is None or e["event"] == event)
            and (session is None or e.get("session") == session)
        ]

    def audit_text(self) -> str:
        return "\n".join(json.dumps(e) for e in self.events)

    async def stop(self) -> None:
        await self.service.stop()


async def start_proxy(
    folder: Path,
    *,
    listeners: list[dict],
    upstream: dict,
    auth: dict | None = None,
    policy: dict | None = None,
    directory: dict | None = None,
    limits: dict | None = None,
    web: dict | None = None,
    users: dict | None = None,
    store: dict | None = None,
    oauth2: dict | None = None,
) -> ProxyHarness:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.yaml").write_text(yaml.safe_dump(users or USERS))
    for name, up in upstream.items():
        if "master_password" in up:
            secret = folder / f"{name}-master"
            secret.write_text(up.pop("master_password") + "\n")
            up["master_password_file"] = str(secret)
    for item in listeners:
        item.setdefault("bind", f"127.0.0.1:{free_port()}")
    config = {
        "store": store or {"sqlite": "codes.db"},
        "directory": directory or {"static": "users.yaml"},
        "policy": policy or {"legacy_group": "legacy-mail"},
        "codes": {"argon2": FAST_ARGON2},
        "auth": {"failure_delay": "0s", "ip_failures_per_minute": 100000, **(auth or {})},
        "audit": {"file": "audit.jsonl"},
        "listeners": listeners,
        "upstream": upstream,
        **({"limits": limits} if limits else {}),
        **({"web": web} if web else {}),
        **({"oauth2": oauth2} if oauth2 else {}),
    }
    (folder / "apppass.yaml").write_text(yaml.safe_dump(config))
    settings = load(folder / "apppass.yaml")
    events: list = []
    audit = Audit(path=str(folder / "audit.jsonl"))
    audit.listeners.append(events.append)
    # Code changes are followed every second (the default); accounts are re-checked quickly.
    service = Service(settings, reactor, audit=audit, account_check=0.2)
    await service.start()
    return ProxyHarness(folder, service, events)
