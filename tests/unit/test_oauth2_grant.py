"""What goes to a token endpoint and what its answers mean (proxy/oauth2/assertion.py and
grant.py): the JWTs' claims and headers, checked with the public key as Entra ID and Google
check them; the form of each grant; every kind of answer."""

from __future__ import annotations

import base64
import hashlib
import json

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.config import parse
from proxy.oauth2.assertion import ASSERTION_SECONDS, GRANT_SECONDS, Signer
from proxy.oauth2.grant import (
    CLIENT_ASSERTION_TYPE,
    DEFAULT_LIFETIME,
    JWT_BEARER_GRANT,
    MAX_LIFETIME,
    TokenError,
    parse_answer,
    request_fields,
)
from tests.support.ca import TestCA

NOW = 1_800_000_000.0
TOKEN_URL = "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grant")
    ca = TestCA.create(folder / "ca")
    app = ca.issue("app", dns_names=("apppass",), ips=(), rsa_key=True)
    (folder / "users.yaml").write_text("accounts: {}\n")
    (folder / "app.pem").write_bytes(app.cert.read_bytes())
    (folder / "app.key").write_bytes(app.key.read_bytes())
    (folder / "sa.json").write_text(
        json.dumps(
            {
                "type": "service_account",
                "client_email": "sa@project.iam.gserviceaccount.com",
                "private_key_id": "kid-7",
                "private_key": app.key.read_text(),
            }
        )
    )
    return folder


def oauth2(folder, settings: dict):
    data = {
        "store": {"sqlite": "codes.db"},
        "directory": {"static": "users.yaml"},
        "upstream": {"imap": {"host": "mail.example", "login": "xoauth2", "oauth2": settings}},
    }
    return parse(data, base_dir=folder).upstreams["imap"].oauth2


def public_key(folder):
    return x509.load_pem_x509_certificate((folder / "app.pem").read_bytes()).public_key()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_the_client_assertion_is_what_entra_id_verifies(folder):
    settings = oauth2(
        folder,
        {
            "grant": "client_credentials",
            "token_url": TOKEN_URL,
            "client_id": "app-id",
            "private_key_file": "app.key",
            "certificate_file": "app.pem",
            "scope": "https://outlook.office365.com/.default",
        },
    )
    fields = request_fields(settings, Signer(settings), "alice", NOW, "jti-1")
    assertion = fields.pop("client_assertion")
    assert fields == {
        "grant_type": "client_credentials",
        "client_id": "app-id",
        "scope": "https://outlook.office365.com/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
    }
    claims = jwt.decode(
        assertion,
        public_key(folder),
        algorithms=["RS256"],
        audience=TOKEN_URL,
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )
    assert claims == {
        "iss": "app-id",
        "sub": "app-id",
        "aud": TOKEN_URL,
        "jti": "jti-1",
        "iat": int(NOW),
        "nbf": int(NOW),
        "exp": int(NOW) + ASSERTION_SECONDS,
    }
    der = x509.load_pem_x509_certificate((folder / "app.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    header = jwt.get_unverified_header(assertion)
    assert header["alg"] == "RS256"
    assert header["x5t"] == b64url(hashlib.sha1(der).digest())
    assert header["x5t#S256"] == b64url(hashlib.sha256(der).digest())
    assert ASSERTION_SECONDS <= 600  # Entra ID's limit


def test_the_service_account_grant_is_what_google_verifies(folder):
    settings = oauth2(
        folder,
        {"grant": "service_account", "key_file": "sa.json", "scope": "https://mail.google.com/"},
    )
    fields = request_fields(settings, Signer(settings), "alice@example.org", NOW, "unused")
    assert fields["grant_type"] == JWT_BEARER_GRANT == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert set(fields) == {"grant_type", "assertion"}
    claims = jwt.decode(
        fields["assertion"],
        public_key(folder),
        algorithms=["RS256"],
        audience="https://oauth2.googleapis.com/token",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": "sa@project.iam.gserviceaccount.com",
        "sub": "alice@example.org",
        "scope": "https://mail.google.com/",
        "aud": "https://oauth2.googleapis.com/token",
        "iat": int(NOW),
        "exp": int(NOW) + GRANT_SECONDS,
    }
    assert jwt.get_unverified_header(fields["assertion"])["kid"] == "kid-7"
    assert GRANT_SECONDS <= 3600  # Google's limit


def test_a_signer_hides_its_key(folder):
    settings = oauth2(
        folder,
        {"grant": "service_account", "key_file": "sa.json", "scope": "https://mail.google.com/"},
    )
    assert "PRIVATE" not in repr(Signer(settings)) + repr(settings)


def answer(status: int, body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def test_a_token_answer_gives_the_token_and_its_lifetime():
    issued = parse_answer(
        200, answer(200, {"access_token": "abc", "token_type": "Bearer", "expires_in": 3599})
    )
    assert (issued.value, issued.lifetime) == ("abc", 3599)
    assert "abc" not in repr(issued)
    quoted = parse_answer(200, answer(200, {"access_token": "abc", "expires_in": "60"}))
    assert quoted.lifetime == 60
    assert parse_answer(200, answer(200, {"access_token": "abc"})).lifetime == DEFAULT_LIFETIME
    assert parse_answer(200, answer(200, {"access_token": "a", "expires_in": 10**9})).lifetime == (
        MAX_LIFETIME
    )
    assert parse_answer(200, answer(200, {"access_token": "a", "expires_in": -5})).lifetime == (
        DEFAULT_LIFETIME
    )


# (status, body, message, kind, retry)
REFUSALS = [
    (
        401,
        {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret."},
        "the token endpoint refused: invalid_client: AADSTS7000215: Invalid client secret.",
        "invalid_client",
        False,
    ),
    (
        400,
        {"error": "invalid_grant", "error_description": "Invalid email or User ID"},
        "the token endpoint refused: invalid_grant: Invalid email or User ID",
        "invalid_grant",
        False,
    ),
    (
        400,
        {"error": "unauthorized_client"},
        "the token endpoint refused: unauthorized_client",
        "unauthorized_client",
        False,
    ),
    (
        429,
        {"error": "throttled", "error_description": "Too many\nrequests\x00"},
        "the token endpoint refused: throttled: Too many requests",
        "throttled",
        True,
    ),
    (
        503,
        b"<html>Service Unavailable</html>",
        "the token endpoint answered HTTP 503 without JSON",
        "http 503",
        True,
    ),
    (
        404,
        {"message": "no such tenant"},
        "the token endpoint answered HTTP 404",
        "http 404",
        False,
    ),
    (
        200,
        {"token_type": "Bearer"},
        "the token endpoint answered without an access_token",
        "no token",
        False,
    ),
    (
        200,
        {"access_token": "abc", "token_type": "mac"},
        "the token endpoint issued a mac token, not a bearer token",
        "not bearer",
        False,
    ),
    (
        200,
        {"access_token": "a b\r\nc"},
        "the token endpoint answered without an access_token",
        "no token",
        False,
    ),
]


@pytest.mark.parametrize(("status", "body", "message", "kind", "retry"), REFUSALS)
def test_each_other_answer_is_a_token_error(status, body, message, kind, retry):
    with pytest.raises(TokenError) as info:
        parse_answer(status, answer(status, body))
    assert (str(info.value), info.value.kind, info.value.retry) == (message, kind, retry)


def test_a_long_error_text_is_cut():
    with pytest.raises(TokenError) as info:
        parse_answer(
            400, answer(400, {"error": "invalid_request", "error_description": "x" * 5000})
        )
    assert len(str(info.value)) < 500
