"""Every shipped example config is valid and sends no credential in clear text: the only change
is that files it names exist."""

import datetime
import functools
import json
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from proxy.config import parse
from proxy.exposure import clear_text_warnings

EXAMPLES = sorted((Path(__file__).parents[2] / "config" / "examples").glob("*.yaml"))


@functools.cache
def _oauth2_material() -> dict[str, str]:
    """An RSA key, its certificate and a service-account key file, for the OAuth2 keys whose
    files are read when the config loads (made once: RSA keys take a while)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "apppass")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    account = {"type": "service_account", "client_email": "sa@p.iam.gserviceaccount.com"}
    return {
        "private_key_file": pem,
        "certificate_file": cert.public_bytes(serialization.Encoding.PEM).decode(),
        ".json": json.dumps({**account, "private_key": pem}),
    }


def _content(key: str, value: str) -> str:
    material = _oauth2_material()
    if key == "static":
        return "accounts: {}\n"
    return material.get(key) or material.get(Path(value).suffix) or "placeholder\n"


def _point_files_into(node, folder: Path):
    """Replace every *_file / static / ca path with a file of that name in `folder`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(value, str) and (key.endswith("_file") or key == "static"):
                target = folder / Path(value).name
                target.write_text(_content(key, value))
                node[key] = str(target)
            else:
                _point_files_into(value, folder)
    elif isinstance(node, list):
        for item in node:
            _point_files_into(item, folder)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_config_is_valid(example, tmp_path):
    data = yaml.safe_load(example.read_text())
    _point_files_into(data, tmp_path)
    settings = parse(data, source=example.name, base_dir=tmp_path)
    assert settings.listeners
    assert clear_text_warnings(settings) == []


def test_there_are_examples():
    assert {e.name for e in EXAMPLES} >= {
        "printer-relay.yaml",
        "openldap.yaml",
        "active-directory.yaml",
        "microsoft365.yaml",
        "google-workspace.yaml",
    }
