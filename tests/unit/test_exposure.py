"""Credentials never cross a network in clear text by default, and when a config asks for it,
`check-config` and the start of `apppass serve` say so (proxy/exposure.py)."""

from __future__ import annotations

import pytest
import yaml

from proxy.cli import main
from proxy.config import parse
from proxy.exposure import clear_text_warnings, is_loopback
from proxy.protocols import MailProtocol, TlsMode

MASTER_SECRET, BIND_SECRET = "Master-Sekr3t-1", "Bind-Sekr3t-2"
BIND = {"bind_dn": "cn=apppass,dc=example,dc=org", "bind_password_file": "bind"}


def settings(tmp_path, upstream=None, ldap=None):
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "master").write_text(MASTER_SECRET + "\n")
    (tmp_path / "bind").write_text(BIND_SECRET + "\n")
    directory: dict = {"static": "users.yaml"}
    if ldap is not None:
        directory = {"ldap": {"base_dn": "dc=example,dc=org", **ldap}}
    data = {
        "store": {"sqlite": "apppass.db"},
        "directory": directory,
        "upstream": upstream or {},
        "listeners": [],
    }
    return parse(data, source="apppass.yaml", base_dir=tmp_path)


def imap(host, **kw):
    return {"imap": {"host": host, "master_user": "proxy", "master_password_file": "master", **kw}}


# --- the default: TLS, verified, chosen by port ---------------------------------------------


@pytest.mark.parametrize(
    "protocol, written, tls, port",
    [
        ("imap", {}, TlsMode.STARTTLS, 143),
        ("imap", {"port": 993}, TlsMode.IMPLICIT, 993),
        ("imap", {"port": 1143}, TlsMode.STARTTLS, 1143),
        ("pop3", {}, TlsMode.STARTTLS, 110),
        ("pop3", {"port": 995}, TlsMode.IMPLICIT, 995),
        ("smtp", {}, TlsMode.STARTTLS, 587),
        ("smtp", {"port": 465}, TlsMode.IMPLICIT, 465),
        ("smtp", {"port": 25}, TlsMode.STARTTLS, 25),
        # Written out, the mode decides and the port follows it, as before.
        ("imap", {"tls": "implicit"}, TlsMode.IMPLICIT, 993),
        ("smtp", {"tls": "none"}, TlsMode.NONE, 25),
        ("imap", {"tls": "none", "port": 993}, TlsMode.NONE, 993),
    ],
)
def test_upstream_tls_defaults_to_verified_tls_by_port(tmp_path, protocol, written, tls, port):
    up = {"host": "mail.example.test", **written}
    if protocol == "smtp":
        up["login"] = "xclient"
    else:
        up.update(master_user="proxy", master_password_file="master")
    s = settings(tmp_path, {protocol: up})
    upstream = s.upstreams[MailProtocol(protocol)]
    assert (upstream.tls, upstream.port, upstream.verify) == (tls, port, True)


# --- which hosts are loopback -----------------------------------------------------------------


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost.", True),
        ("128.0.0.1", False),
        ("10.0.0.5", False),
        ("::2", False),
        ("0.0.0.0", False),
        ("localhost.example.com", False),
        ("mail.example.test", False),
        ("", False),
    ],
)
def test_loopback_hosts(host, loopback):
    assert is_loopback(host) is loopback


# --- the warnings -----------------------------------------------------------------------------

CLEAR_MASTER = (
    "upstream.imap: tls is none, so the master password goes to mail.example.test:143 in clear "
    "text; use tls: starttls or implicit"
)
CLEAR_XCLIENT = (
    "upstream.smtp: tls is none, so XCLIENT logins (which the upstream trusts from apppass's "
    "address) go to 10.0.0.25:25 in clear text; use tls: starttls or implicit"
)
CLEAR_BIND = (
    "directory.ldap.uris[0]: ldap://ldap.example.test without start_tls, so the bind password "
    "goes in clear text; set start_tls: true or use ldaps://"
)


@pytest.mark.parametrize(
    "upstream, ldap, warnings",
    [
        # Defaults and explicit TLS: nothing to say.
        (imap("mail.example.test"), None, []),
        (imap("mail.example.test", tls="implicit"), None, []),
        (
            imap("mail.example.test", tls="starttls", verify=False),
            None,
            [
                "upstream.imap: verify is false, so any server that answers at"
                " mail.example.test:143 gets the proxy's logins; set verify: true (and ca_file"
                " for a private CA)"
            ],
        ),
        # Clear text to another machine: said, whatever the login.
        (imap("mail.example.test", tls="none"), None, [CLEAR_MASTER]),
        (
            {"smtp": {"host": "10.0.0.25", "tls": "none", "login": "xclient"}},
            None,
            [CLEAR_XCLIENT],
        ),
        (
            {
                "smtp": {
                    "host": "mail.example.test",
                    "tls": "none",
                    "login": "authzid",
                    "master_user": "proxy",
                    "master_password_file": "master",
                }
            },
            None,
            [CLEAR_MASTER.replace("imap", "smtp").replace(":143", ":25")],
        ),
        # No credential at all (an SMTP relay that trusts apppass's address): nothing to hide.
        ({"smtp": {"host": "10.0.0.25", "tls": "none", "login": "none"}}, None, []),
        # Loopback: nothing crosses a network.
        (imap("127.0.0.1", tls="none"), None, []),
        (imap("::1", tls="none"), None, []),
        (imap("localhost", tls="none"), None, []),
        ({"smtp": {"host": "127.0.0.2", "tls": "none", "login": "xclient"}}, None, []),
        # LDAP: a bind password over ldap:// to another machine, unless StartTLS.
        (None, {"uris": ["ldap://ldap.example.test"], **BIND}, [CLEAR_BIND]),
        (None, {"uris": ["ldap://ldap.example.test"], **BIND, "start_tls": True}, []),
        (None, {"uris": ["ldaps://ldap.example.test"], **BIND}, []),
        (None, {"uris": ["ldap://ldap.example.test"]}, []),  # an anonymous bind: no password
        (None, {"uris": ["ldap://127.0.0.1:3389"], **BIND}, []),
        (None, {"uris": ["ldap://[::1]:389"], **BIND}, []),
        (
            None,
            {"uris": ["ldap://localhost", "ldap://ldap.example.test:389"], **BIND},
            [CLEAR_BIND.replace("[0]", "[1]").replace("test ", "test:389 ")],
        ),
        # Both at once, upstreams first.
        (
            imap("mail.example.test", tls="none"),
            {"uris": ["ldap://ldap.example.test"], **BIND},
            [CLEAR_MASTER, CLEAR_BIND],
        ),
    ],
)
def test_clear_text_warnings(tmp_path, upstream, ldap, warnings):
    assert clear_text_warnings(settings(tmp_path, upstream, ldap)) == warnings


@pytest.mark.parametrize(
    "relay, warnings",
    [
        ({"host": "relay.example.test"}, []),  # STARTTLS, verified: the default
        ({"host": "relay.example.test", "tls": "implicit", "verify": False}, []),  # no login
        (
            {"host": "relay.example.test", "verify": False, "login": "apppass"},
            [
                "notify.smtp: verify is false, so any server that answers at"
                " relay.example.test:587 gets the relay password; set verify: true (and ca_file"
                " for a private CA)"
            ],
        ),
        (
            {"host": "10.0.0.25", "tls": "none"},
            [
                "notify.smtp: tls is none, so the notices (people's names and addresses, device"
                " names, dates) go to 10.0.0.25:25 in clear text; use tls: starttls or implicit"
            ],
        ),
        ({"host": "127.0.0.1", "tls": "none", "login": "apppass"}, []),  # loopback
    ],
)
def test_notify_relay_warnings(tmp_path, relay, warnings):
    (tmp_path / "relay-password").write_text(MASTER_SECRET + "\n")
    if "login" in relay:
        relay = {**relay, "password_file": "relay-password"}
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    data = {
        "store": {"sqlite": "apppass.db"},
        "directory": {"static": "users.yaml"},
        "upstream": {},
        "listeners": [],
        "notify": {"from": "it@example.test", "smtp": relay},
    }
    found = clear_text_warnings(parse(data, source="apppass.yaml", base_dir=tmp_path))
    assert found == warnings
    assert MASTER_SECRET not in "\n".join(found)


def test_warnings_never_hold_a_secret(tmp_path):
    s = settings(tmp_path, imap("mail.example.test", tls="none"), {"uris": ["ldap://l"], **BIND})
    text = "\n".join(clear_text_warnings(s))
    assert len(clear_text_warnings(s)) == 2
    assert MASTER_SECRET not in text and BIND_SECRET not in text


# --- check-config says it, and still passes ---------------------------------------------------


def test_check_config_warns_about_clear_text_and_exits_0(tmp_path, capsys):
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "master").write_text("m\n")
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": {"sqlite": "x.db"},
                "directory": {"static": "users.yaml"},
                "upstream": imap("mail.example.test", tls="none"),
                "listeners": [
                    {
                        "protocol": "imap",
                        "bind": "127.0.0.1:1143",
                        "tls": "none",
                        "plaintext_auth_from": ["127.0.0.0/8"],
                    }
                ],
            }
        )
    )
    assert main(["-c", str(cfg), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert err == f"apppass.yaml: warning: {CLEAR_MASTER}\n"
    assert out.startswith(f"{cfg}: ok (1 listeners"), out


def test_check_config_is_quiet_about_loopback(tmp_path, capsys):
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "master").write_text("m\n")
    cfg = tmp_path / "apppass.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": {"sqlite": "x.db"},
                "directory": {"static": "users.yaml"},
                "upstream": imap("127.0.0.1", tls="none"),
            }
        )
    )
    assert main(["-c", str(cfg), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"{cfg}: ok"), (out, err)
