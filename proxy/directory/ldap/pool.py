"""Bound, re-used ldap3 connections with failover across the configured servers.

ldap3 is synchronous: the pool is thread-safe and each connection is used by one thread at a
time. The servers are tried in order; a server that failed to connect, start TLS or bind is
skipped for `retry_after` seconds. Any trouble surfaces as DirectoryUnavailable, a temporary
failure.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import ldap3
from ldap3.core.exceptions import LDAPException

from proxy.directory.account import DirectoryUnavailable
from proxy.directory.ldap.settings import LdapSettings, split_uri

log = logging.getLogger(__name__)

T = TypeVar("T")


class Trouble(Exception):
    """The directory could not answer (internal to this package; surfaces as
    DirectoryUnavailable)."""


class BindRefused(Exception):
    """The server refused a person's password (internal: bind_as says False)."""


# LDAP resultCode invalidCredentials (RFC 4511 §4.1.9): a wrong password, and also how OpenLDAP's
# ppolicy and Active Directory (data 52e, 533, 701, 773, 775) refuse a locked, disabled or
# expired account's bind.
INVALID_CREDENTIALS = 49


@dataclass
class _ServerState:
    uri: str
    host: str
    port: int
    use_ssl: bool
    down_until: float = 0.0
    last_error: str = ""


@dataclass
class Pooled:
    """A bound connection lent out by the pool."""

    conn: ldap3.Connection
    index: int  # which server (position in uris)
    last_used: float


class ConnectionPool:
    """Bound, re-used ldap3 connections with failover across servers. Thread-safe.

    A connection is used by one thread at a time (acquire/release). New connections go to the
    first server not marked down, then to the ones marked down; a server that fails to connect,
    start TLS or bind is marked down for retry_after. An idle connection to a fallback server
    is dropped once a better server is due to be retried, so the pool returns to the preferred
    server by itself.
    """

    def __init__(self, settings: LdapSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._servers = [_ServerState(uri, *split_uri(uri)) for uri in settings.uris]
        self._idle: list[Pooled] = []
        self._open = 0
        self._closed = False
        self._cond = threading.Condition()
        self.opened = 0  # connections ever opened (for tests and `directory check`)

    # public

    def run(self, operation: Callable[[ldap3.Connection, int], T]) -> T:
        """Run operation(connection, server index) on a pooled connection; a connection that
        breaks is replaced once (a pooled connection goes stale when its server restarts).
        Raises DirectoryUnavailable."""
        last: str = ""
        for attempt in (1, 2):
            try:
                pooled = self.acquire()
            except Trouble as exc:
                raise DirectoryUnavailable(str(exc)) from None
            try:
                result = operation(pooled.conn, pooled.index)
            except Trouble as exc:  # an unexpected result code: the server answered
                self.discard(pooled)
                raise DirectoryUnavailable(f"{self.uri(pooled.index)}: {exc}") from None
            except (LDAPException, OSError) as exc:
                self.discard(pooled)
                last = f"{self.uri(pooled.index)}: {error_text(exc)}"
                log.info(
                    "LDAP connection to %s broke (attempt %d): %s",
                    self.uri(pooled.index),
                    attempt,
                    error_text(exc),
                )
                continue
            except BaseException:
                self.discard(pooled)
                raise
            self.release(pooled)
            return result
        raise DirectoryUnavailable(last)

    def bind_as(self, dn: str, password: str) -> bool:
        """Whether `password` is dn's: a simple bind as dn on a fresh connection (never pooled,
        never the service account's), to the servers in failover order. Raises
        DirectoryUnavailable when no server answers."""
        if not dn or not password:
            # An empty password is an unauthenticated bind (RFC 4513 §5.1.2): it proves nothing.
            return False
        try:
            conn, _ = self._connect((dn, password))
        except BindRefused:
            return False
        except Trouble as exc:
            raise DirectoryUnavailable(str(exc)) from None
        _unbind(conn)
        return True

    def acquire(self) -> Pooled:
        deadline = (
            self._clock()
            + self.settings.connect_timeout * len(self._servers)
            + self.settings.timeout
        )
        stale: list[Pooled] = []
        try:
            with self._cond:
                while True:
                    if self._closed:
                        raise Trouble("directory is closed")
                    now = self._clock()
                    preferred = self._preferred_index(now)
                    while self._idle:
                        pooled = self._idle.pop()
                        if (
                            now - pooled.last_used > self.settings.idle_timeout
                            or pooled.index > preferred
                            or pooled.conn.closed
                        ):
                            stale.append(pooled)
                            self._open -= 1
                            continue
                        return pooled
                    if self._open < self.settings.pool_size:
                        self._open += 1
                        break
                    remaining = deadline - now
                    if remaining <= 0:
                        raise Trouble(f"all {self.settings.pool_size} LDAP connections are busy")
                    # Wall-clock wait: a test's fake clock does not advance here, so this is
                    # bounded by the real deadline too.
                    if not self._cond.wait(min(remaining, self.settings.timeout)):
                        raise Trouble(f"all {self.settings.pool_size} LDAP connections are busy")
        finally:
            for pooled in stale:
                _unbind(pooled.conn)
        try:
            conn, index = self._connect()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise
        return Pooled(conn, index, self._clock())

    def release(self, pooled: Pooled) -> None:
        with self._cond:
            if not self._closed and not pooled.conn.closed:
                pooled.last_used = self._clock()
                self._idle.append(pooled)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        _unbind(pooled.conn)

    def discard(self, pooled: Pooled) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()
        _unbind(pooled.conn)

    def reset(self) -> None:
        """Close idle connections (busy ones close when released after a failure)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for pooled in idle:
            _unbind(pooled.conn)

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self.reset()

    def uri(self, index: int) -> str:
        return self._servers[index].uri

    def stats(self) -> dict[str, object]:
        with self._cond:
            now = self._clock()
            return {
                "open": self._open,
                "idle": len(self._idle),
                "opened": self.opened,
                "servers": [
                    {"uri": s.uri, "down": s.down_until > now, "last_error": s.last_error}
                    for s in self._servers
                ],
            }

    # internal

    def _preferred_index(self, now: float) -> int:
        for i, server in enumerate(self._servers):
            if server.down_until <= now:
                return i
        return len(self._servers)

    def _tls(self, server: _ServerState) -> ldap3.Tls | None:
        if not (self.settings.start_tls or server.use_ssl):
            return None
        # The certificate must chain to ca_file (or the system store) and name the host
        # (ldap3 checks DNS and IP subject alt names); SNI when the host is a name.
        try:
            ipaddress.ip_address(server.host)
            sni = None
        except ValueError:
            sni = server.host
        return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.settings.ca_file, sni=sni)

    def _password(self) -> str:
        if self.settings.bind_password_file:
            try:
                with open(self.settings.bind_password_file, encoding="utf-8") as fh:
                    return fh.read().rstrip("\r\n")
            except OSError as exc:
                raise Trouble(f"cannot read bind_password_file: {exc.strerror}") from None
        return self.settings.bind_password or ""

    def _connect(self, person: tuple[str, str] | None = None) -> tuple[ldap3.Connection, int]:
        """A bound connection to the first server that answers: as the service account, or as
        `person` (dn, password), whose refused password is BindRefused, not server trouble."""
        now = self._clock()
        with self._cond:
            order = sorted(
                range(len(self._servers)), key=lambda i: (self._servers[i].down_until > now, i)
            )
        errors = []
        for index in order:
            server = self._servers[index]
            try:
                conn = self._open_bound(server, person)
            except Trouble as exc:
                errors.append(f"{server.uri}: {exc}")
                with self._cond:
                    if server.down_until <= self._clock():
                        log.warning(
                            "LDAP server %s failed, skipping it for %.0f s: %s",
                            server.uri,
                            self.settings.retry_after,
                            exc,
                        )
                    server.down_until = self._clock() + self.settings.retry_after
                    server.last_error = str(exc)
                continue
            with self._cond:
                if server.down_until:
                    log.info("LDAP server %s answers again", server.uri)
                server.down_until = 0.0
                server.last_error = ""
                if person is None:
                    self.opened += 1
            return conn, index
        raise Trouble("no LDAP server answered: " + "; ".join(errors))

    def _open_bound(
        self, server: _ServerState, person: tuple[str, str] | None = None
    ) -> ldap3.Connection:
        s = self.settings
        # A fresh ldap3.Server per connection: ldap3 marks an address unavailable for a while
        # after a failure, and our own failover decides that.
        ldap_server = ldap3.Server(
            server.host,
            port=server.port,
            use_ssl=server.use_ssl,
            tls=self._tls(server),
            get_info=ldap3.NONE,
            connect_timeout=s.connect_timeout,
        )
        user, password = person or (s.bind_dn, self._password() if s.bind_dn else None)
        conn = ldap3.Connection(
            ldap_server,
            user=user,
            password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            auto_referrals=False,
            read_only=True,
            raise_exceptions=False,
            check_names=False,
            return_empty_attributes=False,
        )
        try:
            conn.open(read_server_info=False)
            # ldap3 only takes whole seconds for its receive timeout; set the socket's own.
            conn.socket.settimeout(s.timeout)
            if s.start_tls and not server.use_ssl and not conn.start_tls(read_server_info=False):
                raise Trouble(f"StartTLS refused: {result_text(conn)}")
            if not conn.bind(read_server_info=False):
                if person is not None and (conn.result or {}).get("result") == INVALID_CREDENTIALS:
                    raise BindRefused(result_text(conn))
                who = "bind as the person" if person else "service bind"
                raise Trouble(f"{who} refused: {result_text(conn)}")
        except (Trouble, BindRefused):
            _unbind(conn)
            raise
        except (LDAPException, OSError) as exc:
            _unbind(conn)
            raise Trouble(error_text(exc)) from None
        return conn


def _unbind(conn: ldap3.Connection) -> None:
    try:
        if not conn.closed:
            conn.unbind()
    except Exception:  # closing a broken connection: nothing more to do
        pass


def result_text(conn: ldap3.Connection) -> str:
    """The last LDAP result of conn, for an error message: "description (code): message"."""
    result = conn.result or {}
    text = f"{result.get('description', '?')} ({result.get('result', '?')})"
    message = (result.get("message") or "").strip()
    return f"{text}: {message}" if message else text


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"
