"""What the portal's integration and browser tests share: users with portal passwords, and a
proxy in front of the real Dovecot (and Postfix) with a portal listener."""

from __future__ import annotations

import functools
from pathlib import Path

from proxy.directory.passwords import hash_password
from tests.integration.harness import ProxyHarness, start_proxy
from tests.servers.common import free_port
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER

# Portal passwords of the YAML users (their mail passwords at Dovecot are something else).
PASSWORDS = {
    "alice": "alice-Portal-Pw-1",
    "bob": "bob-Portal-Pw-2",
    "carol": "carol-Portal-Pw-3",
}
ADMIN_GROUP = "helpdesk"


@functools.cache
def _hash(password: str) -> str:
    return hash_password(password)


def portal_users(mfa: bool = False) -> dict:
    """alice may have app passwords; bob is outside legacy-mail; carol is a helpdesk admin;
    printer1 is a device account without a portal password."""
    return {
        "accounts": {
            "alice": {
                "id": "key-alice",
                "name": "Alice Example",
                "aliases": ["alice@example.test"],
                "upstream": "alice",
                "groups": ["legacy-mail"],
                "mfa": mfa,
                "password_hash": _hash(PASSWORDS["alice"]),
            },
            "bob": {
                "id": "key-bob",
                "name": "Bob Example",
                "upstream": "bob",
                "groups": ["staff"],
                "password_hash": _hash(PASSWORDS["bob"]),
            },
            "carol": {
                "id": "key-carol",
                "name": "Carol Helpdesk",
                "upstream": "carol",
                "groups": ["staff", ADMIN_GROUP],
                "password_hash": _hash(PASSWORDS["carol"]),
            },
            "printer1": {
                "id": "key-printer1",
                "name": "Printer 3rd floor",
                "aliases": ["printer1@example.test"],
                "upstream": "printer1",
                "groups": ["legacy-mail"],
                "mfa": mfa,
            },
        }
    }


def mail_listeners(smtp: bool) -> list[dict]:
    plain = {"tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}
    listeners = [{"name": "imap", "protocol": "imap", **plain}]
    if smtp:
        listeners.append({"name": "smtp", "protocol": "smtp", **plain})
    return listeners


def mail_upstream(dovecot, postfix=None, test_ca=None) -> dict:
    upstream = {
        "imap": {
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "tls": "none",
            "master_user": MASTER_USER,
            "master_password": MASTER_PASSWORD,
        }
    }
    if postfix is not None:
        upstream["smtp"] = {
            "host": "127.0.0.1",
            "port": postfix.smtp_port,
            "tls": "starttls",
            "ca_file": str(test_ca.ca),
            "login": "xclient",
        }
    return upstream


def portal_web(**extra) -> dict:
    return {
        "listeners": [{"name": "portal", "bind": f"127.0.0.1:{free_port()}", "tls": "none"}],
        "admin_group": ADMIN_GROUP,
        **extra,
    }


async def start_portal(
    folder: Path,
    dovecot,
    *,
    mfa: bool = False,
    web: dict | None = None,
    auth: dict | None = None,
    users: dict | None = None,
    directory: dict | None = None,
    policy: dict | None = None,
    postfix=None,
    test_ca=None,
    listeners: list[dict] | None = None,
) -> ProxyHarness:
    """A proxy with an IMAP listener in front of Dovecot (and SMTP in front of Postfix, when
    given) and the portal on loopback HTTP."""
    return await start_proxy(
        folder,
        listeners=listeners or mail_listeners(postfix is not None),
        upstream=mail_upstream(dovecot, postfix, test_ca),
        policy=policy or {"legacy_group": "legacy-mail", "require_mfa": mfa},
        web=web or portal_web(),
        auth=auth,
        users=users or portal_users(mfa),
        directory=directory,
    )
