"""POST a form to a token endpoint on the reactor: the endpoint's certificate verified as an
upstream's is (proxy/tls.py), one deadline per request, a bounded answer.

twisted.web's Agent, without connection reuse: a token lives an hour, so the proxy asks rarely,
and a stopped proxy leaves no idle connection behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from proxy.oauth2.grant import TokenError
from proxy.tls import TLSConfigError, upstream_tls

# The longest answer read from a token endpoint. A token answer is a few KiB (Entra ID's access
# tokens are 1.5-4 KiB of JWT); anything far larger is not one.
MAX_ANSWER = 64 * 1024

_HEADERS = {
    b"content-type": [b"application/x-www-form-urlencoded"],
    b"accept": [b"application/json"],
    b"user-agent": [b"apppass"],
}


@implementer(IPolicyForHTTPS)
class _Verified:
    """The endpoint's certificate checked against ca_file (or the system store) and its name,
    as for an upstream mail server; one connection creator per host, made on first use."""

    def __init__(self, ca_file: Path | None) -> None:
        self._ca_file = str(ca_file) if ca_file else None
        self._creators: dict[str, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        name = hostname.decode("ascii")
        creator = self._creators.get(name)
        if creator is None:
            creator = self._creators[name] = upstream_tls(name, ca_file=self._ca_file)
        return creator


@implementer(IBodyProducer)
class _Form:
    """A request body known in full (the form is a few hundred bytes)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self._data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Answer(Protocol):
    """Collects a response body up to MAX_ANSWER bytes."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self._done = done
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > MAX_ANSWER:
            if not self._done.called:
                self._done.errback(
                    TokenError(
                        f"the token endpoint's answer is over {MAX_ANSWER} bytes", "http", True
                    )
                )
            if self.transport is not None:  # the body's transport is a push producer
                cast(Any, self.transport).stopProducing()
            return
        self._parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(b"".join(self._parts))
        else:
            self._done.errback(reason)


class FormPoster:
    """POSTs forms to one token endpoint; `post` answers (status, body) or raises TokenError."""

    def __init__(self, reactor: Any, *, ca_file: Path | None, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(
            reactor, contextFactory=_Verified(ca_file), connectTimeout=timeout, pool=pool
        )

    async def post(self, url: str, fields: dict[str, str]) -> tuple[int, bytes]:
        parts = urlsplit(url)
        where = f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"
        deadline = self._reactor.seconds() + self._timeout
        try:
            request = self._agent.request(
                b"POST", url.encode("ascii"), Headers(_HEADERS), _Form(urlencode(fields).encode())
            )
            request.addTimeout(self._timeout, self._reactor)
            response = await request
            done: defer.Deferred[bytes] = defer.Deferred()
            response.deliverBody(_Answer(done))
            done.addTimeout(max(deadline - self._reactor.seconds(), 0.001), self._reactor)
            body = await done
        except TokenError:
            raise
        except (defer.TimeoutError, error.TimeoutError):  # ours, or the connect's
            raise TokenError(
                f"no answer from {where} within {self._timeout:g}s", "timeout", True
            ) from None
        except (error.ConnectError, error.DNSLookupError, OSError) as exc:
            raise TokenError(
                f"cannot connect to {where}: {exc.__class__.__name__}", "unreachable", True
            ) from None
        except TLSConfigError as exc:
            raise TokenError(f"cannot verify {where}: {exc}", "tls", False) from None
        except ResponseFailed as exc:  # also ResponseNeverReceived: the reasons say why
            if any(r.check(defer.CancelledError) for r in exc.reasons):  # our deadline
                raise TokenError(
                    f"no answer from {where} within {self._timeout:g}s", "timeout", True
                ) from None
            raise _failed(where, exc.reasons) from None
        return response.code, body


def _failed(where: str, reasons: list[Failure]) -> TokenError:
    """A request that failed on the way: TLS (the certificate, the name) or the connection."""
    for reason in reasons:
        if reason.check(SSL.Error, VerificationError):
            text = reason.getErrorMessage()[:200]
            return TokenError(f"TLS with {where} failed: {text}", "tls", True)
    names = ", ".join(sorted({r.type.__name__ for r in reasons if r.type is not None}))
    return TokenError(f"the connection to {where} failed: {names or 'closed'}", "unreachable", True)
