"""IMAP for the frontend: how to build its pre-auth core and how to log in upstream."""

from __future__ import annotations

from proxy.config import Upstream
from proxy.imap import upstream
from proxy.imap.server import ImapCore, ImapLimits
from proxy.protocols import MailProtocol
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection


class ImapSpec:
    protocol = MailProtocol.IMAP

    def __init__(self, upstream_settings: Upstream, *, max_failures: int) -> None:
        self.upstream = upstream_settings
        self.limits = ImapLimits(max_failures=max_failures)

    def make_core(
        self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool
    ) -> ImapCore:
        return ImapCore(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=self.limits,
        )

    async def probe(self, conn: UpstreamConnection) -> None:
        """Nothing to learn before login: the tagged OK carries the upstream's capabilities."""

    async def login(self, conn: UpstreamConnection, request: LoginRequest) -> LoginResult:
        return await upstream.login(conn, self.upstream, request)

    def watch(self, result: LoginResult) -> None:
        """IMAP sessions are relayed unwatched."""
        return
