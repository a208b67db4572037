"""SMTP upstream login: EHLO (and STARTTLS), then one of
- `xclient`: Postfix XCLIENT LOGIN=<identity> ADDR=<client> … (xtext-encoded), then a fresh EHLO;
- `authzid`: AUTH PLAIN with an authorization identity and the master credentials;
- `xoauth2`, `oauthbearer`: AUTH with an OAuth2 token for the identity;
- `none`: the upstream trusts the proxy's address.
Never the user's password."""

from __future__ import annotations

import ipaddress

from proxy.config import Upstream
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection, UpstreamError
from proxy.upstreamauth import MAX_CHALLENGES, UpstreamAuth

# What the proxy calls itself in EHLO before the client's own name is known.
DEFAULT_HELO = "apppass"


# What Postfix's XCLIENT takes for "unknown" (XCLIENT_README; "[TEMPUNAVAIL]" is "not known
# yet"): printable ASCII without "+" or "=", so xtext leaves it as it is.
XCLIENT_UNAVAILABLE = "[UNAVAILABLE]"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+", "=" and anything outside "!".."~" become "+XX"."""
    out = []
    for byte in value.encode("utf-8"):
        out.append(f"+{byte:02X}" if byte < 33 or byte > 126 or byte in b"+=" else chr(byte))
    return "".join(out)


async def reply(conn: UpstreamConnection) -> tuple[int, list[str]]:
    """One (possibly multi-line) SMTP reply: (code, lines of text)."""
    lines = []
    while True:
        line = await conn.read_line()
        if len(line) < 3 or not line[:3].isdigit():
            raise UpstreamError(
                f"upstream sent a malformed reply: {line[:80].decode(errors='replace')}"
            )
        lines.append(line[4:].decode("utf-8", errors="replace"))
        if line[3:4] != b"-":
            return int(line[:3]), lines


async def _expect(conn: UpstreamConnection, codes: tuple[int, ...], what: str) -> list[str]:
    code, lines = await reply(conn)
    if code not in codes:
        raise UpstreamError(f"upstream refused {what}: {code} {' '.join(lines)[:120]}")
    return lines


async def ehlo(conn: UpstreamConnection, name: str) -> list[str]:
    """EHLO; returns the extension lines (keywords with their parameters)."""
    conn.send(f"EHLO {name}\r\n".encode())
    lines = await _expect(conn, (250,), "EHLO")
    return lines[1:]


async def open_session(conn: UpstreamConnection, settings: Upstream, helo: str) -> list[str]:
    """Greeting, EHLO, STARTTLS where configured: the upstream's extensions."""
    await _expect(conn, (220,), "the connection")
    extensions = await ehlo(conn, helo)
    if settings.tls == "starttls":
        conn.send(b"STARTTLS\r\n")
        await _expect(conn, (220,), "STARTTLS")
        await conn.start_tls()
        extensions = await ehlo(conn, helo)
    return extensions


def _keywords(extensions: list[str]) -> dict[str, list[str]]:
    return {e.split()[0].upper(): e.split()[1:] for e in extensions if e.split()}


async def login(
    conn: UpstreamConnection,
    settings: Upstream,
    request: LoginRequest,
    auth: UpstreamAuth | None = None,
) -> LoginResult:
    """Log in upstream; the result carries the extensions the session now has."""
    identity, client_ip, client_port = request.identity, request.client_ip, request.client_port
    helo = request.hello.name if request.hello else None
    esmtp = request.hello.esmtp if request.hello else False
    helo_name = helo or DEFAULT_HELO
    extensions = await open_session(conn, settings, helo_name)
    keywords = _keywords(extensions)
    if settings.login == "xclient":
        offered = {a.upper() for a in keywords.get("XCLIENT", [])}
        if "XCLIENT" not in keywords or "LOGIN" not in offered:
            raise UpstreamError(
                "upstream does not offer XCLIENT LOGIN to this proxy "
                "(Postfix: smtpd_authorized_xclient_hosts)"
            )
        addr = client_ip
        try:
            if ipaddress.ip_address(client_ip).version == 6:
                addr = "IPV6:" + client_ip
        except ValueError:
            addr = XCLIENT_UNAVAILABLE
        attrs = {
            "LOGIN": identity,
            "ADDR": addr,
            "PORT": str(client_port) if client_port else XCLIENT_UNAVAILABLE,
            "NAME": XCLIENT_UNAVAILABLE,
            "HELO": helo or XCLIENT_UNAVAILABLE,
            "PROTO": "ESMTP" if esmtp else "SMTP",
        }
        # Only the attributes the upstream offers. Every value is xtext-encoded, so each stays
        # one printable word whatever the directory or the client said (the constants are their
        # own xtext).
        parts = [f"{k}={xtext(v)}" for k, v in attrs.items() if k in offered]
        conn.send(f"XCLIENT {' '.join(parts)}\r\n".encode())
        await _expect(conn, (220,), "XCLIENT")
        extensions = await ehlo(conn, helo_name)
    else:
        auth = auth or UpstreamAuth.start(settings, identity, None)
        if auth is not None:
            await _authenticate(conn, auth, keywords)
    return LoginResult(extensions=tuple(extensions))


async def _authenticate(
    conn: UpstreamConnection, auth: UpstreamAuth, keywords: dict[str, list[str]]
) -> None:
    """AUTH with an initial response (RFC 4954 §4); a 334 after it asks for the response
    (empty) or reports an error (a refused token), answered, and the result follows."""
    if auth.mechanism not in {m.upper() for m in keywords.get("AUTH", [])}:
        raise UpstreamError(f"upstream does not offer AUTH {auth.mechanism}")
    response = await auth.response()
    conn.send(f"AUTH {auth.mechanism} {response}\r\n".encode())
    code, lines = await reply(conn)
    challenges = 0
    while code == 334:
        challenges += 1
        if challenges > MAX_CHALLENGES:
            raise UpstreamError("upstream kept challenging the login")
        answer = auth.challenge_answer() if " ".join(lines).strip() else response
        conn.send(answer.encode() + b"\r\n")
        code, lines = await reply(conn)
    if code != 235:
        auth.refused()
        raise UpstreamError(
            f"upstream refused the login as {auth.identity}: {code} {' '.join(lines)[:120]}"
        )
