"""IMAP for the generic frontend: the pre-auth core and the upstream login."""

from __future__ import annotations

from proxy.auth.decision import Protocol
from proxy.imap import upstream
from proxy.imap.parse import ImapCore


class ImapKind:
    protocol = Protocol.IMAP

    def make_core(self, *, tls_active: bool, starttls_available: bool, plaintext_auth: bool,
                  service) -> ImapCore:
        return ImapCore(tls_active=tls_active, starttls_available=starttls_available, plaintext_auth=plaintext_auth)

    async def login_upstream(self, conn, session, grant) -> list:
        caps = await upstream.login(conn, session.service.upstream_for(self.protocol),
                                    identity=grant.upstream_identity, client_ip=session.client_ip,
                                    client_port=session.client_port, session=session.session_id)
        return session.core.auth_succeeded(caps)

    def relay_hooks(self, session):
        return None, None
