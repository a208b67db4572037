"""POP3 for the generic frontend: the pre-auth core and the upstream login."""

from __future__ import annotations

from proxy.auth.decision import Protocol
from proxy.pop3 import upstream
from proxy.pop3.parse import Pop3Core


class Pop3Kind:
    protocol = Protocol.POP3

    def make_core(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                  service) -> Pop3Core:
        return Pop3Core(tls_active=tls_active, starttls_available=starttls_available,
                        plaintext_auth=plaintext_auth, hostname=service.hostname)

    async def login_upstream(self, conn, session, grant) -> list:
        await upstream.login(conn, session.service.upstream_for(self.protocol), identity=grant.upstream_identity,
                             client_ip=session.client_ip, client_port=session.client_port,
                             session=session.session_id)
        return session.core.auth_succeeded()

    def relay_hooks(self, session):
        return None, None
