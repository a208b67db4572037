"""What the portal's pages share: the running proxy (WebApp), the templates, the single-use form
nonces, the sign-in limits, who is acting (an `Actor` of proxy/manage.py), and the pages for
errors. One per portal; it lives on the reactor thread.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, TypeVar

from proxy.auth.ratelimit import FailureLimiter
from proxy.codes.store import utcnow
from proxy.directory.account import Account
from proxy.directory.ldap.values import rdn_value
from proxy.manage import Actor, ManageError
from proxy.web.app import WebApp
from proxy.web.session import FormNonces, recent_signin, second_factor_pending
from proxy.web.view import Ctx, Reply, Views

T = TypeVar("T")

# Failed sign-ins (password or second factor) per account, in a window, before the portal stops
# trying that account for a while: the per-address limit stops one address, this stops guessing
# at one account's second factor from many (NIST SP 800-63B §5.2.2 allows up to 100; a person
# who mistypes ten times in a quarter of an hour waits for it to pass).
ACCOUNT_FAILURES = 10
ACCOUNT_WINDOW = 900.0

# What each ManageError code is as an HTTP status.
STATUS = {
    "invalid": 400,
    "not_found": 404,
    "forbidden": 403,
    "cap_reached": 409,
    "conflict": 409,
    "unavailable": 503,
}


def is_admin(account: Account, group: str | None) -> bool:
    """Member of web.admin_group (a name, or a DN whose first value is the name)."""
    if not group:
        return False
    wanted = (rdn_value(group) if "=" in group else group).lower()
    return any(g.lower() == wanted for g in account.groups)


class PortalState:
    def __init__(self, app: WebApp) -> None:
        self.app = app
        self.settings = app.settings
        self.views = Views()
        self.nonces = FormNonces()
        self.account_failures = FailureLimiter(ACCOUNT_FAILURES, ACCOUNT_WINDOW)
        web = app.settings.web
        self.sso = web.trusted_header  # SSO: the proxy in front signs people in (and their MFA)
        # The portal's own second factor: when policy.require_mfa asks for one and no SSO proxy
        # enforces it already.
        self.mfa = app.settings.policy.require_mfa and not self.sso

    # -- running blocking work -------------------------------------------------------------------

    async def run(self, ctx: Ctx, fn: Any, *args: Any) -> Any:
        """fn(*args) off the reactor, fairly among client addresses."""
        return await self.app.blocking(ctx.request, fn, *args)

    @staticmethod
    def now() -> datetime:
        return utcnow()

    @staticmethod
    def clock() -> float:
        """The limiters' clock: the Authenticator's (time.monotonic), as they share one."""
        return time.monotonic()

    # -- who acts --------------------------------------------------------------------------------

    def actor(self, ctx: Ctx, account_key: str | None = None) -> Actor:
        """An admin acting on someone else's account acts as "admin"; anyone on their own, as
        "portal" (proxy/manage.py lets that actor touch only its own codes)."""
        session = ctx.session
        assert session is not None
        if session.admin and account_key is not None and account_key != session.account_key:
            return Actor("admin", session.login, session.account_key)
        return Actor("portal", session.login, session.account_key)

    def admin_actor(self, ctx: Ctx) -> Actor:
        session = ctx.session
        assert session is not None and session.admin
        return Actor("admin", session.login, session.account_key)

    def recent(self, ctx: Ctx) -> bool:
        """May this request create a code? Behind SSO every request is a fresh sign-in."""
        if self.sso:
            return True
        session = ctx.session
        return session is not None and recent_signin(
            session, datetime.now(UTC), self.settings.web.recent_signin, ctx.ip
        )

    def pending(self, ctx: Ctx) -> bool:
        """Signed in with the password, the second factor still due."""
        return ctx.session is not None and second_factor_pending(ctx.session, self.mfa)

    # -- the audit log ---------------------------------------------------------------------------

    def audit(self, event: str, ctx: Ctx, **fields: Any) -> None:
        self.app.audit.event(event, client=ctx.ip, **fields)

    # -- pages for trouble -----------------------------------------------------------------------

    def error(self, ctx: Ctx, status: int, heading: str, message: str, **values: Any) -> Reply:
        return self.views.page(
            ctx, "error.html", status, title=heading, heading=heading, message=message, **values
        )

    def refused(self, ctx: Ctx, exc: ManageError) -> Reply:
        """A refusal of the service layer as a page (its message is written for people)."""
        headings = {
            "not_found": "Not found",
            "forbidden": "Not allowed",
            "cap_reached": "Too many app passwords",
            "conflict": "Already done",
            "unavailable": "Temporarily unavailable",
            "invalid": "Please check your input",
        }
        message = exc.message[:1].upper() + exc.message[1:] + "."
        return self.error(ctx, STATUS[exc.code], headings[exc.code], message)

    def too_many(self, ctx: Ctx) -> Reply:
        return self.error(
            ctx,
            429,
            "Too many attempts",
            "There were too many failed sign-ins. Wait a few minutes, then try again.",
        )

    def unavailable(self, ctx: Ctx) -> Reply:
        return self.error(
            ctx,
            503,
            "Temporarily unavailable",
            "The directory or the database is not answering right now. Try again in a minute; "
            "if it keeps happening, tell the IT helpdesk.",
        )
