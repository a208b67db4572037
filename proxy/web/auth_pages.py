"""The portal's sign-in pages: password, second factor (TOTP or a recovery code), enrolling
TOTP on first sign-in, signing in again before creating a code, and signing out.

Every failure counts in the mail logins' per-address limit (target: the account, or the name
typed) and in a per-account limit, and is audited as `portal_signin` with its reason; a
password or a code never is.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from proxy.directory.account import Account
from proxy.web.app import WebApp
from proxy.web.records import WebSession
from proxy.web.session import clear_cookie, cookie_name, new_pre_token, set_cookie
from proxy.web.signin import (
    Checked,
    check_password,
    check_second_factor,
    enrolled,
    enrolment_secret,
    finish_enrolment,
)
from proxy.web.state import PortalState, is_admin
from proxy.web.totp import grouped_secret, issuer_label, provisioning_uri, qr_data_uri
from proxy.web.view import Ctx, Reply, redirect

NOTICES = {
    "signedout": "You are signed out.",
    "idle": "You were signed out after a while without activity. Please sign in again.",
    "max": "Your session reached its time limit. Please sign in again.",
    "gone": "Your account is no longer in the directory.",
}

# Where "sign in again" may send a person back to: only the pages that create codes.
REAUTH_TARGETS = ("/codes/new", "/admin/new")


def landing(allowed: bool) -> str:
    return "/codes" if allowed else "/prerequisites"


# -- blocking work ---------------------------------------------------------------------------------


def open_session(
    app: WebApp, old: str | None, account: Account, ip: str, second_factor: bool
) -> tuple[WebSession, str]:
    """A new session (a new cookie value: never the one the browser brought, against fixation),
    closing the one it replaces and those long idle."""
    records = app.records
    if old and (previous := records.session(old)) is not None:
        records.close_session(previous)
    records.close_sessions_before(datetime.now(UTC) - app.settings.web.session_idle)
    admin = is_admin(account, app.settings.web.admin_group)
    return records.open_session(account.key, account.login, admin, ip, second_factor)


# -- sign-in with the password ---------------------------------------------------------------------


def signin_form(state: PortalState, ctx: Ctx, error: str = "", status: int = 200) -> Reply:
    if ctx.session is not None and not error:
        return redirect("/signin/totp" if state.pending(ctx) else "/codes")
    if state.sso:
        return state.error(
            ctx,
            401,
            "Sign in through single sign-on",
            "This portal signs you in through your organisation's single sign-on. Open it "
            "through the address your IT department gave you.",
            signed_in=False,
        )
    token = new_pre_token()
    ctx.cookies.append(set_cookie(cookie_name(ctx.secure, pre=True), token, ctx.secure))
    notice = NOTICES.get(ctx.arg("notice"), "")
    return state.views.page(
        ctx,
        "signin.html",
        status,
        title="Sign in",
        pre=token,
        error=error,
        notice=notice,
        login=ctx.field("login"),
        signed_in=False,
    )


async def signin(state: PortalState, ctx: Ctx) -> Reply:
    if state.sso:
        return signin_form(state, ctx)
    login, password = ctx.field("login").strip(), ctx.field("password")
    if not login or not password:
        return signin_form(state, ctx, "Enter your user name and your password.", 400)
    blocked = _blocked(state, ctx, None)
    if blocked is not None:
        state.audit("portal_signin", ctx, result="fail", login=login, reason=blocked)
        return state.too_many(ctx)
    checked: Checked = await state.run(ctx, check_password, state.app.directory, login, password)
    account = checked.account
    if account is not None and (why := _blocked(state, ctx, account)) is not None:
        state.audit(
            "portal_signin", ctx, result="fail", login=login, account=account.key, reason=why
        )
        return state.too_many(ctx)
    if not checked.ok or account is None:
        _failed(state, ctx, login, checked)
        return signin_form(state, ctx, "Wrong user name or password.", 403)
    if not state.mfa:
        _succeeded(state, ctx, account)
    session, value = await state.run(
        ctx, open_session, state.app, _cookie(ctx), account, ctx.ip, not state.mfa
    )
    state.audit(
        "portal_signin",
        ctx,
        result="ok" if not state.mfa else "second_factor_due",
        login=login,
        account=account.key,
        method="password",
        admin=session.admin or None,
    )
    ctx.cookies.append(set_cookie(cookie_name(ctx.secure), value, ctx.secure))
    ctx.cookies.append(clear_cookie(cookie_name(ctx.secure, pre=True), ctx.secure))
    if state.mfa:
        has = await state.run(ctx, enrolled, state.app.records, account.key)
        return redirect("/signin/totp" if has else "/enrol", ctx.cookies)
    allowed = state.app.manager.check(account).allowed
    return redirect(landing(allowed), ctx.cookies)


def _cookie(ctx: Ctx) -> str | None:
    value = ctx.request.getCookie(cookie_name(ctx.secure).encode())
    return value.decode("ascii", "replace") if value else None


def _blocked(state: PortalState, ctx: Ctx, account: Account | None) -> str | None:
    now = state.clock()
    if state.app.limiter.blocked(ctx.ip, now):
        return "too many failed logins from this address"
    if account is not None and state.account_failures.blocked(account.key, now):
        return "too many failed sign-ins for this account"
    return None


def _failed(state: PortalState, ctx: Ctx, login: str, checked: Checked) -> None:
    account = checked.account
    now = state.clock()
    target = account.key if account else f"login:{login.casefold()}"
    state.app.limiter.failure(ctx.ip, now, target)
    if account is not None:
        state.account_failures.failure(account.key, now)
    state.audit(
        "portal_signin",
        ctx,
        result="fail",
        login=login,
        account=account.key if account else None,
        method=checked.method,
        reason=checked.reason,
    )


def _succeeded(state: PortalState, ctx: Ctx, account: Account) -> None:
    """A complete sign-in forgives this account's failures (not before the second factor: a
    password alone must not reset the count of guesses at the second factor)."""
    state.app.limiter.success(ctx.ip, account.key)
    state.account_failures.success(account.key, "")


# -- the second factor -----------------------------------------------------------------------------


async def totp_form(state: PortalState, ctx: Ctx, error: str = "", status: int = 200) -> Reply:
    account = ctx.account
    if not state.pending(ctx) or account is None:
        return redirect("/codes")
    if not await state.run(ctx, enrolled, state.app.records, account.key):
        return redirect("/enrol")
    return state.views.page(
        ctx, "totp.html", status, title="Second factor", error=error, signed_in=False
    )


async def totp(state: PortalState, ctx: Ctx) -> Reply:
    session, account = ctx.session, ctx.account
    assert session is not None and account is not None
    if not state.pending(ctx):
        return redirect("/codes")
    typed = ctx.field("code")
    if (why := _blocked(state, ctx, account)) is not None:
        state.audit("portal_signin", ctx, result="fail", login=session.login, reason=why)
        return state.too_many(ctx)
    checked = await state.run(
        ctx, check_second_factor, state.app.records, account.key, typed, state.now().timestamp()
    )
    if not checked.ok:
        _failed(state, ctx, session.login, replace(checked, account=account))
        return await totp_form(state, ctx, "That code did not work. Try the current one.", 403)
    return await _second_factor_done(state, ctx, checked.method)


async def _second_factor_done(state: PortalState, ctx: Ctx, method: str) -> Reply:
    session, account = ctx.session, ctx.account
    assert session is not None and account is not None
    _succeeded(state, ctx, account)
    await state.run(ctx, _mark_second_factor, state.app, session)
    state.audit(
        "portal_signin", ctx, result="ok", login=session.login, account=account.key, method=method
    )
    return redirect(landing(state.app.manager.check(account).allowed))


def _mark_second_factor(app: WebApp, session: WebSession) -> None:
    app.records.touch_session(session, second_factor_at=datetime.now(UTC))


async def enrol_form(state: PortalState, ctx: Ctx, error: str = "", status: int = 200) -> Reply:
    session = ctx.session
    assert session is not None
    if not state.pending(ctx):
        return redirect("/codes")
    secret = await state.run(ctx, enrolment_secret, state.app.records, session.account_key)
    if secret is None:
        return redirect("/signin/totp")
    issuer = issuer_label(state.settings.web.public_url, state.settings.hostname)
    uri = provisioning_uri(secret, session.login, issuer)
    return state.views.page(
        ctx,
        "enrol.html",
        status,
        title="Set up your authenticator app",
        qr=qr_data_uri(uri),
        secret=grouped_secret(secret),
        error=error,
        signed_in=False,
    )


async def enrol(state: PortalState, ctx: Ctx) -> Reply:
    session, account = ctx.session, ctx.account
    assert session is not None and account is not None
    if not state.pending(ctx):
        return redirect("/codes")
    if (why := _blocked(state, ctx, account)) is not None:
        state.audit("portal_signin", ctx, result="fail", login=session.login, reason=why)
        return state.too_many(ctx)
    codes = await state.run(
        ctx,
        finish_enrolment,
        state.app.records,
        account.key,
        ctx.field("code"),
        state.now().timestamp(),
    )
    if codes is None:
        failed = Checked(False, account, "wrong TOTP code at enrolment", "totp")
        _failed(state, ctx, session.login, failed)
        return await enrol_form(state, ctx, "That code did not work. Try the current one.", 403)
    await _second_factor_done(state, ctx, "totp")
    state.audit("portal_mfa", ctx, action="enrol", login=session.login, account=account.key)
    ctx.session = replace(session, second_factor_at=state.now())
    allowed = state.app.manager.check(account).allowed
    return state.views.page(
        ctx, "recovery.html", title="Your recovery codes", codes=codes, next=landing(allowed)
    )


# -- signing in again, signing out -----------------------------------------------------------------


def reauth_form(state: PortalState, ctx: Ctx, error: str = "", status: int = 200) -> Reply:
    target = ctx.arg("next") or ctx.field("next")
    if state.sso:  # the SSO proxy signs in every request: no password here
        return redirect(target if _safe_target(target) else "/codes/new")
    return state.views.page(
        ctx,
        "reauth.html",
        status,
        title="Confirm it is you",
        error=error,
        next=target if _safe_target(target) else "/codes/new",
        moved=ctx.session is not None and ctx.session.client_ip != ctx.ip,
    )


async def reauth(state: PortalState, ctx: Ctx) -> Reply:
    session = ctx.session
    assert session is not None
    if state.sso:
        return reauth_form(state, ctx)
    if (why := _blocked(state, ctx, ctx.account)) is not None:
        state.audit("portal_signin", ctx, result="fail", login=session.login, reason=why)
        return state.too_many(ctx)
    checked = await state.run(
        ctx, check_password, state.app.directory, session.login, ctx.field("password")
    )
    if not checked.ok or checked.account is None or checked.account.key != session.account_key:
        _failed(state, ctx, session.login, replace(checked, account=ctx.account))
        return reauth_form(state, ctx, "That password did not work.", 403)
    _succeeded(state, ctx, checked.account)
    await state.run(ctx, _mark_signed_in, state.app, session, ctx.ip)
    state.audit(
        "portal_signin",
        ctx,
        result="ok",
        login=session.login,
        account=session.account_key,
        method="password",
        step="again",
    )
    target = ctx.field("next")
    return redirect(target if _safe_target(target) else "/codes/new")


def _mark_signed_in(app: WebApp, session: WebSession, ip: str) -> None:
    app.records.touch_session(session, signed_in_at=datetime.now(UTC), client_ip=ip)


def _safe_target(target: str) -> bool:
    """Only our own code-creating pages (never another site: no open redirect)."""
    path, _, query = target.partition("?")
    return path in REAUTH_TARGETS and all(c.isalnum() or c in "=&%._-@+" for c in query)


async def signout(state: PortalState, ctx: Ctx) -> Reply:
    session = ctx.session
    if session is not None:
        await state.run(ctx, state.app.records.close_session, session)
        state.audit("portal_signout", ctx, login=session.login, account=session.account_key)
    cookies = [clear_cookie(cookie_name(ctx.secure), ctx.secure)]
    return redirect("/signin?notice=signedout", cookies)
