"""The portal's pages for admins (members of web.admin_group): search accounts, see one
account's prerequisites, codes and recent audit events, create a code on its behalf (a printer's,
a service account's: recorded as created by the admin), and reset its second factor. Changes go
through proxy/manage.py as an "admin" actor, so each is audited with the admin's name.
"""

from __future__ import annotations

from proxy.manage import ManageError
from proxy.web.auditlog import FIELDS, audit_path, recent_events
from proxy.web.code_pages import DONE, account_url, create, new_form
from proxy.web.state import PortalState
from proxy.web.view import Ctx, Reply, redirect


async def search(state: PortalState, ctx: Ctx) -> Reply:
    text = ctx.arg("q").strip()
    found, error = [], ""
    if text:
        try:
            accounts = await state.run(ctx, state.app.manager.search, text)
        except ManageError as exc:
            if exc.code != "invalid":
                raise
            accounts, error = [], exc.message
        found = [(a, state.app.manager.check(a)) for a in accounts]
    return state.views.page(ctx, "admin.html", title="Accounts", q=text, found=found, error=error)


async def account(state: PortalState, ctx: Ctx) -> Reply:
    manager = state.app.manager
    target = await state.run(ctx, manager.account, ctx.arg("login"))
    actor = state.actor(ctx, target.key)
    codes = await state.run(ctx, manager.codes, actor, target.key, True)
    events = await state.run(ctx, recent_events, audit_path(state.settings.audit.file), target)
    mfa = await state.run(ctx, state.app.records.totp, target.key)
    return state.views.page(
        ctx,
        "account.html",
        title=f"Account {target.login}",
        target=target,
        check=manager.check(target),
        codes=codes,
        events=events,
        fields=FIELDS,
        enrolled=mfa is not None and mfa.enrolled_at is not None,
        portal_mfa=state.mfa,
        done=DONE.get(ctx.arg("done"), ""),
        now=state.now(),
        back=account_url(target.login),
        everything=True,
    )


async def new_for(state: PortalState, ctx: Ctx) -> Reply:
    target = await state.run(ctx, state.app.manager.account, ctx.arg("login"))
    return new_form(state, ctx, target)


async def create_for(state: PortalState, ctx: Ctx) -> Reply:
    target = await state.run(ctx, state.app.manager.account, ctx.arg("login"))
    return await create(state, ctx, target, state.actor(ctx, target.key))


async def reset_mfa(state: PortalState, ctx: Ctx) -> Reply:
    session = ctx.session
    assert session is not None
    target = await state.run(ctx, state.app.manager.account, ctx.field("login"))
    await state.run(ctx, state.app.records.reset_totp, target.key)
    state.audit(
        "portal_mfa",
        ctx,
        action="reset",
        by=session.login,
        login=target.login,
        account=target.key,
    )
    return redirect(account_url(target.login) + "&done=mfa-reset")
