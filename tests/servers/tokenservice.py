"""A small OAuth2 authorization server for integration tests, playing Entra ID and Google.

Two real HTTP listeners on loopback, each served by a thread of the test process:

    https://127.0.0.1:PORT/token        (the test CA's certificate) what apppass asks:
        grant_type=client_credentials   client_id with client_secret, or with a client_assertion:
                                        an RS256 JWT (RFC 7523 §2.2) checked against the
                                        client's certificate (x5t#S256, iss = sub = client_id,
                                        aud = the token URL, exp, a jti used once)
        grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer
                                        a service account's RS256 JWT (RFC 7523 §2.1): iss = its
                                        client_email, sub = the user, scope, aud, exp
    http://127.0.0.1:PORT2/introspect   what Dovecot's oauth2 passdb asks (RFC 7662, POST):
        an application's token          {"active": true, "tenant": DOMAIN, "scope": ...}
        a user's token                  {"active": true, "username": USER, "scope": ...}
        anything else                   {"active": false}

Errors are RFC 6749 §5.2 JSON with Entra-like descriptions. The tests can expire tokens before
their time, revoke a client secret, take the token endpoint down (connections refused) or make
it hang, and read which requests came.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.servers.common import LOOPBACK, ServerError, free_port, wait_for_port
from tests.support.ca import CertFiles, TestCA

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# How long a held (slow) request waits at most for release(), so no thread outlives a test.
HOLD_LIMIT = 60.0


@dataclass
class Client:
    """A registered application: its secret, or its certificate (for private_key_jwt)."""

    secret: str | None = None
    certificate: x509.Certificate | None = None
    revoked: bool = False


@dataclass
class Issued:
    user: str | None  # None: an application's token, good for every mailbox of the tenant
    scope: str
    expires: float  # time.time()


@dataclass
class Request:
    grant: str
    client: str  # client_id, or the service account's email
    user: str | None = None
    error: str | None = None


@dataclass
class _State:
    clients: dict[str, Client] = field(default_factory=dict)
    accounts: dict[str, Any] = field(default_factory=dict)  # client_email -> RSA public key
    tokens: dict[str, Issued] = field(default_factory=dict)
    seen_jti: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    introspections: int = 0


class TokenService:
    """The token service; ports are chosen at construction and kept across down()/up()."""

    def __init__(self, tls: TestCA | CertFiles, tenant: str = "example.test") -> None:
        self.tls = tls
        self.tenant = tenant
        self.host = LOOPBACK
        self.token_port = free_port()
        self.introspect_port = free_port()
        self.lifetime = 3600  # expires_in of new tokens, in seconds
        self._state = _State()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._release.set()
        self._token_server: _Server | None = None
        self._introspect_server: _Server | None = None

    # --- addresses ----------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        return f"https://{self.host}:{self.token_port}/token"

    @property
    def introspection_url(self) -> str:
        return f"http://{self.host}:{self.introspect_port}/introspect"

    # --- registrations ------------------------------------------------------------------

    def add_client(
        self, client_id: str, secret: str | None = None, certificate: Path | None = None
    ) -> None:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes()) if certificate else None
        with self._lock:
            self._state.clients[client_id] = Client(secret, cert)

    def add_service_account(self, email: str, public_key: Any) -> None:
        with self._lock:
            self._state.accounts[email] = public_key

    def revoke_secret(self, client_id: str, revoked: bool = True) -> None:
        """The application's credential stops (or starts again) being accepted."""
        with self._lock:
            self._state.clients[client_id].revoked = revoked

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on, whatever its expires_in said."""
        with self._lock:
            for token in self._state.tokens.values():
                token.expires = 0.0

    # --- what happened ------------------------------------------------------------------

    def requests(self, client: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._state.requests if client is None or r.client == client]

    def issued(self) -> int:
        with self._lock:
            return len(self._state.tokens)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self.up()
        self._introspect_server = self._serve(self.introspect_port, None)

    def up(self) -> None:
        """(Re)open the token endpoint."""
        if self._token_server is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls.cert), str(self.tls.key))
            self._token_server = self._serve(self.token_port, context)

    def down(self) -> None:
        """Close the token endpoint: connections to it are refused."""
        server, self._token_server = self._token_server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def hold(self) -> None:
        """Token requests wait (a slow endpoint) until release()."""
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    def stop(self) -> None:
        self.release()
        self.down()
        server, self._introspect_server = self._introspect_server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> TokenService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, port: int, context: ssl.SSLContext | None) -> _Server:
        service = self

        class Handler(_Handler):
            owner = service

        server = _Server((self.host, port), Handler)
        if context is not None:
            server.socket = context.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, name=f"tokens-{port}", daemon=True).start()
        try:
            wait_for_port(port, self.host, 10.0)
        except ServerError:
            server.server_close()
            raise
        return server

    # --- the endpoints ------------------------------------------------------------------

    def _token(self, form: dict[str, str]) -> tuple[int, dict]:
        if not self._release.wait(HOLD_LIMIT):
            return 503, {"error": "temporarily_unavailable"}
        grant = form.get("grant_type", "")
        if grant == "client_credentials":
            return self._client_credentials(form)
        if grant == JWT_BEARER:
            return self._service_account(form)
        return 400, {"error": "unsupported_grant_type"}

    def _refuse(self, request: Request, status: int, code: str, text: str) -> tuple[int, dict]:
        request.error = code
        return status, {"error": code, "error_description": text}

    def _client_credentials(self, form: dict[str, str]) -> tuple[int, dict]:
        client_id = form.get("client_id", "")
        request = Request("client_credentials", client_id)
        with self._lock:
            self._state.requests.append(request)
            client = self._state.clients.get(client_id)
        if client is None:
            text = f"AADSTS700016: Application {client_id} not found"
            return self._refuse(request, 400, "unauthorized_client", text)
        if "client_secret" in form:
            if client.secret is None or client.revoked or form["client_secret"] != client.secret:
                return self._refuse(
                    request, 401, "invalid_client", "AADSTS7000215: Invalid client secret provided."
                )
        elif form.get("client_assertion_type") == CLIENT_ASSERTION_TYPE:
            problem = self._assertion_problem(client_id, client, form.get("client_assertion", ""))
            if problem:
                return self._refuse(request, 401, "invalid_client", problem)
        else:
            return self._refuse(
                request, 401, "invalid_client", "AADSTS7000218: client_secret or client_assertion"
            )
        return self._issue(None, form.get("scope", ""))

    def _assertion_problem(self, client_id: str, client: Client, assertion: str) -> str | None:
        if client.certificate is None or client.revoked:
            return "AADSTS700027: Client assertion contains an invalid signature."
        der = client.certificate.public_bytes(serialization.Encoding.DER)
        thumbprint = _b64url(hashlib.sha256(der).digest())
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                client.certificate.public_key(),
                algorithms=["RS256"],
                audience=self.token_url,
                issuer=client_id,
                options={"require": ["exp", "iat", "iss", "sub", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            return f"AADSTS700027: Client assertion failed signature validation: {exc}"
        if header.get("x5t#S256") != thumbprint:
            return "AADSTS700027: The certificate with identifier used to sign the assertion"
        if claims["sub"] != client_id:
            return "AADSTS700023: sub must be the client id"
        with self._lock:
            if claims["jti"] in self._state.seen_jti:
                return "AADSTS700024: the assertion's jti was used before"
            self._state.seen_jti.add(claims["jti"])
        return None

    def _service_account(self, form: dict[str, str]) -> tuple[int, dict]:
        assertion = form.get("assertion", "")
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss", "")
        except jwt.PyJWTError:
            issuer = ""
        request = Request(JWT_BEARER, str(issuer))
        with self._lock:
            self._state.requests.append(request)
            key = self._state.accounts.get(issuer)
        if key is None:
            return self._refuse(request, 401, "invalid_client", "The OAuth client was not found.")
        try:
            claims = jwt.decode(
                assertion,
                key,
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["exp", "iat", "iss", "sub", "aud", "scope"]},
            )
        except jwt.PyJWTError as exc:
            return self._refuse(request, 400, "invalid_grant", f"Invalid JWT Signature: {exc}")
        request.user = claims["sub"]
        return self._issue(claims["sub"], claims["scope"])

    def _issue(self, user: str | None, scope: str) -> tuple[int, dict]:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._state.tokens[token] = Issued(user, scope, time.time() + self.lifetime)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.lifetime}

    def _introspect(self, form: dict[str, str]) -> tuple[int, dict]:
        with self._lock:
            self._state.introspections += 1
            issued = self._state.tokens.get(form.get("token", ""))
        if issued is None or issued.expires <= time.time():
            return 200, {"active": False}
        if issued.user is None:
            return 200, {"active": True, "tenant": self.tenant, "scope": issued.scope}
        return 200, {"active": True, "username": issued.user, "scope": issued.scope}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: a client that gives up on a held request (apppass's timeout) is expected."""


class _Handler(BaseHTTPRequestHandler):
    owner: TokenService
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length).decode("utf-8", errors="replace")
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        if self.path == "/token":
            status, body = self.owner._token(form)
        elif self.path == "/introspect":
            status, body = self.owner._introspect(form)
        else:
            status, body = 404, {"error": "not_found"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read requests()
        pass


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


__all__ = ["TokenService"]
