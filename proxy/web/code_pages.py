"""The portal's pages about codes: the list, the prerequisites, the create form and the page
that shows a new code once (with setup hints), disable / enable, its sending limits and who
else gets its notices, revoke (after a confirmation) and revoke all. An admin reaches the same
form and actions for another account through admin_pages.py; proxy/manage.py decides what each
actor may do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from proxy.codes.issue import Issued
from proxy.codes.store import CodeRecord
from proxy.directory.account import Account
from proxy.manage import Actor, ManageError
from proxy.web.forms import choices, code_request, first, sending_change, sending_values
from proxy.web.hints import setup_hints
from proxy.web.state import PortalState
from proxy.web.view import Ctx, Reply, redirect

# What a finished action says on the page it returns to (keys in the URL, never free text).
DONE = {
    "disabled": "The app password is disabled: devices using it cannot sign in until enabled.",
    "enabled": "The app password is enabled again.",
    "revoked": "The app password is revoked. Devices using it can no longer sign in.",
    "revoked-all": "All your app passwords are revoked.",
    "sending": "The sending limits are saved. A device sending with it signs in again under them.",
    "custodian": "Saved: its notices go to the account and to the address given, if any.",
    "mfa-reset": "The second factor is reset: the account enrols a new one at its next sign-in.",
}


def back_to(target: str) -> str:
    """Where an action returns: the list, or an admin's account page (never another site)."""
    path, _, query = target.partition("?")
    if (
        path == "/admin/account"
        and query.startswith("login=")
        and all(c.isascii() and (c.isalnum() or c in "=%._-@+") for c in query)
    ):
        return target
    return "/codes"


def _with_done(target: str, done: str) -> str:
    return f"{target}{'&' if '?' in target else '?'}done={done}"


# -- the list --------------------------------------------------------------------------------------


async def listing(state: PortalState, ctx: Ctx) -> Reply:
    session, account = ctx.session, ctx.account
    assert session is not None and account is not None
    everything = ctx.arg("all") == "1"
    records = await state.run(
        ctx, state.app.manager.codes, state.actor(ctx), account.key, everything
    )
    check = state.app.manager.check(account)
    return state.views.page(
        ctx,
        "codes.html",
        title="Your app passwords",
        codes=records,
        everything=everything,
        check=check,
        done=DONE.get(ctx.arg("done"), ""),
        now=state.now(),
        back="/codes",
    )


def prerequisites(state: PortalState, ctx: Ctx) -> Reply:
    account = ctx.account
    assert account is not None
    check = state.app.manager.check(account)
    return state.views.page(
        ctx, "prerequisites.html", title="Before you can use app passwords", check=check
    )


# -- creating --------------------------------------------------------------------------------------


def new_form(
    state: PortalState,
    ctx: Ctx,
    account: Account,
    errors: dict[str, str] | None = None,
    problem: str = "",
    status: int = 200,
) -> Reply:
    """The create form, for the own account or (admins) another one."""
    session = ctx.session
    assert session is not None
    if not state.recent(ctx):
        return redirect("/reauth?next=" + _form_path(ctx, account))
    own = account.key == session.account_key
    return state.views.page(
        ctx,
        "new.html",
        status,
        title="New app password" if own else f"New app password for {account.login}",
        account=account,
        own=own,
        action=_form_path(ctx, account),
        nonce=state.nonces.issue(session),
        choices=choices(state.settings, datetime.now(UTC).date()),
        errors=errors or {},
        problem=problem,
        values=ctx.form if ctx.method == "POST" else {},
        back="/codes" if own else account_url(account.login),
    )


def _form_path(ctx: Ctx, account: Account) -> str:
    session = ctx.session
    if session is not None and account.key != session.account_key:
        return f"/admin/new?login={quote(account.login, safe='@')}"
    return "/codes/new"


def account_url(login: str) -> str:
    """An admin's page of one account."""
    return f"/admin/account?login={quote(login, safe='@')}"


def own_new_form(state: PortalState, ctx: Ctx) -> Reply:
    account = ctx.account
    assert account is not None
    if not state.app.manager.check(account).allowed:
        return redirect("/prerequisites")
    return new_form(state, ctx, account)


async def own_create(state: PortalState, ctx: Ctx) -> Reply:
    account = ctx.account
    assert account is not None
    return await create(state, ctx, account, state.actor(ctx))


async def create(state: PortalState, ctx: Ctx, account: Account, actor: Actor) -> Reply:
    """Create the code the form asks for and show it once. The form's nonce is spent first, so
    a POST sent again (reload, back) is refused instead of showing or making a code twice."""
    session = ctx.session
    assert session is not None
    if not state.nonces.spend(session, ctx.field("nonce")):
        return state.error(
            ctx,
            409,
            "This form was already sent",
            "A new app password is shown only once, so this page cannot be shown again. "
            "Your list shows the app passwords you have; create another if you need one.",
            link=("/codes", "Back to your app passwords"),
        )
    if not state.recent(ctx):
        return redirect("/reauth?next=" + _form_path(ctx, account))
    try:
        request = code_request(ctx.form, datetime.now(UTC))
        issued: Issued = await state.run(ctx, state.app.manager.create, actor, account, request)
    except ManageError as exc:
        if exc.code == "invalid" and exc.field:
            field = {"expires_at": "expires_date"}.get(exc.field, exc.field)
            return new_form(state, ctx, account, {field: exc.message}, status=400)
        if exc.code in ("forbidden", "cap_reached"):
            return new_form(state, ctx, account, problem=exc.message, status=409)
        raise
    record = issued.record
    return state.views.page(
        ctx,
        "created.html",
        201,
        title="Your new app password",
        code=issued.code.grouped(),
        record=record,
        account=account,
        own=account.key == session.account_key,
        hints=setup_hints(state.settings, account, record.scopes),
    )


# -- changing one code, or all ---------------------------------------------------------------------


async def _actor_for(state: PortalState, ctx: Ctx, code_id: int) -> Actor:
    """The actor for this code: an admin acts as admin on others' codes (found with admin
    rights), anyone as themselves on their own (someone else's code is then "not found")."""
    session = ctx.session
    assert session is not None
    if not session.admin:
        return state.actor(ctx)
    record = await state.run(ctx, state.app.manager.code, state.admin_actor(ctx), code_id)
    return state.actor(ctx, record.account_key)


async def toggle(state: PortalState, ctx: Ctx, code_id: str, action: str) -> Reply:
    actor = await _actor_for(state, ctx, int(code_id))
    disabled = action == "disable"
    await state.run(ctx, state.app.manager.set_disabled, actor, int(code_id), disabled)
    return redirect(_with_done(back_to(ctx.field("back")), "disabled" if disabled else "enabled"))


@dataclass(frozen=True)
class _Setting:
    """One setting of a code that has its own form (NAME.html at /codes/ID/NAME)."""

    heading: str
    values: Callable[[CodeRecord], dict[str, list[str]]]  # the form's values from the record
    read: Callable[[Ctx], Any]  # the form's values as the Manager's argument
    apply: str  # the Manager's method


SETTINGS = {
    "sending": _Setting(
        "Sending limits of",
        lambda r: sending_values(r.sending),
        lambda ctx: sending_change(ctx.form),
        "set_sending",
    ),
    "custodian": _Setting(
        "Notices of",
        lambda r: {"custodian": [r.custodian or ""]},
        lambda ctx: first(ctx.form, "custodian"),
        "set_custodian",
    ),
}


async def setting_form(
    state: PortalState, ctx: Ctx, code_id: str, name: str, errors: dict[str, str] | None = None
) -> Reply:
    """One setting of one code as its form, to change (GET), or again with what was wrong and
    what was typed (POST)."""
    setting = SETTINGS[name]
    actor = await _actor_for(state, ctx, int(code_id))
    record = await state.run(ctx, state.app.manager.code, actor, int(code_id))
    return state.views.page(
        ctx,
        f"{name}.html",
        400 if errors else 200,
        title=f"{setting.heading} “{record.label}”",
        record=record,
        action=f"/codes/{record.id}/{name}",
        values=ctx.form if errors else setting.values(record),
        errors=errors or {},
        back=back_to(ctx.field("back") if errors else ctx.arg("back")),
    )


async def set_setting(state: PortalState, ctx: Ctx, code_id: str, name: str) -> Reply:
    """Apply what the form says and go back; a mistake (a value, or a sending policy for a code
    without SMTP) shows the form again with the message by its field."""
    setting = SETTINGS[name]
    actor = await _actor_for(state, ctx, int(code_id))
    apply = getattr(state.app.manager, setting.apply)
    try:
        await state.run(ctx, apply, actor, int(code_id), setting.read(ctx))
    except ManageError as exc:
        if exc.code == "invalid" and exc.field:
            return await setting_form(state, ctx, code_id, name, {exc.field: exc.message})
        raise
    return redirect(_with_done(back_to(ctx.field("back")), name))


async def revoke_form(state: PortalState, ctx: Ctx, code_id: str) -> Reply:
    actor = await _actor_for(state, ctx, int(code_id))
    record = await state.run(ctx, state.app.manager.code, actor, int(code_id))
    return state.views.page(
        ctx,
        "confirm.html",
        title="Revoke this app password?",
        record=record,
        action=f"/codes/{record.id}/revoke",
        back=back_to(ctx.arg("back")),
    )


async def revoke(state: PortalState, ctx: Ctx, code_id: str) -> Reply:
    actor = await _actor_for(state, ctx, int(code_id))
    await state.run(ctx, state.app.manager.revoke, actor, int(code_id))
    return redirect(_with_done(back_to(ctx.field("back")), "revoked"))


def revoke_all_form(state: PortalState, ctx: Ctx) -> Reply:
    return state.views.page(
        ctx,
        "confirm.html",
        title="Revoke all your app passwords?",
        record=None,
        action="/codes/revoke-all",
        back="/codes",
    )


async def revoke_all(state: PortalState, ctx: Ctx) -> Reply:
    account = ctx.account
    assert account is not None
    await state.run(ctx, state.app.manager.revoke_all, state.actor(ctx), account.key)
    return redirect(_with_done("/codes", "revoked-all"))
