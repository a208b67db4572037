"""Sending the notices of `apppass notify` (blocking: it is a command, not the proxy).

Through `notify.smtp`, a relay, when there is one: as apppass, from `notify.from`, logged in
with the relay's own account if it has one. Without a relay, through `upstream.smtp` logged in
as the account the notice is about, exactly as the proxy logs in for it (Postfix XCLIENT
LOGIN=, or SASL PLAIN with the account as authzid and the master credentials; nothing with
login: none): the upstream's own rules for that account apply, and the envelope sender is the
account's address, so that sender-login checks (reject_sender_login_mismatch) pass. Certificates
are verified against ca_file (or the system's) and the server's name, as the proxy does.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Protocol

from proxy.config import Settings
from proxy.notify.notices import NotifyError
from proxy.notify.settings import NotifyRelay
from proxy.protocols import MailProtocol, TlsMode, UpstreamLogin
from proxy.smtp.upstream import xtext

# What the notifier calls itself in EHLO.
HELO = "apppass-notify"


class Mailer(Protocol):
    def send(self, msg: EmailMessage, sender: str, to: tuple[str, ...], identity: str) -> None:
        """Send `msg` to `to`; `identity` is the account's upstream identity (the login used
        without a relay). Raises NotifyError."""


class _Implicit(smtplib.SMTP_SSL):
    """SMTP over implicit TLS that checks the certificate for `server_name` (smtplib checks it
    for the host it connects to)."""

    def __init__(self, host: str, port: int, *, server_name: str, **kw: Any) -> None:
        self._server_name = server_name
        super().__init__(host, port, **kw)

    def _get_socket(self, host: str, port: int, timeout: float) -> Any:  # type: ignore[override]
        sock = socket.create_connection((host, port), timeout, self.source_address)
        return self.context.wrap_socket(sock, server_hostname=self._server_name)


def _context(ca_file: Path | None, verify: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:  # written out in the config (verify: false): said at check-config
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _open(
    host: str,
    port: int,
    tls: TlsMode,
    ca_file: Path | None,
    verify: bool,
    server_name: str | None,
    timeout: float,
) -> smtplib.SMTP:
    context = _context(ca_file, verify)
    name = server_name or host
    smtp: smtplib.SMTP
    if tls is TlsMode.IMPLICIT:
        smtp = _Implicit(
            host, port, server_name=name, local_hostname=HELO, timeout=timeout, context=context
        )
        smtp.ehlo(HELO)
        return smtp
    smtp = smtplib.SMTP(host, port, local_hostname=HELO, timeout=timeout)
    smtp.ehlo(HELO)
    if tls is TlsMode.STARTTLS:
        smtp._host = name  # type: ignore[attr-defined]  # the name starttls() checks
        smtp.starttls(context=context)
        smtp.ehlo(HELO)
    return smtp


def _deliver(smtp: smtplib.SMTP, msg: EmailMessage, sender: str, to: tuple[str, ...]) -> None:
    refused = smtp.send_message(msg, from_addr=sender, to_addrs=list(to))
    if refused:
        raise NotifyError(f"refused for {', '.join(sorted(refused))}")


class RelayMailer:
    def __init__(self, relay: NotifyRelay) -> None:
        self.relay = relay

    def send(self, msg: EmailMessage, sender: str, to: tuple[str, ...], identity: str) -> None:
        r = self.relay
        try:
            smtp = _open(
                r.host, r.port, r.tls, r.ca_file, r.verify, r.server_name, r.timeout.total_seconds()
            )
            with smtp:
                if r.login and r.password is not None:
                    smtp.login(r.login, r.password)
                _deliver(smtp, msg, sender, to)
        except (smtplib.SMTPException, OSError) as exc:
            raise NotifyError(f"{r.host}:{r.port}: {exc}") from None


class UpstreamMailer:
    """Through upstream.smtp, logged in as the account (never with anyone's password)."""

    def __init__(self, settings: Settings) -> None:
        self.upstream = settings.upstreams[MailProtocol.SMTP]

    def send(self, msg: EmailMessage, sender: str, to: tuple[str, ...], identity: str) -> None:
        up = self.upstream
        try:
            smtp = _open(
                up.host,
                up.port,
                up.tls,
                up.ca_file,
                up.verify,
                up.server_name,
                up.timeout.total_seconds(),
            )
            with smtp:
                self._log_in(smtp, identity)
                _deliver(smtp, msg, sender, to)
        except (smtplib.SMTPException, OSError) as exc:
            raise NotifyError(f"{up.host}:{up.port}: {exc}") from None

    def _log_in(self, smtp: smtplib.SMTP, identity: str) -> None:
        up = self.upstream
        if up.login is UpstreamLogin.XCLIENT:
            code, text = smtp.docmd("XCLIENT", f"LOGIN={xtext(identity)}")
            if code != 220:
                raise NotifyError(f"XCLIENT refused: {code} {text.decode(errors='replace')}")
            smtp.ehlo_resp = None  # XCLIENT starts the session afresh: greet again
            smtp.ehlo(HELO)
        elif up.login is UpstreamLogin.AUTHZID:
            plain = f"{identity}\0{up.master_user}\0{up.master_password}"
            smtp.auth("PLAIN", lambda challenge=None: plain)
        elif up.login is not UpstreamLogin.NONE:
            raise NotifyError(f"upstream.smtp.login {up.login}: notices need notify.smtp")


def mailer_for(settings: Settings) -> Mailer | None:
    """The relay if there is one, else the upstream SMTP server (None: neither)."""
    if settings.notify.relay is not None:
        return RelayMailer(settings.notify.relay)
    if MailProtocol.SMTP in settings.upstreams:
        return UpstreamMailer(settings)
    return None
