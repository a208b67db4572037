"""`apppass demo`: the proxy, ready to try, in front of the sandbox upstream
(proxy/demo/sandbox.py).

Everything lives under one folder (default ./var/demo): the config it writes, the SQLite store,
a users file with the account `demo` (with a portal password made afresh each run). The
self-service portal listens on http://127.0.0.1:8080. The sandbox keeps mail in memory only.
For trying apppass out on this machine; nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import yaml

from proxy.config import load

HOST = "127.0.0.1"
PORTS = {"imap": 1143, "pop3": 1110, "smtp": 1587}
WEB_PORT = 8080  # the self-service portal, plain HTTP on loopback
MASTER_USER = "apppass-master"


def _write_config(
    folder: Path,
    upstream_ports: dict[str, int],
    ports: dict[str, int],
    web_port: int,
    portal_password: str,
) -> Path:
    from proxy.directory.passwords import hash_password

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
                        "password_hash": hash_password(portal_password),
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
        "web": {"listeners": [{"name": "portal", "bind": f"{HOST}:{web_port}", "tls": "none"}]},
    }
    path = folder / "apppass.yaml"
    path.write_text(
        "# Written by `apppass demo`: the sandbox setup. Not for production.\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return path


def _instructions(code: str, ports: dict[str, int], web_port: int, portal_password: str) -> str:
    lines = [
        "",
        "apppass demo is running (sandbox upstream: mail is kept in memory only; Ctrl-C stops it).",
        "",
        "  login:         demo",
        f"  app password:  {code}",
        "",
        f"Self-service portal: http://{HOST}:{web_port}/",
        f"  portal password: {portal_password}   (sign in as demo; create, use and revoke codes)",
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
    """Set up the sandbox, the config and a code, then serve (proxy/service.py `serve`: a port in
    use is a prompt exit 1, the first SIGTERM or SIGINT stops it)."""
    from twisted.internet import reactor

    from proxy.codes.hashing import CodeHasher
    from proxy.codes.issue import issue_code
    from proxy.codes.open import open_store
    from proxy.daemon import serve
    from proxy.demo.sandbox import Sandbox
    from proxy.directory.open import open_directory

    folder = Path(args.dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    ports = {p: getattr(args, f"{p}_port") for p in PORTS}
    web_port = getattr(args, "web_port", WEB_PORT)
    portal_password = secrets.token_urlsafe(9)  # a new one each run, shown below
    master = folder / "master-password"
    if not master.exists():
        master.write_text(secrets.token_urlsafe(24) + "\n")
        os.chmod(master, 0o600)
    sandbox = Sandbox({"demo": None}, MASTER_USER, master.read_text().strip())
    sandbox_ports = sandbox.listen(reactor, host=HOST)  # any free ports: it cannot collide
    cfg = _write_config(folder, sandbox_ports._asdict(), ports, web_port, portal_password)
    settings = load(cfg)
    store = open_store(settings.store)
    directory = open_directory(settings.directory, settings.policy)
    try:
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
    finally:
        store.close()
        directory.close()
    text = _instructions(issued.code.grouped(), ports, web_port, portal_password)
    text = text.replace("{cfg}", str(cfg)).replace("{audit}", str(folder / "audit.jsonl"))

    def ready(_service) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    return serve(
        settings, name="apppass demo", in_use_hint="; is another demo running?", ready=ready
    )
