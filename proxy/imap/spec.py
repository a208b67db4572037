"""IMAP for the frontend: how to build its pre-auth core, what it lists before login, and how to
log in upstream."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from proxy.config import Listener, Upstream
from proxy.core import printable
from proxy.imap import upstream
from proxy.imap.server import ImapCore, ImapLimits, extra_capabilities
from proxy.oauth2.tokens import TokenSource
from proxy.protocols import MailProtocol
from proxy.upstream import LoginRequest, LoginResult, UpstreamConnection
from proxy.upstreamauth import UpstreamAuth


@dataclass
class _Learned:
    """What the last successful probe learned, shared by a spec and its listeners' copies."""

    capabilities: tuple[str, ...] = ()


class ImapSpec:
    protocol = MailProtocol.IMAP

    def __init__(
        self, upstream_settings: Upstream, *, max_failures: int, tokens: TokenSource | None = None
    ) -> None:
        self.upstream = upstream_settings
        self.tokens = tokens  # where xoauth2/oauthbearer logins get their tokens
        self.limits = ImapLimits(max_failures=max_failures)
        self.override: tuple[str, ...] | None = None  # a listener's `capabilities:` list
        self._learned = _Learned()

    @property
    def advertised(self) -> tuple[str, ...]:
        """What the pre-auth CAPABILITY lists besides apppass's own: the listener's list if it
        has one, otherwise what the upstream offers before login (learned by probe())."""
        return self.override if self.override is not None else self._learned.capabilities

    def for_listener(self, listener: Listener) -> ImapSpec:
        """This spec as a listener with its own `capabilities:` list uses it; it still shares
        what probe() learns."""
        if listener.capabilities is None:
            return self
        view = copy.copy(self)
        view.override = extra_capabilities(listener.capabilities)
        return view

    def make_core(
        self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool
    ) -> ImapCore:
        return ImapCore(
            tls_active=tls_active,
            starttls_available=starttls_available,
            plaintext_auth=plaintext_auth,
            limits=self.limits,
            capabilities=self.advertised,
        )

    async def probe(self, conn: UpstreamConnection) -> None:
        """Ask the upstream what it offers before login (IDLE, ENABLE, …), so that clients that
        read the list only once, before login, see it; every successful probe refreshes it."""
        offered = await upstream.capabilities(conn, self.upstream)
        self._learned.capabilities = extra_capabilities(offered)

    async def login(self, conn: UpstreamConnection, request: LoginRequest) -> LoginResult:
        auth = UpstreamAuth.start(self.upstream, request.identity, self.tokens)
        try:
            return await upstream.login(conn, self.upstream, request, auth)
        finally:
            if auth is not None:
                auth.close()

    def goodbye(self, reason: str) -> bytes:
        """An untagged BYE (RFC 9051 §7.1.5: the server is closing the connection)."""
        return f"* BYE {printable(reason)}\r\n".encode("ascii")

    def watch(self, result: LoginResult, sending: object = None) -> None:
        """IMAP sessions are relayed unwatched."""
        return
