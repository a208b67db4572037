"""SMTP for the frontend: its pre-auth core, the upstream login, and the command watch that keeps
a logged-in client from using the proxy's trust (XCLIENT, XFORWARD)."""

from __future__ import annotations

import time

from proxy.auth.decision import Sending
from proxy.config import Listener, Upstream
from proxy.core import printable
from proxy.oauth2.tokens import TokenSource
from proxy.protocols import MailProtocol
from proxy.smtp import upstream
from proxy.smtp.policed import PolicedWatch
from proxy.smtp.server import SmtpCore, smtp_limits
from proxy.smtp.watch import SmtpCommandWatch
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection
from proxy.upstreamauth import UpstreamAuth

# Advertised until the upstream's own EHLO has been seen (RFC 2920, 6152, 2034).
FALLBACK_EXTENSIONS = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")


class SmtpSpec:
    protocol = MailProtocol.SMTP

    def __init__(
        self,
        upstream_settings: Upstream,
        *,
        max_failures: int,
        hostname: str,
        tokens: TokenSource | None = None,
    ) -> None:
        self.upstream = upstream_settings
        self.tokens = tokens  # where xoauth2/oauthbearer logins get their tokens
        self.limits = smtp_limits(max_failures=max_failures)
        self.hostname = hostname
        # What the pre-auth EHLO offers: the upstream's extensions, learned by probe().
        self.advertised: tuple[str, ...] = FALLBACK_EXTENSIONS

    def for_listener(self, listener: Listener) -> SmtpSpec:
        """No per-listener settings: every listener uses this spec."""
        return self

    def make_core(
        self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool
    ) -> SmtpCore:
        return SmtpCore(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=self.limits,
            hostname=self.hostname,
            extensions=self.advertised,
        )

    async def probe(self, conn: UpstreamConnection) -> None:
        """Ask the upstream what it supports, so that the pre-auth EHLO advertises the same."""
        self.advertised = tuple(await upstream.open_session(conn, self.upstream, self.hostname))
        conn.send(b"QUIT\r\n")

    async def login(self, conn: UpstreamConnection, request: LoginRequest) -> LoginResult:
        auth = UpstreamAuth.start(self.upstream, request.identity, self.tokens)
        try:
            return await upstream.login(conn, self.upstream, request, auth)
        finally:
            if auth is not None:
                auth.close()

    def goodbye(self, reason: str) -> bytes:
        """421 (RFC 5321 §3.8: the server may close with 421 at any time)."""
        return f"421 4.7.0 {self.hostname} {printable(reason)}\r\n".encode("ascii")

    def watch(
        self, result: LoginResult, sending: Sending | None = None
    ) -> SmtpCommandWatch | PolicedWatch:
        """Both directions go through the watch: it must see the upstream's replies to know
        whether DATA was accepted (what follows is then message content, not commands). A code
        with a sending policy has it applied too, with its message count in the store."""
        if sending is None:
            return SmtpCommandWatch(chunking=result.chunking)
        watch = SmtpCommandWatch(chunking=result.chunking, rules=sending.rules)
        return PolicedWatch(watch, sending.messages, time.monotonic)
