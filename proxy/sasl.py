"""Pure SASL codecs: the server side of PLAIN and LOGIN, the client side of PLAIN, XOAUTH2 and
OAUTHBEARER.

Shared by the IMAP, POP3 and SMTP cores, which only move base64 strings in and out.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass

# RFC 4616 §2: each of authzid, authcid and passwd is at most 255 octets.
MAX_FIELD = 255

# Prompts of the LOGIN mechanism (draft-murchison-sasl-login): "Username:" and "Password:".
LOGIN_USERNAME_PROMPT = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_PROMPT = base64.b64encode(b"Password:").decode()

MECHANISMS = ("PLAIN", "LOGIN")


class SaslError(ValueError):
    """The client's SASL data is malformed (bad base64 or bad structure)."""


@dataclass(frozen=True)
class Credentials:
    """What a client presented: a login name and a secret (an app password)."""

    login: str
    secret: str

    def __repr__(self) -> str:  # never let the secret reach a log line
        return f"Credentials(login={self.login!r}, secret=<hidden>)"


def decode_b64(data: str | bytes) -> bytes:
    """Strict base64 decoding; `=` alone is the empty response (RFC 4959, RFC 4954)."""
    if isinstance(data, str):
        try:
            data = data.encode("ascii")
        except UnicodeEncodeError as exc:
            raise SaslError("invalid base64") from exc
    data = data.strip()
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("invalid base64") from exc


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_FIELD:
        raise SaslError(f"{what} too long")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SaslError(f"{what} is not UTF-8") from exc


def parse_plain(message: bytes) -> tuple[str, Credentials]:
    """Split a PLAIN message `authzid NUL authcid NUL passwd` (RFC 4616).

    Returns (authzid, credentials). The caller refuses an authzid that differs from authcid.
    """
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN message needs exactly two NUL separators")
    authzid, authcid, passwd = (
        _text(p, w) for p, w in zip(parts, ("authzid", "authcid", "password"), strict=True)
    )
    if not authcid:
        raise SaslError("empty authcid")
    return authzid, Credentials(authcid, passwd)


class ServerMechanism:
    """One server-side SASL exchange, driven by base64 client responses.

    `start(initial)` and `step(response)` return either a base64 challenge (str) to send to the
    client, or Credentials when the exchange is complete. Malformed input raises SaslError.
    """

    name = ""

    def start(self, initial: str | None) -> str | Credentials:
        raise NotImplementedError

    def step(self, response: str) -> str | Credentials:
        raise NotImplementedError


class PlainMechanism(ServerMechanism):
    name = "PLAIN"

    def start(self, initial: str | None) -> str | Credentials:
        if initial is None:
            return ""  # empty challenge: "send your initial response"
        return self.step(initial)

    def step(self, response: str) -> str | Credentials:
        authzid, creds = parse_plain(decode_b64(response))
        if authzid and authzid != creds.login:
            raise AuthzidRefused(creds.login)
        return creds


class AuthzidRefused(SaslError):
    """A client asked to act for another identity; only the proxy may, and only upstream."""


class LoginMechanism(ServerMechanism):
    name = "LOGIN"

    def __init__(self) -> None:
        self._login: str | None = None

    def start(self, initial: str | None) -> str | Credentials:
        if initial is None:
            return LOGIN_USERNAME_PROMPT
        return self.step(initial)

    def step(self, response: str) -> str | Credentials:
        value = decode_b64(response)
        if self._login is None:
            self._login = _text(value, "username")
            if not self._login:
                raise SaslError("empty username")
            return LOGIN_PASSWORD_PROMPT
        return Credentials(self._login, _text(value, "password"))


def server_mechanism(name: str) -> ServerMechanism | None:
    """A fresh server mechanism for a (case-insensitive) name, or None if unsupported."""
    return {"PLAIN": PlainMechanism, "LOGIN": LoginMechanism}.get(name.upper(), lambda: None)()


def client_plain(authzid: str, authcid: str, password: str) -> str:
    """Base64 PLAIN initial response, as the proxy sends it upstream for a master login."""
    raw = b"\x00".join(s.encode("utf-8") for s in (authzid, authcid, password))
    return base64.b64encode(raw).decode("ascii")


def client_xoauth2(user: str, token: str) -> str:
    """Base64 XOAUTH2 initial response: `user=U^Aauth=Bearer T^A^A`."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw).decode("ascii")


def _saslname(value: str) -> str:
    """RFC 5801 §4 saslname: "," and "=" inside a gs2 header are written =2C and =3D."""
    return value.replace("=", "=3D").replace(",", "=2C")


def client_oauthbearer(user: str, token: str, host: str = "", port: int = 0) -> str:
    """Base64 OAUTHBEARER initial response (RFC 7628 §3.1): the gs2 header `n,a=U,`, then
    `^Ahost=H^Aport=P^Aauth=Bearer T^A^A` (host and port when known)."""
    pairs = (f"host={host}\x01" if host else "") + (f"port={port}\x01" if port else "")
    raw = f"n,a={_saslname(user)},\x01{pairs}auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw).decode("ascii")


# What a client answers when the server replies to its bearer token with an error challenge
# (a base64 JSON status) instead of a result: XOAUTH2 an empty response (Google's XOAUTH2
# protocol), OAUTHBEARER a single %x01 (RFC 7628 §3.2.3). Then the failure comes.
BEARER_ERROR_ANSWER = {"XOAUTH2": "", "OAUTHBEARER": base64.b64encode(b"\x01").decode("ascii")}


# C0 controls, DEL and C1 controls: never part of a name (one compiled search per login).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def is_valid_login(login: str) -> bool:
    """A login name with NUL, CR, LF or other control characters is refused before any lookup
    (the proxy and the upstream must never disagree about who logs in: Dovecot cuts a name
    at NUL)."""
    return bool(login) and len(login) <= MAX_FIELD and _CONTROL.search(login) is None


def identity_problem(identity: str) -> str | None:
    """Why an upstream identity cannot be sent as a SASL authzid (RFC 4616: UTF-8, at most 255
    octets) or as Postfix's XCLIENT LOGIN (one word), or None if it can. Checked whatever the
    directory says: a control character or a space in it would speak for someone else upstream
    (`[x\\r\\nMAIL FROM:…` as an XCLIENT value, `x LOGIN=bob` as extra attributes)."""
    if not identity:
        what = "is empty"
    elif _CONTROL.search(identity) is not None:
        what = "contains control characters"
    elif any(c.isspace() for c in identity):
        what = "contains a space"
    elif any("\ud800" <= c <= "\udfff" for c in identity):  # a lone surrogate: no UTF-8
        what = "is not valid UTF-8"
    elif len(identity.encode("utf-8")) > MAX_FIELD:
        what = f"is longer than {MAX_FIELD} octets"
    else:
        return None
    return f"upstream identity {what}: unusable as a SASL authzid or XCLIENT LOGIN"


class Step(enum.Enum):
    """Where a server-side exchange stands after one client message."""

    CHALLENGE = "challenge"  # send `challenge` and wait for the next response
    DONE = "done"  # `credentials` are ready for the Authenticator
    CANCELLED = "cancelled"  # the client sent "*"
    BAD_BASE64 = "bad base64"
    MALFORMED = "malformed"  # valid base64, but not a valid message of the mechanism
    AUTHZID_REFUSED = "authzid refused"  # PLAIN authzid differs from authcid
    INVALID_LOGIN = "invalid login"  # NUL, CR, LF or other controls in the login name


@dataclass(frozen=True)
class StepResult:
    step: Step
    challenge: str = ""
    credentials: Credentials | None = None
    detail: str = ""


class SaslExchange:
    """One server-side SASL exchange as every protocol core drives it: `start` with the command's
    optional initial response, then `respond` to each client line, until a final step. The core
    only turns each Step into its protocol's reply."""

    def __init__(self, mechanism: ServerMechanism) -> None:
        self.mechanism = mechanism
        self.name = mechanism.name

    def start(self, initial: str | None) -> StepResult:
        return self._run(self.mechanism.start, initial)

    def respond(self, line: bytes) -> StepResult:
        if line.strip() == b"*":  # RFC 4954 §4, RFC 5034 §4, RFC 9051 §6.2.2
            return StepResult(Step.CANCELLED, detail="cancelled by the client")
        return self._run(self.mechanism.step, line.decode("latin-1"))

    def _run(self, fn, response: str | None) -> StepResult:
        if response is not None:
            try:
                decode_b64(response)
            except SaslError:
                return StepResult(Step.BAD_BASE64, detail="invalid base64")
        try:
            result = fn(response)
        except AuthzidRefused:
            return StepResult(Step.AUTHZID_REFUSED, detail="PLAIN authzid differs from authcid")
        except SaslError as exc:
            return StepResult(Step.MALFORMED, detail=f"malformed {self.name} response: {exc}")
        if isinstance(result, str):
            return StepResult(Step.CHALLENGE, challenge=result)
        if not is_valid_login(result.login):
            return StepResult(Step.INVALID_LOGIN, detail="invalid login name")
        return StepResult(Step.DONE, credentials=result)
