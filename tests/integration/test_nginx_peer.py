"""The nginx mail proxy of `make bench` (tests/servers/nginx.py), for real in front of the test
Dovecot: its auth service checks the password nginx passes on and sends nginx upstream as the
user through the Dovecot master user; plaintext, STARTTLS and implicit TLS listeners each log in;
stopping it leaves no process behind. The benchmark's comparison is only worth something if
this peer does what the module says.
"""

from __future__ import annotations

import imaplib
import os
import uuid
from collections.abc import Iterator

import pytest

from tests.servers.common import LOOPBACK, wait_until
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER, Dovecot
from tests.servers.nginx import NginxMail
from tests.support.ca import TestCA

pytestmark = pytest.mark.integration

# nginx-side passwords, unlike the Dovecot ones: nginx %-escapes space, `%` and `"` when it
# passes them to the auth service, which must undo that to compare.
NGINX_PASSWORDS = {"alice": 'nginx "pass" 100% alice', "bob": "nginx-bob"}


@pytest.fixture(scope="module")
def nginx(test_ca: TestCA, dovecot: Dovecot) -> Iterator[NginxMail]:
    server = NginxMail(
        test_ca, dovecot.imap_port, NGINX_PASSWORDS, MASTER_USER, MASTER_PASSWORD, workers=2
    )
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_a_login_through_nginx_reaches_the_users_own_mailbox(nginx, dovecot):
    subject = f"via nginx {uuid.uuid4()}"
    client = imaplib.IMAP4(LOOPBACK, nginx.plain_port, timeout=10)
    try:
        client.login("alice", NGINX_PASSWORDS["alice"])
        message = f"Subject: {subject}\r\n\r\nrelayed by nginx\r\n".encode()
        assert client.append("INBOX", None, None, message)[0] == "OK"
    finally:
        client.logout()
    direct = imaplib.IMAP4(LOOPBACK, dovecot.imap_port, timeout=10)
    try:
        direct.login("alice", dovecot.users["alice"])
        direct.select("INBOX", readonly=True)
        status, found = direct.search(None, "SUBJECT", f'"{subject}"')
        assert status == "OK" and found[0].split(), "alice's INBOX lacks the message"
    finally:
        direct.logout()


@pytest.mark.parametrize(
    "password",
    ["not-bobs-password", "bob-Upstream-2"],  # Dovecot's own password is not nginx's either
)
def test_the_auth_service_refuses_a_wrong_password(nginx, password):
    client = imaplib.IMAP4(LOOPBACK, nginx.plain_port, timeout=10)
    try:
        with pytest.raises(imaplib.IMAP4.error, match="Invalid login or password"):
            client.login("bob", password)
    finally:
        client.shutdown()


def test_starttls_and_implicit_tls_listeners_present_the_test_certificate(nginx, test_ca):
    context = test_ca.client_context()
    client = imaplib.IMAP4(LOOPBACK, nginx.starttls_port, timeout=10)
    try:
        client.starttls(context)
        assert client.login("bob", NGINX_PASSWORDS["bob"])[0] == "OK"
    finally:
        client.logout()
    implicit = imaplib.IMAP4_SSL(LOOPBACK, nginx.tls_port, ssl_context=context, timeout=10)
    try:
        assert implicit.login("bob", NGINX_PASSWORDS["bob"])[0] == "OK"
    finally:
        implicit.logout()


def test_it_runs_a_master_and_its_workers_and_stop_ends_them_all(test_ca, dovecot):
    server = NginxMail(
        test_ca, dovecot.imap_port, NGINX_PASSWORDS, MASTER_USER, MASTER_PASSWORD, workers=2
    )
    try:
        server.start()
        pids = [*server.pids(), server.auth.pid]
        assert len(pids) == 4  # master, two workers, the auth service
        assert server.pss_kib() > 0 and server.cpu() >= 0 and server.auth_cpu() >= 0
    finally:
        server.cleanup()

    def gone() -> bool:
        return not any(os.path.exists(f"/proc/{pid}") for pid in pids)

    wait_until(gone, timeout=10, what="nginx's processes to exit")
