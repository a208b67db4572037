"""The portal's session rules: the cookie, CSRF tokens, when a session ends, when a sign-in is
recent enough to create a code, and single-use form nonces. Pure: the caller passes the clock
and the records (proxy/web/records.py keeps sessions in the store).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime, timedelta

from proxy.web.records import WebSession

# With TLS the cookie takes the __Host- prefix (RFC 6265bis §4.1.3.2): the browser keeps it only
# with Secure, Path=/ and no Domain, so no other host or plain-HTTP page can set or shadow it.
SECURE_COOKIE = "__Host-apppass"
PLAIN_COOKIE = "apppass"
# Before sign-in there is no session: the sign-in form's CSRF token is a double-submit pair, a
# random value in this cookie and in the form (OWASP CSRF cheat sheet, "signed double submit").
SECURE_PRE_COOKIE = "__Host-apppass-pre"
PLAIN_PRE_COOKIE = "apppass-pre"

# A single-use form nonce stays valid this long (a form left open over lunch must be reloaded).
NONCE_SECONDS = 3600
# Spent nonces remembered at once; the oldest are forgotten first (they have expired by then in
# any realistic use: this is thousands of codes created per hour).
MAX_SPENT_NONCES = 100_000


def cookie_name(secure: bool, pre: bool = False) -> str:
    if pre:
        return SECURE_PRE_COOKIE if secure else PLAIN_PRE_COOKIE
    return SECURE_COOKIE if secure else PLAIN_COOKIE


def set_cookie(name: str, value: str, secure: bool, max_age: int | None = None) -> str:
    """A Set-Cookie value: HttpOnly (no script reads it), SameSite=Strict (no other site's page
    sends it), Secure on HTTPS; a session cookie (gone when the browser closes) without max_age."""
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict"]
    if secure:
        parts.append("Secure")
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    return "; ".join(parts)


def clear_cookie(name: str, secure: bool) -> str:
    return set_cookie(name, "", secure, max_age=0)


def new_pre_token() -> str:
    return secrets.token_urlsafe(24)


def same_token(expected: str | None, given: str | None) -> bool:
    """A CSRF token check in constant time; a missing token on either side never matches."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def ended(session: WebSession, now: datetime, idle: timedelta, maximum: timedelta) -> str | None:
    """Why a session is over ("idle": no request for `idle`, "max": older than `maximum`), or
    None while it lives (OWASP ASVS V3.3: both an idle and an absolute timeout)."""
    if now - session.created_at >= maximum:
        return "max"
    if now - session.seen_at >= idle:
        return "idle"
    return None


def recent_signin(session: WebSession, now: datetime, window: timedelta, client_ip: str) -> bool:
    """May this request create a code without asking for the password again? Only within
    `window` of the last sign-in, and only from the address that signed in: a cookie carried
    to another address must sign in again there first, so a stolen cookie cannot make codes."""
    return session.client_ip == client_ip and now - session.signed_in_at < window


def second_factor_pending(session: WebSession, required: bool) -> bool:
    return required and session.second_factor_at is None


class FormNonces:
    """Single-use tokens for the forms that show a secret once (creating a code): a POST sent
    again (reload, back button) is refused, so a code page is never shown twice and no code is
    made twice.

    A nonce is `random.issued.mac`, the MAC keyed by the session's CSRF secret, so any node
    sharing the store can check it; nodes each remember the nonces they saw spent (a resent
    form that reaches another node makes at most a second code, never shows the first)."""

    def __init__(self, ttl: float = NONCE_SECONDS, clock: Callable[[], float] = time.time) -> None:
        self.ttl = ttl
        self._clock = clock
        self._spent: OrderedDict[str, float] = OrderedDict()

    def issue(self, session: WebSession) -> str:
        body = f"{secrets.token_urlsafe(12)}.{int(self._clock())}"
        return f"{body}.{_mac(session, body)}"

    def spend(self, session: WebSession, nonce: str | None) -> bool:
        """True the first time a valid, unexpired nonce of this session is spent."""
        now = self._clock()
        self._forget(now)
        body, _, mac = (nonce or "").rpartition(".")
        issued = body.rpartition(".")[2]
        if not body or not issued.isdigit() or not hmac.compare_digest(mac, _mac(session, body)):
            return False
        if not 0 <= now - int(issued) <= self.ttl or nonce in self._spent:
            return False
        self._spent[nonce or ""] = int(issued) + self.ttl
        while len(self._spent) > MAX_SPENT_NONCES:
            self._spent.popitem(last=False)
        return True

    def _forget(self, now: float) -> None:
        while self._spent:
            nonce, until = next(iter(self._spent.items()))
            if until >= now:
                break
            del self._spent[nonce]


def _mac(session: WebSession, body: str) -> str:
    key = f"{session.id}:{session.csrf}".encode()
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()[:32]
