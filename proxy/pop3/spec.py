"""POP3 for the frontend: how to build its pre-auth core and how to log in upstream."""

from __future__ import annotations

from proxy.config import Listener, Upstream
from proxy.oauth2.tokens import TokenSource
from proxy.pop3 import upstream
from proxy.pop3.server import Pop3Core, pop3_limits
from proxy.protocols import MailProtocol
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection
from proxy.upstreamauth import UpstreamAuth


class Pop3Spec:
    protocol = MailProtocol.POP3

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
        self.limits = pop3_limits(max_failures=max_failures)
        self.hostname = hostname

    def for_listener(self, listener: Listener) -> Pop3Spec:
        """No per-listener settings: every listener uses this spec."""
        return self

    def make_core(
        self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool
    ) -> Pop3Core:
        return Pop3Core(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=self.limits,
            hostname=self.hostname,
        )

    async def probe(self, conn: UpstreamConnection) -> None:
        """Nothing to learn before login."""

    async def login(self, conn: UpstreamConnection, request: LoginRequest) -> LoginResult:
        auth = UpstreamAuth.start(self.upstream, request.identity, self.tokens)
        try:
            return await upstream.login(conn, self.upstream, request, auth)
        finally:
            if auth is not None:
                auth.close()

    def goodbye(self, reason: str) -> bytes:
        """Nothing: POP3 has no unsolicited replies (RFC 1939); the connection just closes."""
        return b""

    def watch(self, result: LoginResult, sending: object = None) -> None:
        """POP3 sessions are relayed unwatched."""
        return
