"""The signed JWTs the token endpoint is shown (RFC 7523), built with pyjwt: pure, given the time.

- The client assertion (RFC 7523 §2.2, Entra ID's certificate credential): the application
  proves it holds the certificate's key; `iss` = `sub` = the client id, `aud` = the token URL.
- The service-account grant (RFC 7523 §2.1, Google's domain-wide delegation): the service
  account asks for a token of the user in `sub`, for `scope`.
"""

from __future__ import annotations

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.oauth2.settings import OAuth2Settings

# How long an assertion is good for. Entra ID refuses a client assertion valid for more than
# 10 minutes; MSAL signs them for 10. Google accepts a grant JWT for at most one hour.
ASSERTION_SECONDS = 600
GRANT_SECONDS = 3600

# RS256 (RFC 7518 §3.3): what Google requires and Entra ID accepts for certificate credentials.
ALGORITHM = "RS256"


class Signer:
    """Signs one settings' JWTs with its key, parsed once."""

    def __init__(self, settings: OAuth2Settings) -> None:
        if settings.private_key is None:
            raise ValueError(f"oauth2 {settings.name}: no private key to sign with")
        key = serialization.load_pem_private_key(settings.private_key, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):  # checked by the settings already
            raise ValueError(f"oauth2 {settings.name}: the private key is not an RSA key")
        self._key = key
        self.settings = settings

    def __repr__(self) -> str:
        return f"Signer({self.settings.name})"

    def client_assertion(self, now: float, jti: str) -> str:
        """RFC 7523 §3 claims for client authentication; the header's x5t and x5t#S256 name
        the certificate (Entra ID finds it by either)."""
        s = self.settings
        issued = int(now)
        claims = {
            "iss": s.client_id,
            "sub": s.client_id,
            "aud": s.token_url,
            "jti": jti,  # single use: Entra ID refuses an assertion it has seen
            "iat": issued,
            "nbf": issued,
            "exp": issued + ASSERTION_SECONDS,
        }
        headers = {"x5t": s.x5t, "x5t#S256": s.x5t_s256}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers=headers)

    def user_grant(self, user: str, now: float) -> str:
        """Google's service-account JWT: a token for `user` (domain-wide delegation)."""
        s = self.settings
        issued = int(now)
        claims = {
            "iss": s.client_id,
            "sub": user,
            "scope": s.scope,
            "aud": s.token_url,
            "iat": issued,
            "exp": issued + GRANT_SECONDS,
        }
        headers = {"kid": s.key_id} if s.key_id else None
        return jwt.encode(claims, self._key, algorithm=ALGORITHM, headers=headers)
