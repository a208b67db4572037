"""OAuth2 tokens for upstream logins (XOAUTH2, OAUTHBEARER): settings, token requests, caching."""
