"""The self-service portal: one twisted.web leaf resource that routes on the path, loads the
session (or, behind single sign-on, the person the SSO proxy names), checks CSRF on every POST,
and hands the request to a page (auth_pages, code_pages, admin_pages).

Trouble becomes a page for people, never a traceback: directory or store down is 503, a full
queue 503, a refusal of proxy/manage.py its status, anything else 500 with a reference that
the audit log's `error` event carries too.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from proxy.codes.store import StoreUnavailable
from proxy.directory.account import Account, DirectoryUnavailable
from proxy.fairqueue import QueueFull
from proxy.manage import ManageError
from proxy.web import admin_pages, auth_pages, code_pages
from proxy.web.app import MAX_BODY, WebApp, client_ip, is_secure
from proxy.web.records import WebSession
from proxy.web.session import cookie_name, ended, same_token, set_cookie
from proxy.web.signin import check_header_login
from proxy.web.state import PortalState, is_admin
from proxy.web.view import Ctx, Reply, redirect

log = Logger()

# A form is a few short fields (the create form has a dozen).
MAX_FORM_FIELDS = 50

Handler = Callable[..., Awaitable[Reply] | Reply]


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    access: str  # public | partial (password given, second factor due) | full | admin
    handler: Handler


def _route(method: str, path: str, access: str, handler: Handler) -> Route:
    return Route(method, re.compile(path + r"\Z"), access, handler)


def home(state: PortalState, ctx: Ctx) -> Reply:
    if ctx.session is None or ctx.account is None:
        return redirect("/signin")
    if state.pending(ctx):
        return redirect("/signin/totp")
    return redirect(auth_pages.landing(state.app.manager.check(ctx.account).allowed))


ROUTES = (
    _route("GET", "/", "public", home),
    _route("GET", "/signin", "public", auth_pages.signin_form),
    _route("POST", "/signin", "public", auth_pages.signin),
    _route("GET", "/signin/totp", "partial", auth_pages.totp_form),
    _route("POST", "/signin/totp", "partial", auth_pages.totp),
    _route("GET", "/enrol", "partial", auth_pages.enrol_form),
    _route("POST", "/enrol", "partial", auth_pages.enrol),
    _route("POST", "/signout", "partial", auth_pages.signout),
    _route("GET", "/reauth", "full", auth_pages.reauth_form),
    _route("POST", "/reauth", "full", auth_pages.reauth),
    _route("GET", "/codes", "full", code_pages.listing),
    _route("GET", "/prerequisites", "full", code_pages.prerequisites),
    _route("GET", "/codes/new", "full", code_pages.own_new_form),
    _route("POST", "/codes/new", "full", code_pages.own_create),
    _route("POST", r"/codes/(\d{1,12})/(disable|enable)", "full", code_pages.toggle),
    _route("GET", r"/codes/(\d{1,12})/(sending|custodian)", "full", code_pages.setting_form),
    _route("POST", r"/codes/(\d{1,12})/(sending|custodian)", "full", code_pages.set_setting),
    _route("GET", r"/codes/(\d{1,12})/revoke", "full", code_pages.revoke_form),
    _route("POST", r"/codes/(\d{1,12})/revoke", "full", code_pages.revoke),
    _route("GET", "/codes/revoke-all", "full", code_pages.revoke_all_form),
    _route("POST", "/codes/revoke-all", "full", code_pages.revoke_all),
    _route("GET", "/admin", "admin", admin_pages.search),
    _route("GET", "/admin/account", "admin", admin_pages.account),
    _route("GET", "/admin/new", "admin", admin_pages.new_for),
    _route("POST", "/admin/new", "admin", admin_pages.create_for),
    _route("POST", "/admin/reset-mfa", "admin", admin_pages.reset_mfa),
)


def portal_resource(app: WebApp) -> Resource:
    return Portal(app)


class Portal(Resource):
    isLeaf = True

    def __init__(self, app: WebApp) -> None:
        super().__init__()
        self.state = PortalState(app)
        self.app = app

    def render(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._serve(request))
        d.addCallback(lambda reply: None if gone else _write(request, reply))
        d.addErrback(lambda failure: log.failure("portal reply failed", failure))
        return NOT_DONE_YET

    async def _serve(self, request: Request) -> Reply:
        ctx = self._context(request)
        try:
            return await self._dispatch(ctx)
        except (DirectoryUnavailable, StoreUnavailable) as exc:
            self.state.audit("error", ctx, where="portal", error=str(exc), type=type(exc).__name__)
            return self.state.unavailable(ctx)
        except QueueFull:
            return self.state.error(
                ctx, 503, "Busy", "The portal is busy right now. Try again in a moment."
            )
        except ManageError as exc:
            return self.state.refused(ctx, exc)
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.failure("portal page failed (reference {ref})", ref=ref)
            self.state.audit("error", ctx, where="portal", type=type(exc).__name__, ref=ref)
            return self.state.error(
                ctx,
                500,
                "Something went wrong",
                "The portal could not finish this request. Try again; if it keeps happening, "
                f"tell the IT helpdesk and quote the reference {ref}.",
            )

    def _context(self, request: Request) -> Ctx:
        uri = urlsplit((request.uri or b"/").decode("utf-8", "replace"))
        path = uri.path.rstrip("/") or "/"
        method = (request.method or b"GET").decode("ascii", "replace")
        return Ctx(
            request=request,
            method="GET" if method == "HEAD" else method,
            path=path,
            query=parse_qs(uri.query, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS),
            form={},
            ip=client_ip(self.app, request),
            secure=is_secure(self.app, request),
        )

    async def _dispatch(self, ctx: Ctx) -> Reply:
        state = self.state
        if ctx.path.startswith("/static/"):
            found = state.views.static_file(ctx.path[len("/static/") :])
            return found or state.error(ctx, 404, "Not found", "There is no such page.")
        matches = [(r, m) for r in ROUTES if (m := r.pattern.match(ctx.path))]
        if not matches:
            await self._load_session(ctx)
            return state.error(ctx, 404, "Not found", "There is no such page.")
        chosen = next(((r, m) for r, m in matches if r.method == ctx.method), None)
        if chosen is None:
            reply = state.error(ctx, 405, "Not allowed", "This page does not take that request.")
            reply.headers["Allow"] = ", ".join(sorted({r.method for r, _ in matches}))
            return reply
        route, match = chosen
        if ctx.method == "POST":
            form = _read_form(ctx.request)
            if form is None:
                return state.error(ctx, 400, "Bad request", "The form could not be read.")
            ctx.form = form
        ended_why = await self._load_session(ctx)
        refused = self._access(route, ctx, ended_why)
        if refused is not None:
            return refused
        result = route.handler(state, ctx, *match.groups())
        return await result if isinstance(result, Awaitable) else result

    def _access(self, route: Route, ctx: Ctx, ended_why: str | None) -> Reply | None:
        """Who may see the route, and the CSRF check of every POST."""
        state = self.state
        if ctx.method == "POST":
            if route.access == "public":
                pre = ctx.request.getCookie(cookie_name(ctx.secure, pre=True).encode())
                expected = pre.decode("ascii", "replace") if pre else None
            else:
                expected = ctx.session.csrf if ctx.session else None
            checked = ctx.session is not None or route.access == "public"
            if checked and not same_token(expected, ctx.field("csrf")):
                return state.error(
                    ctx,
                    403,
                    "This form has expired",
                    "For your safety the form was not sent. Go back, reload the page and try "
                    "again.",
                    link=("/", "Start again"),
                )
        if route.access == "public":
            return None
        if ctx.session is None:
            notice = f"?notice={ended_why}" if ended_why else ""
            return redirect(f"/signin{notice}", ctx.cookies)
        if route.access == "partial":
            return None
        if state.pending(ctx):
            return redirect("/signin/totp", ctx.cookies)
        if route.access == "admin" and not ctx.session.admin:
            return state.error(
                ctx, 403, "Not allowed", "Only the IT helpdesk's admins may open this page."
            )
        return None

    # -- sessions --------------------------------------------------------------------------------

    async def _load_session(self, ctx: Ctx) -> str | None:
        """Sets ctx.session and ctx.account for a live session; says why one ended, if it did."""
        state = self.state
        if state.sso:
            return await self._sso_session(ctx)
        raw = ctx.request.getCookie(cookie_name(ctx.secure).encode())
        if not raw:
            return None
        value = raw.decode("ascii", "replace")
        session, account, why = await state.run(ctx, _live_session, self.app, value)
        if session is not None and account is not None:
            admin = is_admin(account, self.app.settings.web.admin_group)
            ctx.session, ctx.account = replace(session, admin=admin), account
        return why

    async def _sso_session(self, ctx: Ctx) -> str | None:
        """Behind single sign-on: the SSO proxy names the person on every request; a session
        holds the CSRF secret and follows the name (a new name, a new session)."""
        header = self.app.settings.web.trusted_header or ""
        name = ctx.request.getHeader(header.lower()) if self._from_proxy(ctx) else None
        if not name:
            return None
        checked = await self.state.run(ctx, check_header_login, self.app.directory, name)
        if not checked.ok or checked.account is None:
            self.state.audit("portal_signin", ctx, result="fail", login=name, reason=checked.reason)
            return None
        raw = ctx.request.getCookie(cookie_name(ctx.secure).encode())
        value = raw.decode("ascii", "replace") if raw else None
        session, account, opened = await self.state.run(
            ctx, _sso_session, self.app, value, checked.account, ctx.ip
        )
        if opened is not None:
            ctx.cookies.append(set_cookie(cookie_name(ctx.secure), opened, ctx.secure))
            self.state.audit(
                "portal_signin", ctx, result="ok", login=name, account=account.key, method="sso"
            )
        admin = is_admin(account, self.app.settings.web.admin_group)
        ctx.session, ctx.account = replace(session, admin=admin), account
        return None

    def _from_proxy(self, ctx: Ctx) -> bool:
        """Only a configured proxy may name a person (anyone can send the header)."""
        peer = getattr(ctx.request.getClientAddress(), "host", "") or ""
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.app.settings.web.trusted_proxies)


def _live_session(app: WebApp, value: str) -> tuple[WebSession | None, Account | None, str | None]:
    """The session this cookie holds, if it lives, and its account read afresh (an account that
    left the directory ends its sessions). Records the request (the idle clock restarts)."""
    records, web = app.records, app.settings.web
    session = records.session(value)
    if session is None:
        return None, None, None
    why = ended(session, datetime.now(UTC), web.session_idle, web.session_max)
    account = None if why else app.directory.by_key(session.account_key)
    if why or account is None:
        records.close_session(session)
        return None, None, why or "gone"
    records.touch_session(session)
    return session, account, None


def _sso_session(
    app: WebApp, value: str | None, account: Account, ip: str
) -> tuple[WebSession, Account, str | None]:
    """The session of the person the SSO proxy named: the browser's own if it is theirs and
    lives, else a new one (its cookie value returned to be set)."""
    records, web = app.records, app.settings.web
    session = records.session(value) if value else None
    if session is not None and (
        session.account_key != account.key
        or ended(session, datetime.now(UTC), web.session_idle, web.session_max)
    ):
        records.close_session(session)
        session = None
    if session is not None:
        records.touch_session(session)
        return session, account, None
    admin = is_admin(account, web.admin_group)
    session, opened = records.open_session(account.key, account.login, admin, ip, True)
    return session, account, opened


def _read_form(request: Request) -> dict[str, list[str]] | None:
    """The urlencoded body of a POST (at most MAX_BODY: BoundedRequest dropped a larger one),
    or None if it is not one we take."""
    kind = (request.getHeader("content-type") or "").split(";")[0].strip().lower()
    if getattr(request, "too_large", False):
        return None
    if kind != "application/x-www-form-urlencoded" or request.content is None:
        return None if kind else {}
    request.content.seek(0)
    body = request.content.read(MAX_BODY)
    try:
        return parse_qs(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS
        )
    except (UnicodeDecodeError, ValueError):
        return None


def _write(request: Request, reply: Reply) -> None:
    request.setResponseCode(reply.status)
    request.setHeader(b"Content-Type", reply.content_type.encode())
    request.setHeader(b"Cache-Control", reply.cache.encode())
    for name, value in reply.headers.items():
        request.setHeader(name.encode(), value.encode())
    for cookie in reply.cookies:
        request.responseHeaders.addRawHeader(b"Set-Cookie", cookie.encode())
    request.setHeader(b"Content-Length", str(len(reply.body)).encode())
    if reply.body:
        request.write(reply.body)
    request.finish()
