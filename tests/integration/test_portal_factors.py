"""The portal's second factor and single sign-on over real HTTP: TOTP enrolled on first
sign-in (recovery codes shown once), a TOTP step or recovery code used once, a per-account
limit on guesses, and `web.trusted_header` believed only from `web.trusted_proxies`."""

from __future__ import annotations

import re
import time

import pyotp
import pytest
import pytest_twisted
from twisted.internet import threads

from tests.servers.common import free_port
from tests.servers.slapd import Slapd
from tests.support.portal import PASSWORDS, start_portal
from tests.support.webclient import WebClient

pytestmark = pytest.mark.integration


@pytest_twisted.async_yield_fixture(scope="module")
async def mfa_portal(dovecot, tmp_path_factory):
    harness = await start_portal(tmp_path_factory.mktemp("portal-mfa"), dovecot, mfa=True)
    yield harness
    await harness.stop()


def client(harness, source: str | None = None, **headers: str) -> WebClient:
    return WebClient("127.0.0.1", harness.port("portal"), source=source, headers=headers)


def enrol(web: WebClient, login: str) -> tuple[str, list[str], float]:
    """Sign in and enrol TOTP as a person does: (secret, recovery codes, when)."""
    page = web.sign_in(login, PASSWORDS[login])
    assert page.path == "/enrol", page.path
    secret = page.element_text("totp-secret").replace(" ", "")
    assert web.get("/codes", follow=False).header("Location") == "/signin/totp"
    wrong = web.post("/enrol", {"csrf": web.csrf(page), "code": "12345x"})
    assert wrong.status == 403 and "did not work" in wrong.text
    now = time.time()
    done = web.post("/enrol", {"csrf": web.csrf(page), "code": pyotp.TOTP(secret).at(now)})
    assert done.status == 200 and done.header("Cache-Control") == "no-store"
    codes = re.findall(r"<li><code>([a-z0-9]{5}-[a-z0-9]{5})</code></li>", done.text)
    assert len(codes) == 10
    assert web.get("/codes").status == 200
    return secret, codes, now


def second_factor(web: WebClient, login: str, typed: str):
    page = web.sign_in(login, PASSWORDS[login])
    assert page.path == "/signin/totp", (page.path, page.status)
    return web.post("/signin/totp", {"csrf": web.csrf(page), "code": typed})


@pytest_twisted.ensureDeferred
async def test_totp_is_enrolled_then_asked_and_each_step_and_recovery_code_works_once(
    mfa_portal,
):
    def run():
        web = client(mfa_portal)
        secret, codes, enrolled_at = enrol(web, "alice")
        # The step used to enrol is spent: a replay of that code is refused.
        replay = second_factor(client(mfa_portal), "alice", pyotp.TOTP(secret).at(enrolled_at))
        assert replay.status == 403
        later = pyotp.TOTP(secret).at(enrolled_at + 30)  # next step: within the drift window
        assert second_factor(client(mfa_portal), "alice", later).path == "/codes"
        assert second_factor(client(mfa_portal), "alice", later).status == 403
        assert second_factor(client(mfa_portal), "alice", codes[0]).path == "/codes"
        assert second_factor(client(mfa_portal), "alice", codes[0]).status == 403
        # Without the second factor the session reaches nothing but the second factor page.
        pending = client(mfa_portal)
        pending.sign_in("alice", PASSWORDS["alice"])
        for path in ("/codes", "/codes/new", "/admin", "/prerequisites"):
            assert pending.get(path, follow=False).header("Location") == "/signin/totp"
        return secret, codes

    secret, codes = await threads.deferToThread(run)
    fails = [e for e in mfa_portal.audit_events("portal_signin") if e["result"] == "fail"]
    reasons = {e.get("reason") for e in fails}
    assert "TOTP code already used (replay)" in reasons
    assert "not an unused recovery code" in reasons
    text = mfa_portal.audit_text()
    assert secret not in text and not any(c in text for c in codes)


@pytest_twisted.ensureDeferred
async def test_guessing_one_accounts_second_factor_stops_after_ten_tries(mfa_portal):
    def run():
        enrol(client(mfa_portal), "carol")
        for n in range(10):  # from ten addresses: the per-address limit never trips
            page = second_factor(client(mfa_portal, source=f"127.0.1.{n + 1}"), "carol", "000000")
            assert page.status == 403, n
        # Now even the right password stops before the second factor, from anywhere.
        web = client(mfa_portal, source="127.0.2.1")
        blocked = web.sign_in("carol", PASSWORDS["carol"])
        assert "apppass" not in web.cookies
        return blocked

    blocked = await threads.deferToThread(run)
    assert blocked.status == 429 and "Too many attempts" in blocked.text
    assert any(
        e.get("reason") == "too many failed sign-ins for this account"
        for e in mfa_portal.audit_events("portal_signin")
    )


# -- single sign-on ------------------------------------------------------------------------------


@pytest_twisted.async_yield_fixture(scope="module")
async def sso_portal(dovecot, tmp_path_factory):
    web = {
        "listeners": [{"name": "portal", "bind": f"127.0.0.1:{free_port()}", "tls": "none"}],
        "trusted_header": "Remote-User",
        "trusted_proxies": ["127.0.0.2/32"],
        "admin_group": "helpdesk",
    }
    harness = await start_portal(tmp_path_factory.mktemp("portal-sso"), dovecot, mfa=True, web=web)
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_the_sso_header_signs_in_only_from_a_trusted_proxy(sso_portal):
    def run():
        proxied = client(sso_portal, source="127.0.0.2", **{"Remote-User": "alice"})
        page = proxied.get("/")
        assert page.path == "/codes" and page.status == 200  # no password, no TOTP page
        assert "alice" in page.text
        code_page = proxied.get("/codes/new")  # every request is a fresh sign-in: no reauth
        assert code_page.status == 200 and 'name="nonce"' in code_page.text
        forged = client(sso_portal, source="127.0.0.1", **{"Remote-User": "alice"})
        refused = forged.get("/codes")
        assert refused.status == 401 and "single sign-on" in refused.text
        assert forged.get("/signin").status == 401  # and no password form to fall back on
        posted = forged.post("/signin", {"login": "alice", "password": PASSWORDS["alice"]})
        assert posted.status in (401, 403) and not forged.cookies
        unknown = client(sso_portal, source="127.0.0.2", **{"Remote-User": "mallory"})
        assert unknown.get("/codes").status == 401
        # The proxy names someone else on the same browser: that person, a new session.
        proxied.headers["Remote-User"] = "bob"
        assert proxied.get("/").path == "/prerequisites"
        https = client(
            sso_portal, source="127.0.0.2", **{"Remote-User": "alice", "X-Forwarded-Proto": "https"}
        )
        cookie = next(c for c in https.get("/codes", follow=False).cookies())
        assert cookie.startswith("__Host-apppass=") and "; Secure" in cookie

    await threads.deferToThread(run)
    events = sso_portal.audit_events("portal_signin")
    assert any(e["result"] == "ok" and e.get("method") == "sso" for e in events)
    assert any(e.get("reason") == "unknown login in the trusted header" for e in events)


# -- trouble -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_directory_that_does_not_answer_is_a_page_for_people(dovecot, test_ca, tmp_path):
    server = Slapd(test_ca, name="slapd-portal-down")
    await threads.deferToThread(server.start)
    (tmp_path / "bind-password").write_text(server.service_password + "\n")
    harness = await start_portal(
        tmp_path,
        dovecot,
        directory={
            "ldap": {
                "preset": "openldap",
                "uris": [server.uri],
                "start_tls": True,
                "ca_file": str(test_ca.ca),
                "bind_dn": server.service_dn,
                "bind_password_file": "bind-password",
                "base_dn": server.base_dn,
                "timeout": "1s",
                "connect_timeout": "1s",
                "cache_ttl": "0s",
                "negative_cache_ttl": "0s",
            }
        },
    )
    try:
        web = client(harness)
        assert (await threads.deferToThread(web.sign_in, "alice", "alice-Pw-1")).path == "/codes"
        await threads.deferToThread(server.stop)
        page = await threads.deferToThread(client(harness).sign_in, "alice", "alice-Pw-1")
        assert page.status == 503 and "Temporarily unavailable" in page.text
        assert "Traceback" not in page.text and "ldap" not in page.text.lower()
        signed_in = await threads.deferToThread(web.get, "/codes")  # a session: same page
        assert signed_in.status == 503
        errors = harness.audit_events("error")
        assert errors and all(e["where"] == "portal" for e in errors)
        assert "alice-Pw-1" not in harness.audit_text()
    finally:
        await harness.stop()
        await threads.deferToThread(server.cleanup)
