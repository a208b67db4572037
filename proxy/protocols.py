"""The names every part of the proxy shares: mail protocol, TLS mode, upstream login.

A leaf module (it imports nothing of the proxy), so that config, cores, specs and the
Authenticator can all use the same values. They are `str` enums: a member compares equal to its
YAML spelling and prints as it in the audit log.
"""

from __future__ import annotations

import enum


class MailProtocol(enum.StrEnum):
    """What a listener speaks and a code's scope allows."""

    IMAP = "imap"
    POP3 = "pop3"
    SMTP = "smtp"


class TlsMode(enum.StrEnum):
    """How a listener (or the connection to an upstream) uses TLS."""

    NONE = "none"  # clear text (a listener then allows plaintext logins only from listed networks)
    STARTTLS = "starttls"  # clear text, upgraded by STARTTLS / STLS
    IMPLICIT = "implicit"  # TLS from the first byte (993, 995, 465)


class UpstreamLogin(enum.StrEnum):
    """How the proxy logs in to the upstream for a user, never with the user's password."""

    AUTHZID = "authzid"  # SASL PLAIN: authzid = the user, authcid/password = the master account
    XCLIENT = "xclient"  # Postfix XCLIENT LOGIN=<user> from a trusted address (SMTP only)
    NONE = "none"  # the upstream trusts the proxy's address (SMTP relay only)
    XOAUTH2 = "xoauth2"  # SASL XOAUTH2 with an OAuth2 token for the user (Microsoft, Google)
    OAUTHBEARER = "oauthbearer"  # SASL OAUTHBEARER (RFC 7628) with such a token


# The logins that present an OAuth2 bearer token (proxy/oauth2/: where the token comes from).
BEARER_LOGINS = (UpstreamLogin.XOAUTH2, UpstreamLogin.OAUTHBEARER)


# The upstream logins each protocol can use, the first being the default.
UPSTREAM_LOGINS: dict[MailProtocol, tuple[UpstreamLogin, ...]] = {
    MailProtocol.IMAP: (UpstreamLogin.AUTHZID, *BEARER_LOGINS),
    MailProtocol.POP3: (UpstreamLogin.AUTHZID, *BEARER_LOGINS),
    MailProtocol.SMTP: (
        UpstreamLogin.XCLIENT,
        UpstreamLogin.AUTHZID,
        UpstreamLogin.NONE,
        *BEARER_LOGINS,
    ),
}
