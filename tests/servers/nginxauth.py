"""The `auth_http` service behind the nginx mail proxy (tests/servers/nginx.py): a tiny HTTP/1.0
server that checks a user's password against a table and tells nginx to log in upstream as that
user through the Dovecot master user (`Auth-User: USER*MASTER`, `Auth-Pass: MASTER_PASSWORD`),
so nginx does the same upstream work as apppass. No hashing: what a site's auth service does for
a login whose password it has already verified (the benchmark's "warm" logins).

    python tests/servers/nginxauth.py CONFIG.json

CONFIG (written 0600 by tests/servers/nginx.py): {"port", "upstream_host", "upstream_port",
"master_user", "master_password", "separator", "users": {login: password}}.

Made to cost nginx's side as little CPU as a Python process can (its share is measured on its
own): one thread, blocking accept and recv (nginx writes its request in one piece right after
connecting), answers prepared at start, no HTTP library. nginx opens one connection per login
and closes it after the answer (ngx_mail_auth_http_module speaks HTTP/1.0). Standard library
only, so it starts fast and imports nothing from the repository.
"""

from __future__ import annotations

import hmac
import json
import signal
import socket
import struct
import sys
from pathlib import Path
from urllib.parse import unquote_to_bytes

# A request larger than this is not nginx's: answered as a failure without reading further.
MAX_REQUEST = 16384
# How long a connection may take to deliver its request (SO_RCVTIMEO) before it is dropped;
# nginx sends it at once, so this only bounds a stray client.
READ_TIMEOUT_S = 2
LISTEN_BACKLOG = 4096  # nginx may open hundreds of auth connections at once under load

# nginx sends these request headers (ngx_mail_auth_http_module), the user and password
# %-escaped.
_USER = b"\r\nauth-user: "
_PASS = b"\r\nauth-pass: "

REFUSED = b"HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 0\r\n\r\n"
BAD_REQUEST = b"HTTP/1.0 400 Bad Request\r\n\r\n"


def answers(config: dict) -> dict[bytes, tuple[bytes, bytes]]:
    """login -> (its password, the OK answer that sends nginx upstream as login*master)."""
    out = {}
    for login, password in config["users"].items():
        ok = (
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"
            f"Auth-Server: {config['upstream_host']}\r\nAuth-Port: {config['upstream_port']}\r\n"
            f"Auth-User: {login}{config['separator']}{config['master_user']}\r\n"
            f"Auth-Pass: {config['master_password']}\r\n\r\n"
        )
        out[login.encode()] = (password.encode(), ok.encode())
    return out


def _header(request_lower: bytes, request: bytes, name: bytes) -> bytes | None:
    start = request_lower.find(name)
    if start < 0:
        return None
    start += len(name)
    return unquote_to_bytes(request[start : request.index(b"\r\n", start)])


def answer(request: bytes, table: dict[bytes, tuple[bytes, bytes]]) -> bytes:
    """The reply to one auth request: OK with the upstream login, or a refusal."""
    lower = request.lower()
    try:
        user = _header(lower, request, _USER)
        password = _header(lower, request, _PASS)
    except ValueError:
        return BAD_REQUEST
    if user is None or password is None:
        return BAD_REQUEST
    known = table.get(user)
    if known is None or not hmac.compare_digest(known[0], password):
        return REFUSED
    return known[1]


def read_request(conn: socket.socket) -> bytes:
    data = conn.recv(MAX_REQUEST)
    while b"\r\n\r\n" not in data and len(data) < MAX_REQUEST:
        more = conn.recv(MAX_REQUEST)
        if not more:
            break
        data += more
    return data


def serve(listener: socket.socket, table: dict[bytes, tuple[bytes, bytes]]) -> None:
    """Answer connections one after another until SIGTERM."""
    while True:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, TimeoutError, InterruptedError):
            continue  # SO_RCVTIMEO on the listener bounds accept() too: just wait again
        try:
            conn.sendall(answer(read_request(conn), table))
        except OSError:
            pass  # a client that went away or sent nothing in time
        finally:
            conn.close()


def main(argv: list[str]) -> int:
    config = json.loads(Path(argv[1]).read_text())
    table = answers(config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit the receive timeout (Linux copies it with the socket).
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", READ_TIMEOUT_S, 0))
    listener.bind(("127.0.0.1", int(config["port"])))
    listener.listen(LISTEN_BACKLOG)
    serve(listener, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
