"""IMAP upstream login: tell the upstream who the client is, then log in as the user with the
master credentials (SASL PLAIN with an authorization identity) or an OAuth2 token (XOAUTH2,
OAUTHBEARER), never the user's password."""

from __future__ import annotations

import re

from proxy.config import Upstream
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection, UpstreamError
from proxy.upstreamauth import MAX_CHALLENGES, UpstreamAuth

_CAPABILITY = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.I)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _tagged(
    conn: UpstreamConnection, tag: bytes, untagged: list[bytes] | None = None
) -> tuple[bytes, bytes]:
    """Read until the tagged reply; returns (status, rest). Untagged lines are collected."""
    while True:
        line = await conn.read_line()
        if line.startswith(tag + b" "):
            status, _, rest = line[len(tag) + 1 :].partition(b" ")
            return status.upper(), rest
        if line.startswith(b"* BYE"):
            raise UpstreamError(f"upstream said BYE: {line[6:80].decode(errors='replace')}")
        if untagged is not None:
            untagged.append(line)


async def _open(conn: UpstreamConnection, settings: Upstream) -> bytes | None:
    """The greeting, then STARTTLS where configured: the capabilities the greeting announced,
    or None if it announced none or TLS started since (they change after TLS)."""
    greeting = await conn.read_line()
    if greeting.startswith(b"* PREAUTH"):
        raise UpstreamError("upstream pre-authenticated the connection: refusing to relay it")
    if not greeting.startswith(b"* OK"):
        raise UpstreamError(
            f"unexpected upstream greeting: {greeting[:80].decode(errors='replace')}"
        )
    if settings.tls != "starttls":
        return _caps(greeting)
    conn.send(b"S STARTTLS\r\n")
    status, rest = await _tagged(conn, b"S")
    if status != b"OK":
        raise UpstreamError(f"upstream refused STARTTLS: {rest[:80].decode(errors='replace')}")
    await conn.start_tls()
    return None


async def _capability(conn: UpstreamConnection) -> bytes | None:
    """CAPABILITY: the list from its untagged reply (RFC 9051 §6.1.1)."""
    untagged: list[bytes] = []
    conn.send(b"C CAPABILITY\r\n")
    await _tagged(conn, b"C", untagged)
    caps = None
    for line in untagged:
        if line.upper().startswith(b"* CAPABILITY "):
            caps = line[len(b"* CAPABILITY ") :]
    return caps


async def capabilities(conn: UpstreamConnection, settings: Upstream) -> list[str]:
    """What the upstream offers before login, over the same TLS its logins use (a server may
    offer more, and drop LOGINDISABLED, once TLS is on); then LOGOUT."""
    await _open(conn, settings)
    caps = await _capability(conn)
    conn.send(b"Q LOGOUT\r\n")
    if caps is None:
        raise UpstreamError("upstream sent no capabilities before login")
    return caps.decode("ascii", errors="replace").split()


async def login(
    conn: UpstreamConnection,
    settings: Upstream,
    request: LoginRequest,
    auth: UpstreamAuth | None = None,
) -> LoginResult:
    """Run the login dialogue; the result carries the upstream's capabilities after login."""
    identity = request.identity
    auth = auth or UpstreamAuth.start(settings, identity, None)
    assert auth is not None  # every IMAP login is a SASL one
    caps = await _open(conn, settings)
    # ID and AUTHENTICATE go out in one write: one round trip fewer per login (RFC 9051 §5.5
    # allows pipelining; Dovecot answers them in order).
    pending = b""
    if settings.send_client_address:
        fields = {
            "x-originating-ip": request.client_ip,
            "x-originating-port": str(request.client_port),
            "x-session-ext-id": request.session,
        }
        params = " ".join(f"{_quote(k)} {_quote(v)}" for k, v in fields.items() if v)
        pending = f"I ID ({params})\r\n".encode()
    response = await auth.response()
    sasl_ir = caps is None or b"SASL-IR" in caps.upper().split()
    if sasl_ir:
        conn.send(pending + f"L AUTHENTICATE {auth.mechanism} {response}\r\n".encode())
    else:
        conn.send(pending + f"L AUTHENTICATE {auth.mechanism}\r\n".encode())
    if pending:
        await _tagged(conn, b"I")  # a NO/BAD here is not fatal: the login is what matters
    challenges = 0
    while True:
        line = await conn.read_line()
        if line.startswith(b"+"):
            challenges += 1
            if challenges > MAX_CHALLENGES:
                raise UpstreamError("upstream kept challenging the login")
            # An empty one asks for the response (no SASL-IR, or a server that wants it in a
            # continuation after all); one with data reports an error (a refused token).
            answer = auth.challenge_answer() if line[1:].strip() else response
            conn.send(answer.encode() + b"\r\n")
            continue
        if line.startswith(b"L "):
            status, _, rest = line[2:].partition(b" ")
            break
    if status.upper() != b"OK":
        auth.refused()
        raise UpstreamError(
            f"upstream refused the login as {identity}: {rest[:120].decode(errors='replace')}"
        )
    caps = _caps(rest)
    if caps is None:
        caps = await _capability(conn)
    if not caps:
        raise UpstreamError("upstream sent no capabilities after login")
    return LoginResult(capabilities=caps.decode("ascii", errors="replace"))


def _caps(line: bytes) -> bytes | None:
    m = _CAPABILITY.search(line)
    return m.group(1) if m else None
