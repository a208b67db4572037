"""apppass with an OpenLDAP directory: the CLI and logins through the proxy resolve accounts in
slapd, and LDAP trouble is a temporary failure that heals by itself."""

from __future__ import annotations

import imaplib

import pytest
import pytest_twisted
from twisted.internet import threads

from proxy.cli import main as cli
from tests.integration.harness import start_proxy
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.servers.slapd import Slapd
from tests.support.ca import TestCA

pytestmark = pytest.mark.integration


@pytest_twisted.async_yield_fixture(scope="module")
async def ldap_proxy(dovecot, test_ca: TestCA, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldap-proxy")
    server = Slapd(test_ca)
    await threads.deferToThread(server.start)
    (folder / "bind-password").write_text(server.service_password + "\n")
    harness = await start_proxy(
        folder,
        directory={
            "ldap": {
                "preset": "openldap",
                "uris": [server.uri],
                "start_tls": True,
                "ca_file": str(test_ca.ca),
                "bind_dn": server.service_dn,
                "bind_password_file": "bind-password",
                "base_dn": server.base_dn,
                "cache_ttl": "0s",
                "negative_cache_ttl": "0s",
                "timeout": "2s",
                "connect_timeout": "2s",
                "retry_after": "1s",
            }
        },
        policy={"legacy_group": "legacy-mail"},
        listeners=[
            {
                "name": "plain",
                "protocol": "imap",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "none",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    harness.slapd = server
    yield harness
    await harness.stop()
    await threads.deferToThread(server.cleanup)


def run_cli(harness, *args) -> tuple[int, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(["-c", str(harness.folder / "apppass.yaml"), *args])
    return code, out.getvalue() + err.getvalue()


def login(port: int, user: str, code: str) -> str:
    try:
        with imaplib.IMAP4("127.0.0.1", port) as imap:
            typ, _ = imap.login(user, code)
            return typ
    except imaplib.IMAP4.error as exc:
        return str(exc)


@pytest_twisted.ensureDeferred
async def test_code_created_by_cli_for_an_ldap_account_logs_in(ldap_proxy):
    status, out = await threads.deferToThread(
        run_cli,
        ldap_proxy,
        "codes",
        "create",
        "alice@example.org",
        "--label",
        "ldap phone",
        "--json",
    )
    assert status == 0, "codes create failed"  # its output holds the code: never print it
    import json

    code = json.loads(out)["code"]
    assert await threads.deferToThread(login, ldap_proxy.port("plain"), "alice", code) == "OK"
    status, out = await threads.deferToThread(run_cli, ldap_proxy, "codes", "list", "alice")
    assert "ldap phone" in out and "1/-" in out


@pytest.mark.parametrize(
    "login_name,message",
    [
        ("bob", "apppass: bob: account not allowed legacy sign-in (not a member of legacy-mail)"),
        ("carol", "apppass: carol: account disabled"),
        ("dave", "apppass: dave: account expired"),
        ("*)(uid=*", "apppass: unknown login '*)(uid=*'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_cli_refuses_ldap_accounts_with_the_reason(ldap_proxy, login_name, message):
    status, out = await threads.deferToThread(
        run_cli, ldap_proxy, "codes", "create", login_name, "--label", "x"
    )
    assert (status, out.strip()) == (1, message)


@pytest_twisted.ensureDeferred
async def test_directory_check_shows_what_the_proxy_sees(ldap_proxy):
    status, out = await threads.deferToThread(
        run_cli, ldap_proxy, "directory", "check", "alice@example.org"
    )
    assert status == 0, out
    assert "upstream identity  alice@example.org" in out
    assert "legacy-mail" in out and "verdict            may use app passwords" in out


@pytest_twisted.ensureDeferred
async def test_ldap_down_is_unavailable_then_recovers(ldap_proxy):
    _, code = ldap_proxy.issue("alice", label="outage")
    port = ldap_proxy.port("plain")
    await threads.deferToThread(ldap_proxy.slapd.stop)
    try:
        reply = await threads.deferToThread(login, port, "alice", code)
        assert "[UNAVAILABLE]" in reply, reply
    finally:
        await threads.deferToThread(ldap_proxy.slapd.start)
    assert await threads.deferToThread(login, port, "alice", code) == "OK"
    events = ldap_proxy.audit_events("auth")
    assert any(
        e.get("refusal") == "temporary" and "directory unavailable" in e.get("reason", "")
        for e in events
    )


# -- Active Directory, configured as in config/examples/active-directory.yaml ----------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def ad_proxy(dovecot, samba_dc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ad-proxy")
    (folder / "ad-bind").write_text(samba_dc.service_password + "\n")
    harness = await start_proxy(
        folder,
        directory={
            "ldap": {
                "preset": "active_directory",
                "uris": [samba_dc.ldaps_uri],
                "ca_file": str(samba_dc.tls.ca),
                "bind_dn": samba_dc.service_bind_dn,
                "bind_password_file": "ad-bind",
                "base_dn": samba_dc.base_dn,
            }
        },
        policy={"legacy_group": f"CN=legacy-mail,CN=Users,{samba_dc.base_dn}"},
        listeners=[
            {
                "name": "plain",
                "protocol": "imap",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
        upstream={
            "imap": {
                "host": "127.0.0.1",
                "port": dovecot.imap_port,
                "tls": "none",
                "master_user": MASTER_USER,
                "master_password": MASTER_PASSWORD,
            }
        },
    )
    yield harness
    await harness.stop()


@pytest.mark.parametrize(
    "name", ["alice", "SAMDOM\\alice", "alice@samdom.example.com", "alice@example.com"]
)
@pytest_twisted.ensureDeferred
async def test_ad_account_logs_in_by_every_name_form(ad_proxy, name):
    status, out = await threads.deferToThread(
        run_cli, ad_proxy, "codes", "create", name, "--label", "ad", "--json"
    )
    assert status == 0, "codes create failed"  # its output holds the code: never print it
    import json

    code = json.loads(out)["code"]
    imap_name = '"' + name.replace("\\", "\\\\") + '"'  # an IMAP quoted string: backslash escaped
    assert await threads.deferToThread(login, ad_proxy.port("plain"), imap_name, code) == "OK"


@pytest.mark.parametrize(
    "name,message",
    [  # AD's canonical login is the userPrincipalName
        ("bob", "apppass: bob@samdom.example.com: account not allowed legacy sign-in"),
        ("dora", "apppass: dora@samdom.example.com: account disabled"),
        ("eve", "apppass: eve@samdom.example.com: account expired"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_ad_cli_refusals(ad_proxy, name, message):
    status, out = await threads.deferToThread(
        run_cli, ad_proxy, "codes", "create", name, "--label", "x"
    )
    assert status == 1 and out.startswith(message), out


@pytest_twisted.ensureDeferred
async def test_ad_directory_check(ad_proxy):
    status, out = await threads.deferToThread(
        run_cli, ad_proxy, "directory", "check", "SAMDOM\\carl"
    )
    assert status == 0, out  # carl is in legacy-mail through the nested group mail-staff
    assert "upstream identity  carl@example.com" in out
