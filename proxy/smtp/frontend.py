"""SMTP for the generic frontend: the pre-auth core, the upstream login, and the command watch
that keeps a logged-in client from using the proxy's trust (XCLIENT, XFORWARD)."""

from __future__ import annotations

from proxy.auth.decision import Protocol
from proxy.smtp import upstream
from proxy.smtp.parse import SmtpCommandWatch, SmtpCore

# Advertised until the upstream's own EHLO has been seen (RFC 2920, 6152, 2034).
FALLBACK_EXTENSIONS = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")


class SmtpKind:
    protocol = Protocol.SMTP

    def __init__(self) -> None:
        self.extensions: tuple[str, ...] = FALLBACK_EXTENSIONS  # learned from the upstream's EHLO

    def make_core(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                  service) -> SmtpCore:
        return SmtpCore(tls_active=tls_active, starttls_available=starttls_available,
                        plaintext_auth=plaintext_auth, hostname=service.hostname, extensions=self.extensions)

    async def learn_extensions(self, service) -> None:
        """Ask the upstream what it supports, so the pre-auth EHLO can advertise the same."""
        from proxy.upstream import connect

        conn = await connect(service.upstream_for(self.protocol), service.reactor)
        try:
            self.extensions = tuple(await upstream.open_session(conn, service.upstream_for(self.protocol),
                                                                service.hostname))
            conn.send(b"QUIT\r\n")
        finally:
            conn.close()

    async def login_upstream(self, conn, session, grant) -> list:
        core = session.core
        extensions = await upstream.login(conn, session.service.upstream_for(self.protocol),
                                          identity=grant.upstream_identity, client_ip=session.client_ip,
                                          client_port=session.client_port, helo=core.helo_name,
                                          esmtp=core.esmtp)
        if extensions:
            self.extensions = tuple(extensions)
        session.smtp_chunking = any(e.split()[0].upper() == "CHUNKING" for e in extensions if e.split())
        return core.auth_succeeded()

    def relay_hooks(self, session):
        """Both directions go through the watch: it must see the upstream's replies to know
        whether DATA was accepted (what follows is then message content, not commands)."""
        watch = SmtpCommandWatch(chunking=getattr(session, "smtp_chunking", True))
        reactor = session.service.reactor

        def apply(result):
            relay = session.relay_object
            if relay is not None:
                side = relay.client
                if watch.waiting:
                    side.pause_reading(watch)
                else:
                    side.resume_reading(watch)
            if result.refused:
                session.service.audit.event("refused", protocol="smtp", session=session.session_id,
                                            client=session.client_ip, commands=list(result.refused))
            if result.close:
                reactor.callLater(0, session.close_both, result.close)

        def client_hook(data: bytes):
            result = watch.client_data(data)
            apply(result)
            return result.to_upstream, result.to_client

        def upstream_hook(data: bytes):
            result = watch.upstream_data(data)
            apply(result)
            return result.to_client, result.to_upstream

        return client_hook, upstream_hook
