"""POP3: the pre-auth core (server.py), the upstream login (upstream.py), and the spec that gives
them to the frontend (spec.py)."""
