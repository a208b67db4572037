"""One token request and what its answer means (RFC 6749 §4.4, §5; RFC 7523): pure.

The request is a form POSTed to the token endpoint; the answer is JSON, a token with its
lifetime (§5.1) or an error code with the endpoint's own text (§5.2). An error says whether
trying again soon may help (the endpoint down, busy or slow) or not (a revoked secret, a
missing consent: nothing changes until an administrator acts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from proxy.oauth2.assertion import Signer
from proxy.oauth2.settings import Grant, OAuth2Settings

# RFC 7523 §2.2 and §2.1: the client assertion's type and the JWT-bearer grant.
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"

# A token without `expires_in` (RFC 6749 §5.1 only recommends it) is taken to live an hour:
# the lifetime of Google's and Entra ID's tokens. An upstream that refuses it sooner makes the
# proxy drop it anyway.
DEFAULT_LIFETIME = 3600.0
# And none is kept longer than a day (Entra ID's longest configurable token lifetime), whatever
# the endpoint says.
MAX_LIFETIME = 86400.0

# The most of the endpoint's error text quoted in a log line or an audit reason (Entra ID's
# descriptions run to about 300 characters with their trace ids).
MAX_ERROR_TEXT = 400

# HTTP statuses after which the same request may well succeed (RFC 9110 §15.5.9, §15.6;
# RFC 6585 §4 for 429).
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Issued:
    """A token as the endpoint issued it."""

    value: str = field(repr=False)
    lifetime: float  # seconds from the request


class TokenError(Exception):
    """No token. The message quotes the endpoint, never a secret or a token; `kind` groups
    failures for the operational log (one line per kind); `retry` whether trying again soon
    may help."""

    def __init__(self, message: str, kind: str, retry: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry = retry


def printable(text: str) -> str:
    """The endpoint's text as one short printable line."""
    flat = "".join(c if c.isprintable() else " " for c in text).strip()
    return flat if len(flat) <= MAX_ERROR_TEXT else flat[: MAX_ERROR_TEXT - 3] + "..."


def request_fields(
    settings: OAuth2Settings, signer: Signer | None, user: str, now: float, jti: str
) -> dict[str, str]:
    """The form to POST for a token: of the application (client credentials) or of `user`
    (the service-account grant)."""
    if settings.grant is Grant.SERVICE_ACCOUNT:
        assert signer is not None
        return {"grant_type": JWT_BEARER_GRANT, "assertion": signer.user_grant(user, now)}
    fields = {
        "grant_type": "client_credentials",
        "client_id": settings.client_id,
        "scope": settings.scope,
    }
    if settings.client_secret is not None:  # client_secret_post (RFC 6749 §2.3.1)
        fields["client_secret"] = settings.client_secret
    else:
        assert signer is not None
        fields["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        fields["client_assertion"] = signer.client_assertion(now, jti)
    return fields


def parse_answer(status: int, body: bytes) -> Issued:
    """The token in a 200 answer; TokenError for anything else."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        retry = status in RETRYABLE_STATUSES or status == 200
        raise TokenError(
            f"the token endpoint answered HTTP {status} without JSON", f"http {status}", retry
        )
    if status != 200 or "error" in data:
        code = data.get("error")
        if not isinstance(code, str) or not code:
            raise TokenError(
                f"the token endpoint answered HTTP {status}",
                f"http {status}",
                status in RETRYABLE_STATUSES,
            )
        description = data.get("error_description")
        text = printable(f"{code}: {description}" if isinstance(description, str) else code)
        # RFC 6749 §5.2's codes all need an administrator (a secret, a consent, a grant);
        # a server error or throttling does not.
        retry = status in RETRYABLE_STATUSES or code in ("temporarily_unavailable", "server_error")
        raise TokenError(f"the token endpoint refused: {text}", printable(code), retry)
    value, kind = data.get("access_token"), data.get("token_type", "Bearer")
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise TokenError("the token endpoint answered without an access_token", "no token", False)
    if not isinstance(kind, str) or kind.lower() != "bearer":
        raise TokenError(
            f"the token endpoint issued a {printable(str(kind))} token, not a bearer token",
            "not bearer",
            False,
        )
    lifetime = data.get("expires_in", DEFAULT_LIFETIME)
    try:  # a number, or a number in a string (some endpoints quote it)
        seconds = float(lifetime)
    except (TypeError, ValueError):
        seconds = DEFAULT_LIFETIME
    if not seconds > 0:  # also NaN
        seconds = DEFAULT_LIFETIME
    return Issued(value, min(seconds, MAX_LIFETIME))
