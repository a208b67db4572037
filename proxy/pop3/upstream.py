"""POP3 upstream login: pass the client's address (XCLIENT, where offered), then AUTH (RFC 5034):
PLAIN with an authorization identity and the master credentials, or XOAUTH2/OAUTHBEARER with an
OAuth2 token; never the user's password."""

from __future__ import annotations

from proxy.config import Upstream
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection, UpstreamError
from proxy.upstreamauth import MAX_CHALLENGES, UpstreamAuth


def _text(line: bytes) -> str:
    return line[:120].decode("utf-8", errors="replace")


async def _ok(conn: UpstreamConnection, what: str) -> bytes:
    line = await conn.read_line()
    if not line.startswith(b"+OK"):
        raise UpstreamError(f"upstream refused {what}: {_text(line)}")
    return line


async def _capabilities(conn: UpstreamConnection) -> set[str]:
    conn.send(b"CAPA\r\n")
    first = await conn.read_line()
    if not first.startswith(b"+OK"):
        return set()
    caps = set()
    while (line := await conn.read_line()) != b".":
        caps.add(line.split(b" ", 1)[0].decode("ascii", errors="replace").upper())
    return caps


async def login(
    conn: UpstreamConnection,
    settings: Upstream,
    request: LoginRequest,
    auth: UpstreamAuth | None = None,
) -> LoginResult:
    identity = request.identity
    auth = auth or UpstreamAuth.start(settings, identity, None)
    assert auth is not None  # every POP3 login is a SASL one
    await _ok(conn, "the connection")
    if settings.tls == "starttls":
        conn.send(b"STLS\r\n")
        await _ok(conn, "STLS")
        await conn.start_tls()
    if settings.send_client_address:
        caps = await _capabilities(conn)
        if "XCLIENT" in caps:  # Dovecot, for proxies in login_trusted_networks
            conn.send(
                f"XCLIENT ADDR={request.client_ip} PORT={request.client_port} "
                f"SESSION={request.session}\r\n".encode()
            )
            await conn.read_line()  # a refusal is not fatal: the login is what matters
    response = await auth.response()
    conn.send(f"AUTH {auth.mechanism} {response}\r\n".encode())
    line = await conn.read_line()
    challenges = 0
    while line == b"+" or line.startswith(b"+ "):
        challenges += 1
        if challenges > MAX_CHALLENGES:
            raise UpstreamError("upstream kept challenging the login")
        # An empty one: no initial response accepted, send it as the continuation; one with
        # data reports an error (a refused token).
        answer = auth.challenge_answer() if line[1:].strip() else response
        conn.send(answer.encode() + b"\r\n")
        line = await conn.read_line()
    if not line.startswith(b"+OK"):
        auth.refused()
        raise UpstreamError(f"upstream refused the login as {identity}: {_text(line)}")
    return LoginResult()
