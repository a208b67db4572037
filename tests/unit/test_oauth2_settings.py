"""OAuth2 settings (proxy/oauth2/settings.py): every missing or wrong key is named with its path,
as check-config reports it, and neither a secret nor key material ever appears in a message or
a repr."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import ConfigError, parse
from proxy.exposure import clear_text_warnings
from proxy.oauth2.settings import Grant
from tests.support.ca import TestCA

TOKEN_URL = "https://login.microsoftonline.com/tenant-id/oauth2/v2.0/token"
SCOPE = "https://outlook.office365.com/.default"
SECRET = "Entra~Secret~Value~42"


def _pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return TestCA.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def material(tmp_path_factory, ca):
    """Keys, certificates and key files, made once (RSA keys take a while)."""
    folder = tmp_path_factory.mktemp("material")
    app = ca.issue("app", dns_names=("apppass",), ips=(), rsa_key=True)
    other = ca.issue("other", dns_names=("apppass",), ips=(), rsa_key=True)
    (folder / "app.pem").write_bytes(app.cert.read_bytes())
    (folder / "app.key").write_bytes(app.key.read_bytes())
    (folder / "other.pem").write_bytes(other.cert.read_bytes())
    (folder / "ec.key").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "sa.json").write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "apppass@project.iam.gserviceaccount.com",
                "private_key_id": "kid-1",
                "private_key": _pem(key).decode(),
                "token_uri": "https://oauth2.googleapis.com/token",
            }
        )
    )
    return folder


@pytest.fixture
def files(tmp_path, material):
    for item in material.iterdir():
        shutil.copy(item, tmp_path / item.name)
    (tmp_path / "users.yaml").write_text("accounts: {}\n")
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "user.json").write_text(json.dumps({"type": "authorized_user"}))
    return tmp_path


def config(**oauth2) -> dict:
    """IMAP and SMTP upstreams logging in with xoauth2 through the settings named m365."""
    m365 = {
        "grant": "client_credentials",
        "token_url": TOKEN_URL,
        "client_id": "11111111-2222-3333-4444-555555555555",
        "client_secret_file": "secret",
        "scope": SCOPE,
        **oauth2,
    }
    return {
        "store": {"sqlite": "codes.db"},
        "directory": {"static": "users.yaml"},
        "oauth2": {"m365": {k: v for k, v in m365.items() if v is not None}},
        "upstream": {
            "imap": {
                "host": "outlook.office365.com",
                "port": 993,
                "login": "xoauth2",
                "oauth2": "m365",
            },
            "smtp": {"host": "smtp.office365.com", "login": "xoauth2", "oauth2": "m365"},
        },
    }


def errors(data, folder) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, source="apppass.yaml", base_dir=folder)
    return info.value.problems


def test_named_settings_are_shared_by_the_upstreams_that_reference_them(files):
    settings = parse(config(), base_dir=files)
    imap, smtp = settings.upstreams["imap"], settings.upstreams["smtp"]
    assert imap.oauth2 is smtp.oauth2
    assert imap.oauth2 is not None
    assert (imap.oauth2.grant, imap.oauth2.token_url, imap.oauth2.scope) == (
        Grant.CLIENT_CREDENTIALS,
        TOKEN_URL,
        SCOPE,
    )
    assert imap.oauth2.client_secret == SECRET
    assert (imap.port, imap.tls, smtp.port) == (993, "implicit", 587)
    assert SECRET not in repr(settings) and SECRET not in repr(imap.oauth2)
    assert imap.oauth2.key_path == "oauth2.m365"


def test_settings_written_under_an_upstream_are_its_own(files):
    data = config()
    data["upstream"]["imap"]["oauth2"] = dict(data.pop("oauth2")["m365"], scope=[SCOPE, "x"])
    del data["upstream"]["smtp"]
    oauth2 = parse(data, base_dir=files).upstreams["imap"].oauth2
    assert oauth2 is not None
    assert (oauth2.name, oauth2.key_path, oauth2.scope) == (
        "upstream.imap.oauth2",
        "upstream.imap.oauth2",
        f"{SCOPE} x",
    )


def test_a_certificate_credential_carries_its_thumbprints(files):
    data = config(client_secret_file=None, private_key_file="app.key", certificate_file="app.pem")
    oauth2 = parse(data, base_dir=files).upstreams["imap"].oauth2
    assert oauth2 is not None
    assert oauth2.client_secret is None
    assert oauth2.private_key == (files / "app.key").read_bytes()
    assert len(oauth2.x5t) == 27 and len(oauth2.x5t_s256) == 43  # base64url SHA-1, SHA-256
    assert b"PRIVATE KEY" not in repr(oauth2).encode()


def test_a_service_account_reads_its_key_file(files):
    data = config()
    data["oauth2"]["m365"] = {
        "grant": "service_account",
        "key_file": "sa.json",
        "scope": "https://mail.google.com/",
    }
    oauth2 = parse(data, base_dir=files).upstreams["imap"].oauth2
    assert oauth2 is not None
    assert (oauth2.client_id, oauth2.key_id, oauth2.token_url) == (
        "apppass@project.iam.gserviceaccount.com",
        "kid-1",
        "https://oauth2.googleapis.com/token",
    )
    assert oauth2.private_key is not None and b"PRIVATE KEY" in oauth2.private_key


# (change to the config, the message check-config prints). {dir} is the config's folder.
CASES = [
    (
        {"grant": None},
        "apppass.yaml: oauth2.m365.grant: is required",
    ),
    (
        {"grant": "password"},
        "apppass.yaml: oauth2.m365.grant: must be one of client_credentials, service_account"
        ' (got "password")',
    ),
    (
        {"token_url": None},
        "apppass.yaml: oauth2.m365.token_url: is required",
    ),
    (
        {"token_url": "login.microsoftonline.com/x"},
        "apppass.yaml: oauth2.m365.token_url: must be an https:// URL like"
        " https://login.microsoftonline.com/TENANT/oauth2/v2.0/token"
        ' (got "login.microsoftonline.com/x")',
    ),
    (
        {"token_url": "https://id:pw@login.example/token"},
        "apppass.yaml: oauth2.m365.token_url: must not hold credentials: use client_secret_file"
        ' (got "https://id:pw@login.example/token")',
    ),
    (
        {"client_id": None},
        "apppass.yaml: oauth2.m365.client_id: is required",
    ),
    (
        {"scope": None},
        "apppass.yaml: oauth2.m365.scope: is required",
    ),
    (
        {"scope": ['a"b']},
        "apppass.yaml: oauth2.m365.scope: must be a scope like"
        ' https://outlook.office365.com/.default, or a list of them (got ["a\\"b"])',
    ),
    (
        {"client_secret_file": None},
        "apppass.yaml: oauth2.m365.client_secret_file: is required when grant is"
        " client_credentials, unless private_key_file and certificate_file are set",
    ),
    (
        {"client_secret_file": "empty"},
        'apppass.yaml: oauth2.m365.client_secret_file: file is empty: {dir}/empty (got "empty")',
    ),
    (
        {"client_secret_file": "missing"},
        "apppass.yaml: oauth2.m365.client_secret_file: file not found: {dir}/missing"
        ' (got "missing")',
    ),
    (
        {"private_key_file": "app.key", "certificate_file": "app.pem"},
        "apppass.yaml: oauth2.m365.private_key_file: is not used with client_secret_file: set"
        " one of them",
    ),
    (
        {"client_secret_file": None, "private_key_file": "app.key"},
        "apppass.yaml: oauth2.m365.certificate_file: is required with private_key_file (its"
        " thumbprint names the key to the endpoint)",
    ),
    (
        {"client_secret_file": None, "private_key_file": "secret", "certificate_file": "app.pem"},
        "apppass.yaml: oauth2.m365.private_key_file: is not a PEM private key without a"
        " passphrase: {dir}/secret (openssl pkey -in KEY -out KEY.pem writes one)"
        ' (got "secret")',
    ),
    (
        {"client_secret_file": None, "private_key_file": "ec.key", "certificate_file": "app.pem"},
        "apppass.yaml: oauth2.m365.private_key_file: must be an RSA key (tokens are asked for"
        ' with RS256): {dir}/ec.key (got "ec.key")',
    ),
    (
        {"client_secret_file": None, "private_key_file": "app.key", "certificate_file": "secret"},
        "apppass.yaml: oauth2.m365.certificate_file: is not a PEM certificate: {dir}/secret"
        ' (got "secret")',
    ),
    (
        {
            "client_secret_file": None,
            "private_key_file": "app.key",
            "certificate_file": "other.pem",
        },
        "apppass.yaml: oauth2.m365.certificate_file: is not the certificate of private_key_file"
        ' (got "other.pem")',
    ),
    (
        {"certificate_file": "app.pem"},
        "apppass.yaml: oauth2.m365.certificate_file: is used only with private_key_file",
    ),
    (
        {"key_file": "sa.json"},
        "apppass.yaml: oauth2.m365.key_file: is used only when grant is service_account",
    ),
    (
        {"timeout": "0s"},
        'apppass.yaml: oauth2.m365.timeout: must be at least 1s (got "0s")',
    ),
    (
        {"retries": 9},
        "apppass.yaml: oauth2.m365.retries: must be an integer >= 0 and <= 5 (got 9)",
    ),
    (
        {"ca_file": "nope.pem"},
        'apppass.yaml: oauth2.m365.ca_file: file not found: {dir}/nope.pem (got "nope.pem")',
    ),
    (
        {"scopes": SCOPE},
        "apppass.yaml: oauth2.m365.scopes: unknown key; did you mean 'scope'?",
    ),
]


@pytest.mark.parametrize(("change", "message"), CASES, ids=[m.split(": ")[1] for _, m in CASES])
def test_each_mistake_names_its_key(files, change, message):
    problems = errors(config(**change), files)
    assert message.replace("{dir}", str(files)) in problems, problems


SERVICE_ACCOUNT_CASES = [
    (
        {"key_file": None},
        "apppass.yaml: oauth2.google.key_file: is required",
    ),
    (
        {"key_file": "user.json"},
        "apppass.yaml: oauth2.google.key_file: must be a Google service-account key (JSON with"
        " type service_account, client_email and private_key): {dir}/user.json"
        ' (got "user.json")',
    ),
    (
        {"key_file": "secret"},
        "apppass.yaml: oauth2.google.key_file: must be a Google service-account key (JSON with"
        ' type service_account, client_email and private_key): {dir}/secret (got "secret")',
    ),
    (
        {"client_id": "x"},
        "apppass.yaml: oauth2.google.client_id: is used only when grant is client_credentials",
    ),
]


@pytest.mark.parametrize(("change", "message"), SERVICE_ACCOUNT_CASES)
def test_each_service_account_mistake_names_its_key(files, change, message):
    google = {"grant": "service_account", "key_file": "sa.json", "scope": "x", **change}
    data = config()
    data["oauth2"] = {"google": {k: v for k, v in google.items() if v is not None}}
    for up in data["upstream"].values():
        up["oauth2"] = "google"
    problems = errors(data, files)
    assert message.replace("{dir}", str(files)) in problems, problems
    assert SECRET not in "\n".join(problems)


UPSTREAM_CASES = [
    (
        None,
        "xoauth2",
        "apppass.yaml: upstream.imap.oauth2: is required when login is xoauth2 or oauthbearer"
        " (a mapping of OAuth2 settings, or the name of one under the top-level oauth2)",
    ),
    (
        "google",
        "xoauth2",
        "apppass.yaml: upstream.imap.oauth2: names no settings under the top-level oauth2"
        ' (defined: m365) (got "google")',
    ),
    (
        ["m365"],
        "oauthbearer",
        "apppass.yaml: upstream.imap.oauth2: must be a mapping of OAuth2 settings or the name"
        ' of one under the top-level oauth2 (got ["m365"])',
    ),
    (
        "m365",
        "authzid",
        "apppass.yaml: upstream.imap.oauth2: is used only when login is xoauth2 or oauthbearer",
    ),
    (
        "m365",
        "xclient",
        "apppass.yaml: upstream.imap.login: must be one of authzid, xoauth2, oauthbearer"
        ' (got "xclient")',
    ),
]


@pytest.mark.parametrize(("value", "login", "message"), UPSTREAM_CASES)
def test_an_upstreams_oauth2_reference_is_checked(files, value, login, message):
    data = config()
    data["upstream"]["imap"] = {"host": "outlook.office365.com", "login": login, "oauth2": value}
    problems = errors(data, files)
    assert message in problems, problems


def test_a_name_under_oauth2_is_one_word(files):
    data = config()
    data["oauth2"]["m 365"] = copy.deepcopy(data["oauth2"]["m365"])
    assert (
        "apppass.yaml: oauth2.m 365: must be a name of letters, digits, '-' or '_' (it is"
        " referenced as upstream.PROTOCOL.oauth2: NAME)" in errors(data, files)
    )


def test_every_mistake_of_one_mapping_is_reported_at_once(files):
    data = config(grant="client_credentials", token_url=5, client_id=None, retries=-1)
    problems = errors(data, files)
    assert [p.split(": ")[1] for p in problems] == [
        "oauth2.m365.retries",
        "oauth2.m365.token_url",
        "oauth2.m365.client_id",
    ], problems


def test_clear_text_to_a_token_endpoint_or_an_upstream_is_warned_about(files):
    data = config(token_url="http://idp.example.org/token")
    data["upstream"]["imap"]["tls"] = "none"
    warnings = clear_text_warnings(parse(data, base_dir=files))
    assert warnings == [
        "upstream.imap: tls is none, so OAuth2 tokens (an application's open every mailbox) go"
        " to outlook.office365.com:993 in clear text; use tls: starttls or implicit",
        "oauth2.m365.token_url: http://, so the client's credentials and the tokens cross the"
        " network to idp.example.org in clear text; use https://",
    ]
    local = config(token_url="http://127.0.0.1:8080/token")
    assert clear_text_warnings(parse(local, base_dir=files)) == []
