"""Where a login's OAuth2 token comes from: a cache per identity, refreshed before expiry, with
one request in flight per identity, bounded retries, and one log line per kind of failure.

- client_credentials: one token for every user (the application's), cached under "".
- service_account: one token per user.

A login waits for a request only when no usable token is cached; a token in its last stretch
(REFRESH_MARGIN_SECONDS, or a tenth of its lifetime when that is shorter) is still used while a
new one is fetched in the background. A token the upstream refused is dropped (`forget`), so the
next login fetches a fresh one. After a failed request, logins for the same identity fail at
once for FAILURE_HOLD_SECONDS: a broken endpoint or secret costs the endpoint one request (and
its retries) per interval, whatever the login rate.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task

from proxy.fairqueue import SingleFlight
from proxy.oauth2.assertion import Signer
from proxy.oauth2.grant import TokenError, parse_answer, request_fields
from proxy.oauth2.settings import Grant, OAuth2Settings
from proxy.oplog import log

# A token is renewed this long before it expires (Microsoft's MSAL refreshes 5 minutes early),
# or a tenth of its lifetime before when that is shorter.
REFRESH_MARGIN_SECONDS = 300.0
REFRESH_FRACTION = 0.1

# After a failed request, the same identity's logins fail at once for this long (Dovecot's auth
# penalty starts at 2 s; an endpoint that throttles wants fewer, not more, requests).
FAILURE_HOLD_SECONDS = 5.0

# Pause before the first retry, doubled for each later one (MSAL and google-auth back off from
# about a second).
RETRY_BACKOFF_SECONDS = 1.0

# Per-user tokens kept at most (service accounts); the oldest goes first. A token is a few KiB.
MAX_CACHED_TOKENS = 10000

Post = Callable[[str, dict[str, str]], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class Token:
    """A usable token and when it stops being one (reactor seconds)."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float


def refresh_margin(lifetime: float) -> float:
    return min(REFRESH_MARGIN_SECONDS, lifetime * REFRESH_FRACTION)


class TokenSource:
    """Tokens of one `oauth2` settings, for every upstream that uses them."""

    def __init__(
        self,
        settings: OAuth2Settings,
        reactor: Any,
        post: Post | None = None,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        if post is None:
            from proxy.oauth2.http import FormPoster

            post = FormPoster(
                reactor, ca_file=settings.ca_file, timeout=settings.timeout.total_seconds()
            ).post
        self._post = post
        self._new_id = new_id
        self._signer = Signer(settings) if settings.private_key is not None else None
        self._cache: dict[str, Token] = {}
        self._held: dict[str, tuple[float, TokenError]] = {}  # failures, until a time
        self._flights: SingleFlight[str] = SingleFlight()
        self._problem: str | None = None  # the kind of failure last logged

    def __repr__(self) -> str:
        return f"TokenSource({self.settings.name})"

    def _key(self, identity: str) -> str:
        return identity if self.settings.grant is Grant.SERVICE_ACCOUNT else ""

    async def token(self, identity: str) -> Token:
        """A token to log in `identity` with; TokenError (a temporary failure) if none."""
        key, now = self._key(identity), self._reactor.seconds()
        cached = self._cache.get(key)
        if cached is not None and now < cached.expires_at:
            if now >= cached.refresh_at and not self._holding(key, now):
                self._flights.run(key, lambda: self._fetch(key, identity)).addErrback(
                    lambda _: None  # logged by _fetch; the cached token still serves
                )
            return cached
        held = self._holding(key, now)
        if held is not None:  # a new exception: one raised again would grow its traceback
            raise TokenError(str(held), held.kind, held.retry)
        return await self._flights.run(key, lambda: self._fetch(key, identity))

    def forget(self, identity: str, token: Token) -> None:
        """The upstream refused `token`: the next login asks for a new one."""
        key = self._key(identity)
        if self._cache.get(key) is token:
            del self._cache[key]

    def _holding(self, key: str, now: float) -> TokenError | None:
        held = self._held.get(key)
        if held is None:
            return None
        if now >= held[0]:
            del self._held[key]
            return None
        return held[1]

    def _fetch(self, key: str, identity: str) -> defer.Deferred[Token]:
        return defer.ensureDeferred(self._request(key, identity))

    async def _request(self, key: str, identity: str) -> Token:
        """Ask the endpoint, trying again after transient failures; cache or hold the outcome."""
        s = self.settings
        attempt = 0
        while True:
            sent = self._reactor.seconds()
            try:
                fields = request_fields(s, self._signer, identity, sent, self._new_id())
                status, body = await self._post(s.token_url, fields)
                issued = parse_answer(status, body)
                break
            except Exception as exc:  # a bug must not leave a login hanging: temporary too
                failure = exc if isinstance(exc, TokenError) else _unexpected(exc)
                if not failure.retry or attempt >= s.retries:
                    self._failed(key, failure)
                    raise failure from None
            attempt += 1
            pause = RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1)
            await task.deferLater(self._reactor, pause, lambda: None)
        token = Token(
            issued.value,
            expires_at=sent + issued.lifetime,
            refresh_at=sent + issued.lifetime - refresh_margin(issued.lifetime),
        )
        self._store(key, token)
        return token

    def _store(self, key: str, token: Token) -> None:
        self._held.pop(key, None)
        self._cache.pop(key, None)
        while len(self._cache) >= MAX_CACHED_TOKENS:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = token
        if self._problem is not None:
            log.warning(
                "%s: %s issues tokens again (it failed: %s)",
                self.settings.key_path,
                self.settings.token_url,
                self._problem,
            )
            self._problem = None

    def _failed(self, key: str, exc: TokenError) -> None:
        self._held.pop(key, None)
        while len(self._held) >= MAX_CACHED_TOKENS:
            del self._held[next(iter(self._held))]
        self._held[key] = (self._reactor.seconds() + FAILURE_HOLD_SECONDS, exc)
        if exc.kind != self._problem:  # one line per kind of failure, not per login
            self._problem = exc.kind
            log.error(
                "%s: no token from %s: %s; logins through it are refused as temporary"
                " failures until it issues one",
                self.settings.key_path,
                self.settings.token_url,
                exc,
            )


def _unexpected(exc: Exception) -> TokenError:
    """An exception no rule foresaw, by its class only (its text might quote a request)."""
    return TokenError(f"the token request failed: {exc.__class__.__name__}", "error", True)
