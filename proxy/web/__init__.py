"""The self-service portal and the admin API over HTTP(S): twisted.web in the proxy's reactor,
on the `web:` listeners (settings.py, server.py, portal pages, the JSON API)."""
