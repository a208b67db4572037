"""How the proxy proves itself upstream for one user, never with the user's password: SASL PLAIN
with the master credentials (`login: authzid`) or an OAuth2 bearer token for the user
(`xoauth2`, `oauthbearer`; the token from proxy/oauth2/tokens.py).

The protocol dialogues (proxy/*/upstream.py) send `mechanism` with `await response()`, answer a
challenge that comes after it with `challenge_answer()`, and call `refused()` when the upstream
says no. The token is asked for when the login starts and awaited only when the response is
due, so fetching it overlaps the greeting, STARTTLS and EHLO.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from proxy.config import Upstream
from proxy.oauth2.grant import TokenError
from proxy.oauth2.tokens import Token, TokenSource
from proxy.protocols import UpstreamLogin
from proxy.sasl import BEARER_ERROR_ANSWER, client_oauthbearer, client_plain, client_xoauth2
from proxy.upstream import UpstreamError

# RFC 4954 §4, RFC 5034 §4, RFC 9051 §6.2.2: "*" cancels an exchange. PLAIN never expects a
# challenge after its response; a server that sends one gets the exchange cancelled.
CANCEL = "*"

# Challenges a login answers before it gives up on the upstream: one asking for the response
# (a server that takes no initial response) and one reporting a refused token.
MAX_CHALLENGES = 2


class UpstreamAuth:
    """One upstream SASL login for one user."""

    def __init__(
        self,
        mechanism: str,
        identity: str,
        *,
        response: str | None = None,
        pending: defer.Deferred[Token] | None = None,
        tokens: TokenSource | None = None,
        host: str = "",
        port: int = 0,
    ) -> None:
        self.mechanism = mechanism
        self.identity = identity
        self._response = response
        self._pending = pending
        self._tokens = tokens
        self._token: Token | None = None
        self._awaited = False
        self._host, self._port = host, port

    def __repr__(self) -> str:
        return f"UpstreamAuth({self.mechanism} for {self.identity})"

    @classmethod
    def start(
        cls, settings: Upstream, identity: str, tokens: TokenSource | None
    ) -> UpstreamAuth | None:
        """The login `settings.login` asks for (None for those without SASL: xclient, none);
        a bearer login starts asking for its token now."""
        if settings.login is UpstreamLogin.AUTHZID:
            response = client_plain(
                identity, settings.master_user or "", settings.master_password or ""
            )
            return cls("PLAIN", identity, response=response)
        if settings.login in (UpstreamLogin.XOAUTH2, UpstreamLogin.OAUTHBEARER):
            if tokens is None:  # the settings always give one: a wiring mistake
                raise UpstreamError(f"no OAuth2 token source for upstream {settings.protocol}")
            return cls(
                settings.login.upper(),
                identity,
                pending=defer.ensureDeferred(tokens.token(identity)),
                tokens=tokens,
                host=settings.server_name or settings.host,
                port=settings.port,
            )
        return None

    async def response(self) -> str:
        """The base64 initial response; UpstreamError when no token could be had."""
        if self._response is not None:
            return self._response
        assert self._pending is not None
        self._awaited = True
        try:
            self._token = await self._pending
        except TokenError as exc:
            raise UpstreamError(f"no OAuth2 token for {self.identity}: {exc}") from None
        if self.mechanism == "XOAUTH2":
            self._response = client_xoauth2(self.identity, self._token.value)
        else:
            self._response = client_oauthbearer(
                self.identity, self._token.value, self._host, self._port
            )
        return self._response

    def challenge_answer(self) -> str:
        """What to send when the server challenges the response: for a bearer token that is
        its error report (then comes the refusal), for PLAIN a cancel."""
        return BEARER_ERROR_ANSWER.get(self.mechanism, CANCEL)

    def refused(self) -> None:
        """The upstream said no: a token it refused is not used again."""
        if self._tokens is not None and self._token is not None:
            self._tokens.forget(self.identity, self._token)

    def close(self) -> None:
        """The dialogue is over: a token still being fetched is kept for the next login, and
        its failure (already logged) is not this login's error."""
        if self._pending is not None and not self._awaited:
            self._pending.addErrback(_ignore)


def _ignore(failure: Failure) -> None:
    """A token this login no longer waits for: its source logged why there was none."""
