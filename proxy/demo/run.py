"""`apppass demo`: the proxy, ready to try, in front of the sandbox upstream
(proxy/demo/sandbox.py).

Everything lives under one folder (default ./var/demo): the config it writes, the SQLite store,
a users file with the account `demo`. The sandbox keeps mail in memory only. For trying apppass
out on this machine; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import yaml
from twisted.internet import defer, error

from proxy.config import ConfigError, load

HOST = "127.0.0.1"
PORTS = {"imap": 1143, "pop3": 1110, "smtp": 1587}
MASTER_USER = "apppass-master"


def _write_config(folder: Path, upstream_ports: dict[str, int], ports: dict[str, int]) -> Path:
    (folder / "users.yaml").write_text(
        yaml.safe_dump(
            {
                "accounts": {
                    "demo": {
                        "id": "demo-0001",
                        "name": "Demo User",
                        "aliases": ["demo@example.test"],
                        "upstream": "demo",
                        "groups": ["legacy-mail"],
                    }
                }
            },
            sort_keys=False,
        )
    )
    secret = folder / "master-password"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(24) + "\n")
        os.chmod(secret, 0o600)
    config = {
        "store": {"sqlite": "apppass.db"},
        "directory": {"static": "users.yaml"},
        "policy": {"legacy_group": "legacy-mail"},
        "auth": {"failure_delay": "1s"},
        "audit": {"file": "audit.jsonl"},
        "listeners": [
            {
                "name": f"{p}-demo",
                "protocol": p,
                "bind": f"{HOST}:{port}",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
            for p, port in ports.items()
        ],
        "upstream": {
            p: {
                "host": HOST,
                "port": upstream_ports[p],
                "tls": "none",
                **(
                    {"login": "xclient"}
                    if p == "smtp"
                    else {
                        "login": "authzid",
                        "master_user": MASTER_USER,
                        "master_password_file": "master-password",
                    }
                ),
            }
            for p in ports
        },
    }
    path = folder / "apppass.yaml"
    path.write_text(
        "# Written by `apppass demo`: the sandbox setup. Not for production.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def _instructions(code: str, ports: dict[str, int]) -> str:
    lines = [
        "",
        "apppass demo is running (sandbox upstream: mail is kept in memory only; Ctrl-C stops it).",
        "",
        "  login:         demo",
        f"  app password:  {code}",
        "",
        "Try it:",
        f"  curl -u 'demo:{code}' imap://{HOST}:{ports['imap']}/INBOX -X 'EXAMINE INBOX'",
        f"  curl -u 'demo:{code}' 'imap://{HOST}:{ports['imap']}/INBOX;UID=1'",
        f"  curl -u 'demo:{code}' pop3://{HOST}:{ports['pop3']}/1",
        f"  printf 'Subject: hello\\r\\n\\r\\nsent through apppass\\r\\n' | curl -u 'demo:{code}' "
        f"smtp://{HOST}:{ports['smtp']} --mail-from demo@example.test "
        "--mail-rcpt demo@example.test -T -",
        f"  curl -u 'demo:{code}' 'imap://{HOST}:{ports['imap']}/INBOX;UID=2'",
        "",
        "Mail client settings: server 127.0.0.1, user demo, the app password above, no encryption,",
        f"  IMAP port {ports['imap']}, POP3 port {ports['pop3']}, "
        f"SMTP port {ports['smtp']} with authentication.",
        "",
        "Watch it:  apppass -c {cfg} codes list      (use count, last use)",
        "           tail -f {audit}                  (one JSON line per decision)",
        "Revoke it: apppass -c {cfg} codes revoke-all demo",
        "",
    ]
    return "\n".join(lines)


def run_demo(args) -> int:
    from twisted.internet import reactor

    from proxy.codes.hashing import CodeHasher
    from proxy.codes.issue import issue_code
    from proxy.codes.open import open_store
    from proxy.demo.sandbox import Sandbox
    from proxy.directory.open import open_directory
    from proxy.service import Service

    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ports = {p: getattr(args, f"{p}_port") for p in PORTS}
    exit_code = [0]

    async def start():
        master = folder / "master-password"
        if not master.exists():
            master.write_text(secrets.token_urlsafe(24) + "\n")
            os.chmod(master, 0o600)
        sandbox = Sandbox({"demo": None}, MASTER_USER, master.read_text().strip())
        sandbox_ports = sandbox.listen(reactor, host=HOST)
        cfg = _write_config(folder, sandbox_ports._asdict(), ports)
        settings = load(cfg)
        store, directory = (
            open_store(settings.store),
            open_directory(settings.directory, settings.policy),
        )
        store.revoke_all("demo-0001")
        issued = issue_code(
            settings,
            directory,
            store,
            CodeHasher(settings.codes.argon2),
            login="demo",
            label="demo",
            created_by="demo",
        )
        store.close()
        service = Service(settings, reactor)
        try:
            await service.start()
        except error.CannotListenError as exc:
            raise SystemExit(
                f"apppass demo: cannot listen on {exc.interface}:{exc.port} "
                f"({exc.socketError.strerror if exc.socketError else 'in use'}); "
                "is another demo running?"
            ) from None
        reactor.addSystemEventTrigger(
            "before", "shutdown", lambda: defer.ensureDeferred(service.stop())
        )
        text = _instructions(issued.code.grouped(), ports)
        sys.stdout.write(
            text.replace("{cfg}", str(cfg)).replace("{audit}", str(folder / "audit.jsonl")) + "\n"
        )
        sys.stdout.flush()

    def failed(failure):
        exc = failure.value
        if isinstance(exc, ConfigError):
            sys.stderr.write("\n".join(exc.problems) + "\n")
        else:
            sys.stderr.write(
                f"{exc}\n" if isinstance(exc, SystemExit) else f"apppass demo: {exc}\n"
            )
        exit_code[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(start()).addErrback(failed))
    reactor.run()
    return exit_code[0]
