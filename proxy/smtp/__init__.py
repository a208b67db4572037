"""SMTP: the pre-auth core (server.py), the upstream login (upstream.py), the command watch after
login (watch.py), and the spec that gives them to the frontend (spec.py)."""
