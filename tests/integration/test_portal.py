"""The self-service portal over real HTTP (a client without JavaScript), in front of the real
Dovecot: sign-in with the users file's password, codes created, shown once, used and revoked,
CSRF, single-use forms, session expiry, the recent-sign-in rule, prerequisites and admins."""

from __future__ import annotations

import imaplib
import json
import re

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.support.portal import PASSWORDS, start_portal
from tests.support.webclient import WebClient

pytestmark = pytest.mark.integration


@pytest_twisted.async_yield_fixture(scope="module")
async def portal(dovecot, postfix, test_ca, tmp_path_factory):
    folder = tmp_path_factory.mktemp("portal")
    harness = await start_portal(folder, dovecot, postfix=postfix, test_ca=test_ca)
    yield harness
    await harness.stop()


def client(harness, source: str | None = None) -> WebClient:
    return WebClient("127.0.0.1", harness.port("portal"), source=source)


def imap_login(port: int, user: str, code: str) -> str:
    try:
        with imaplib.IMAP4("127.0.0.1", port) as imap:
            typ, _ = imap.login(user, code)
            return typ
    except imaplib.IMAP4.error as exc:
        return str(exc)


def create_code(web: WebClient, label: str, **fields) -> tuple[str, object]:
    """Fill in the create form as a person does; (the code shown, the page)."""
    form = web.get("/codes/new")
    assert form.status == 200, form.text
    data = {
        "csrf": form.hidden("csrf", "/codes/new"),
        "nonce": form.hidden("nonce", "/codes/new"),
        "label": label,
        "scopes": ["imap", "pop3", "smtp"],
        "expires": "default",
        **fields,
    }
    page = web.post("/codes/new", data)
    return (page.element_text("new-code") if page.status == 201 else ""), page


def row_of(page, label: str) -> str:
    """The table row of the code with this label."""
    for row in re.findall(r"<tr id=\"code-\d+\".*?</tr>", page.text, re.S):
        if f">{label}<" in row:
            return row
    raise AssertionError(f"no row for {label!r}")


@pytest_twisted.ensureDeferred
async def test_pages_are_html_for_people_with_the_security_headers(portal):
    def run():
        web = client(portal)
        page = web.get("/codes", follow=False)
        assert (page.status, page.header("Location")) == (303, "/signin")
        page = web.get("/signin")
        assert page.status == 200
        assert '<meta name="viewport"' in page.text and '<label for="password">' in page.text
        assert "script-src 'self'" in page.header("Content-Security-Policy")
        assert "frame-ancestors 'none'" in page.header("Content-Security-Policy")
        assert page.header("Cache-Control") == "no-store"
        assert page.header("Referrer-Policy") == "no-referrer"
        assert "<script>" not in page.text and "style=" not in page.text
        missing = web.get("/no/such/page")
        assert missing.status == 404 and "There is no such page" in missing.text
        assert "Traceback" not in missing.text
        css = web.get(re.search(r'href="(/static/style\.css\?v=\w+)"', page.text).group(1))
        assert css.status == 200 and css.header("Content-Type").startswith("text/css")
        head = web.request("HEAD", "/signin")
        assert head.status == 200 and head.text == ""
        wrong_method = web.get("/signout", follow=False)
        assert wrong_method.status == 405 and wrong_method.header("Allow") == "POST"
        not_a_form = web.request("POST", "/signin", b"{}", Content_Type="application/json")
        assert not_a_form.status == 400 and "Traceback" not in not_a_form.text

    await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_a_person_creates_a_code_uses_it_sees_the_use_and_revokes_it(portal):
    imap_port = portal.port("imap")

    def run():
        web = client(portal)
        page = web.sign_in("alice@example.test", PASSWORDS["alice"])
        assert page.path == "/codes" and "Your app passwords" in page.text
        code, shown = create_code(web, "Thunderbird at home")
        assert shown.status == 201 and shown.header("Cache-Control") == "no-store"
        assert re.fullmatch(r"[A-Za-z0-9]{4}(-[A-Za-z0-9]{4}){3}", code), "not a grouped code"
        assert "127.0.0.1" in shown.text and str(imap_port) in shown.text  # setup hints
        assert imap_login(imap_port, "alice", code) == "OK"
        row = row_of(web.get("/codes"), "Thunderbird at home")
        assert 'data-label="Uses" class="uses">1<' in row
        assert "IMAP from 127.0.0.1" in row
        listing = web.get("/codes")
        code_id = re.search(r'id="code-(\d+)"', row).group(1)
        confirm = web.get(f"/codes/{code_id}/revoke?back=/codes")
        assert confirm.status == 200 and "Thunderbird at home" in confirm.text
        done = web.post(f"/codes/{code_id}/revoke", {"csrf": web.csrf(listing), "back": "/codes"})
        assert "The app password is revoked" in done.text
        assert "EXPIRED" in imap_login(imap_port, "alice", code)
        return code

    code = await threads.deferToThread(run)
    text = portal.audit_text()
    assert code not in text and code.replace("-", "") not in text
    assert PASSWORDS["alice"] not in text
    created = portal.audit_events("manage")
    assert any(e["action"] == "create" and e["by"] == "alice" for e in created)


@pytest_twisted.ensureDeferred
async def test_a_create_form_sent_twice_is_refused_and_makes_no_second_code(portal):
    def run():
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        form = web.get("/codes/new")
        data = {
            "csrf": form.hidden("csrf", "/codes/new"),
            "nonce": form.hidden("nonce", "/codes/new"),
            "label": "sent twice",
            "scopes": ["imap"],
            "expires": "30d",
        }
        first = web.post("/codes/new", data)
        again = web.post("/codes/new", data)  # reload, or back and send again
        assert first.status == 201 and again.status == 409
        assert "shown only once" in again.text
        assert first.element_text("new-code") not in again.text
        return web.get("/codes?all=1").text.count(">sent twice<")

    assert await threads.deferToThread(run) == 1


@pytest_twisted.ensureDeferred
async def test_every_post_needs_the_session_csrf_token(portal):
    def run():
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        create_code(web, "csrf target")
        row = row_of(web.get("/codes"), "csrf target")
        code_id = re.search(r'id="code-(\d+)"', row).group(1)
        forged = web.post(f"/codes/{code_id}/revoke", {"back": "/codes"})
        wrong = web.post(f"/codes/{code_id}/revoke", {"csrf": "guess", "back": "/codes"})
        assert forged.status == 403 and wrong.status == 403
        assert "This form has expired" in forged.text
        return row_of(web.get("/codes"), "csrf target")

    row = await threads.deferToThread(run)
    assert 'data-state="active"' in row


@pytest_twisted.ensureDeferred
async def test_cookies_are_httponly_samesite_strict_and_renewed_at_sign_in(portal):
    def run():
        web = client(portal)
        web.get("/signin")
        web.cookies["apppass"] = "planted-by-an-attacker"
        page = web.sign_in("alice", PASSWORDS["alice"], follow=False)
        cookie = next(c for c in page.cookies() if c.startswith("apppass="))
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback: Secure would never be sent
        assert web.cookies["apppass"] != "planted-by-an-attacker"

    await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_is_refused_counted_and_audited_without_the_password(portal):
    def run():
        web = client(portal)
        page = web.sign_in("alice", "not-her-password")
        assert page.status == 403 and "Wrong user name or password" in page.text
        assert web.sign_in("nobody-here", "whatever-Pw-1").status == 403
        assert web.sign_in("printer1", "no-portal-password").status == 403

    await threads.deferToThread(run)
    events = portal.audit_events("portal_signin")
    reasons = {(e.get("login"), e.get("reason")) for e in events if e["result"] == "fail"}
    assert ("alice", "wrong password") in reasons and ("nobody-here", "unknown login") in reasons
    assert ("printer1", "wrong password") in reasons  # no password_hash: no portal sign-in
    assert "not-her-password" not in portal.audit_text()


@pytest_twisted.ensureDeferred
async def test_an_idle_or_too_old_session_ends(portal):
    def run(column: str, notice: str):
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        portal.store.run(f"UPDATE web_sessions SET {column} = {column} - 86400")
        page = web.get("/codes", follow=False)
        assert (page.status, page.header("Location")) == (303, f"/signin?notice={notice}")
        assert web.get("/codes", follow=False).header("Location") == "/signin"  # closed
        return web.get(page.header("Location")).text

    assert "without activity" in await threads.deferToThread(run, "seen_at", "idle")
    assert "time limit" in await threads.deferToThread(run, "created_at", "max")


@pytest_twisted.ensureDeferred
async def test_creating_a_code_needs_a_recent_sign_in(portal):
    def run():
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        portal.store.run("UPDATE web_sessions SET signed_in_at = signed_in_at - 3600")
        page = web.get("/codes/new", follow=False)
        assert page.header("Location") == "/reauth?next=/codes/new"
        ask = web.get("/reauth?next=/codes/new")
        assert "Enter your password again" in ask.text
        wrong = web.post("/reauth", {"csrf": web.csrf(ask), "next": "/codes/new", "password": "x"})
        assert wrong.status == 403
        again = web.post(
            "/reauth",
            {"csrf": web.csrf(ask), "next": "/codes/new", "password": PASSWORDS["alice"]},
        )
        assert again.path == "/codes/new" and 'name="nonce"' in again.text

    await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_a_session_cookie_taken_to_another_address_cannot_create_codes(portal):
    def run():
        victim = client(portal, source="127.0.0.1")
        victim.sign_in("alice", PASSWORDS["alice"])
        thief = client(portal, source="127.0.0.3")
        thief.cookies = dict(victim.cookies)
        assert thief.get("/codes").status == 200  # the list: yes
        form = thief.get("/codes/new")  # a code: only after the password again
        assert form.path == "/reauth?next=/codes/new"
        assert "different network" in form.text
        # Even with a nonce and CSRF token from the victim's page, the POST is refused.
        page = victim.get("/codes/new")
        data = {
            "csrf": page.hidden("csrf", "/codes/new"),
            "nonce": page.hidden("nonce", "/codes/new"),
            "label": "stolen",
            "scopes": ["imap"],
            "expires": "default",
        }
        stolen = thief.post("/codes/new", data)
        assert stolen.path.startswith("/reauth") and "new-code" not in stolen.text

    await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_an_account_outside_the_legacy_group_lands_on_the_prerequisites(portal):
    def run():
        web = client(portal)
        page = web.sign_in("bob", PASSWORDS["bob"])
        assert page.path == "/prerequisites"
        assert "not a member of legacy-mail" in page.text
        assert "ask the IT helpdesk to add you to legacy-mail" in page.text
        assert web.get("/codes/new").path == "/prerequisites"
        assert web.get("/admin").status == 403

    await threads.deferToThread(run)


@pytest_twisted.ensureDeferred
async def test_an_admin_creates_a_printer_code_recorded_as_theirs(portal):
    def run():
        web = client(portal)
        web.sign_in("carol", PASSWORDS["carol"])
        found = web.get("/admin?q=printer")
        assert "/admin/account?login=printer1" in found.text
        account = web.get("/admin/account?login=printer1")
        assert "Prerequisites" in account.text and "Recent events" in account.text
        form = web.get("/admin/new?login=printer1")
        action = "/admin/new?login=printer1"
        page = web.post(
            action,
            {
                "csrf": form.hidden("csrf", action),
                "nonce": form.hidden("nonce", action),
                "label": "Printer 3rd floor",
                "scopes": ["smtp"],
                "expires": "365d",
                "networks": "127.0.0.0/8",
            },
        )
        assert page.status == 201 and "Scan to email" in page.text
        return page.element_text("new-code"), web.get("/admin/account?login=printer1").text

    code, account_page = await threads.deferToThread(run)
    record = next(r for r in portal.store.list("key-printer1") if r.label == "Printer 3rd floor")
    assert record.created_by == "admin:carol" and record.scopes == ("smtp",)
    assert record.networks == ("127.0.0.0/8",)
    event = next(e for e in portal.audit_events("manage") if e.get("code") == record.id)
    assert (event["actor"], event["by"], event["account"]) == ("admin", "carol", "key-printer1")
    assert "Printer 3rd floor" in account_page and "admin:carol" in account_page
    assert code not in portal.audit_text()


@pytest_twisted.ensureDeferred
async def test_an_admin_sees_a_printers_sending_policy_and_that_a_device_still_retries(portal):
    action = "/admin/new?login=printer1"

    def create():
        web = client(portal)
        web.sign_in("carol", PASSWORDS["carol"])
        form = web.get(action)
        assert 'name="mail_from"' in form.text and 'name="custodian"' in form.text
        page = web.post(
            action,
            {
                "csrf": form.hidden("csrf", action),
                "nonce": form.hidden("nonce", action),
                "label": "Scanner 2nd floor",
                "scopes": ["smtp"],
                "expires": "default",
                "mail_from": "scanner@example.test",
                "rcpt_domains": "example.test",
                "max_messages_per_day": "10",
                "custodian": "print-team@example.test",
            },
        )
        assert page.status == 201, page.text
        assert "It sends as scanner@example.test; to example.test; 10 messages a day." in (
            page.text
        )
        return web

    web = await threads.deferToThread(create)
    record = next(r for r in portal.store.list("key-printer1") if r.label == "Scanner 2nd floor")
    assert record.sending.max_per_day == 10 and record.custodian == "print-team@example.test"
    portal.store.revoke(record.id)
    for _ in range(3):
        portal.store.record_stale(record.id, "10.0.4.17")

    def look():
        return row_of(web.get("/admin/account?login=printer1"), "Scanner 2nd floor")

    row = await threads.deferToThread(look)
    assert "sends as scanner@example.test; to example.test; 10 messages a day (0 sent today)" in row
    assert "notices also to print-team@example.test" in row
    assert re.search(r"Still retrying: 3 attempts since \d{4}-\d\d-\d\d from 10\.0\.4\.17", row)


@pytest_twisted.ensureDeferred
async def test_a_person_changes_a_codes_sending_limits_and_a_mistake_is_shown_by_its_field(
    portal,
):
    def run():
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        create_code(web, "Scanner at home")
        row = row_of(web.get("/codes"), "Scanner at home")
        code_id = int(re.search(r'id="code-(\d+)"', row).group(1))
        assert f'href="/codes/{code_id}/sending?back=/codes"' in row
        action = f"/codes/{code_id}/sending"
        form = web.get(f"{action}?back=/codes")
        assert form.status == 200 and "has no sending limits" in form.text
        fields = {"csrf": form.hidden("csrf", action), "back": "/codes", "mail_from": ""}
        wrong = web.post(
            action, {**fields, "rcpt_domains": "example.test", "max_messages_per_day": "0"}
        )
        assert wrong.status == 400
        assert 'id="max_messages_per_day-error"' in wrong.text
        assert '<a href="#max_messages_per_day">' in wrong.text  # the summary atop the form
        assert 'value="example.test"' in wrong.text  # what was typed stays
        saved = web.post(
            action, {**fields, "rcpt_domains": "example.test", "max_messages_per_day": "5"}
        )
        assert saved.path == "/codes?done=sending" and "The sending limits are saved" in saved.text
        assert "sends as own addresses; to example.test; 5 messages a day" in row_of(
            saved, "Scanner at home"
        )
        again = web.get(f"{action}?back=/codes")
        assert 'value="example.test"' in again.text and 'value="5"' in again.text
        return code_id

    code_id = await threads.deferToThread(run)
    assert portal.store.get(code_id).sending.max_per_day == 5
    changed = [e for e in portal.audit_events("manage") if e["action"] == "sending"]
    assert [(e["code"], e["by"]) for e in changed] == [(code_id, "alice")]


@pytest_twisted.ensureDeferred
async def test_a_person_changes_who_else_gets_a_codes_notices(portal):
    def run():
        web = client(portal)
        web.sign_in("alice", PASSWORDS["alice"])
        create_code(web, "Printer at home", custodian="team@example.test")
        row = row_of(web.get("/codes"), "Printer at home")
        code_id = int(re.search(r'id="code-(\d+)"', row).group(1))
        action = f"/codes/{code_id}/custodian"
        form = web.get(f"{action}?back=/codes")
        assert form.status == 200 and 'value="team@example.test"' in form.text
        fields = {"csrf": form.hidden("csrf", action), "back": "/codes"}
        wrong = web.post(action, {**fields, "custodian": "team"})
        assert wrong.status == 400 and 'id="custodian-error"' in wrong.text
        saved = web.post(action, {**fields, "custodian": "Facilities@example.test"})
        assert saved.path == "/codes?done=custodian" and "Saved: its notices go" in saved.text
        assert "notices also to facilities@example.test" in row_of(saved, "Printer at home")
        cleared = web.post(action, {**fields, "custodian": ""})
        assert "notices also to" not in row_of(cleared, "Printer at home")
        return code_id

    code_id = await threads.deferToThread(run)
    assert portal.store.get(code_id).custodian is None
    changed = [e for e in portal.audit_events("manage") if e["action"] == "custodian"]
    assert [(e["code"], e.get("custodian")) for e in changed] == [
        (code_id, "facilities@example.test"),
        (code_id, None),
    ]


@pytest_twisted.ensureDeferred
async def test_a_person_cannot_reach_someone_elses_code(portal):
    printer_code_id, _ = portal.issue("printer1", label="not alice's")

    def run():
        web = client(portal)
        listing = web.sign_in("alice", PASSWORDS["alice"])
        page = web.post(
            f"/codes/{printer_code_id}/disable", {"csrf": web.csrf(listing), "back": "/codes"}
        )
        limits = web.post(
            f"/codes/{printer_code_id}/sending",
            {"csrf": web.csrf(listing), "back": "/codes", "max_messages_per_day": "1"},
        )
        notices = web.post(
            f"/codes/{printer_code_id}/custodian",
            {"csrf": web.csrf(listing), "back": "/codes", "custodian": "x@example.test"},
        )
        return (
            page.status,
            limits.status,
            notices.status,
            web.get(f"/codes/{printer_code_id}/sending").status,
            web.get(f"/codes/{printer_code_id}/custodian").status,
        )

    assert await threads.deferToThread(run) == (404, 404, 404, 404, 404)
    assert not portal.store.get(printer_code_id).disabled
    assert not portal.store.get(printer_code_id).sending.active


@pytest_twisted.ensureDeferred
async def test_too_many_failures_from_an_address_are_refused(dovecot, tmp_path):
    harness = await start_portal(tmp_path, dovecot, auth={"ip_failures_per_minute": 3})
    try:

        def run():
            web = client(harness)
            for _ in range(3):
                assert web.sign_in("alice", "wrong-Pw-1").status == 403
            blocked = web.sign_in("alice", PASSWORDS["alice"])  # right, but too late
            return blocked.status, blocked.text

        status, text = await threads.deferToThread(run)
        assert status == 429 and "too many failed sign-ins" in text
        assert any(
            e.get("reason") == "too many failed logins from this address"
            for e in harness.audit_events("portal_signin")
        )
    finally:
        await harness.stop()


def test_audit_lines_are_json(portal):
    for line in (portal.folder / "audit.jsonl").read_text().splitlines():
        json.loads(line)
