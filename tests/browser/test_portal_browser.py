"""The portal in a real browser (headless Chromium), end to end: an OpenLDAP user signs in on
the real slapd, enrols TOTP, creates a code, reads it from the page, logs in with it through
the proxy to the real Dovecot, sees the use on the list, revokes it and is refused after; a YAML
user does the same without a second factor; an account outside the legacy group sees the
prerequisites; an admin creates a printer's code, limits what it sends and names its team. The
main pages are saved as screenshots for the README (docs/screenshots)."""

from __future__ import annotations

import imaplib
import time

import pyotp
import pytest
import pytest_twisted
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait
from twisted.internet import threads

from tests.browser.conftest import screenshot
from tests.servers.common import free_port
from tests.servers.slapd import Slapd
from tests.support.portal import ADMIN_GROUP, PASSWORDS, start_portal

pytestmark = [pytest.mark.integration, pytest.mark.browser]

LDAP_PASSWORDS = {"alice": "alice-Pw-1", "bob": "bob-Pw-2"}  # tests/servers/slapd.py SEED_USERS


def listeners(test_ca) -> list[dict]:
    """What a site would offer: IMAP with TLS, IMAP in clear text on the local network (what
    the test's imaplib uses), SMTP submission with STARTTLS."""
    cert = {"cert_file": str(test_ca.cert), "key_file": str(test_ca.key)}
    plain = {"tls": "none", "plaintext_auth_from": ["127.0.0.0/8"]}
    return [
        {"name": "imaps", "protocol": "imap", "tls": "implicit", **cert},
        {"name": "imap", "protocol": "imap", **plain},
        {"name": "submission", "protocol": "smtp", "tls": "starttls", **cert},
    ]


def portal_web() -> dict:
    return {
        "listeners": [{"name": "portal", "bind": f"127.0.0.1:{free_port()}", "tls": "none"}],
        "admin_group": ADMIN_GROUP,
        "mail_host": "mail.example.org",
    }


@pytest_twisted.async_yield_fixture(scope="module")
async def ldap_portal(dovecot, postfix, test_ca, tmp_path_factory):
    """The portal over OpenLDAP with policy.require_mfa: the portal's own TOTP."""
    folder = tmp_path_factory.mktemp("browser-ldap")
    server = Slapd(test_ca)
    await threads.deferToThread(server.start)
    (folder / "bind-password").write_text(server.service_password + "\n")
    harness = await start_portal(
        folder,
        dovecot,
        postfix=postfix,
        test_ca=test_ca,
        listeners=listeners(test_ca),
        web=portal_web(),
        directory={
            "ldap": {
                "preset": "openldap",
                "uris": [server.uri],
                "start_tls": True,
                "ca_file": str(test_ca.ca),
                "bind_dn": server.service_dn,
                "bind_password_file": "bind-password",
                "base_dn": server.base_dn,
            }
        },
        policy={"legacy_group": "legacy-mail", "require_mfa": True, "mfa_group": "mfa-enrolled"},
    )
    yield harness
    await harness.stop()
    await threads.deferToThread(server.cleanup)


@pytest_twisted.async_yield_fixture(scope="module")
async def yaml_portal(dovecot, postfix, test_ca, tmp_path_factory):
    harness = await start_portal(
        tmp_path_factory.mktemp("browser-yaml"),
        dovecot,
        postfix=postfix,
        test_ca=test_ca,
        listeners=listeners(test_ca),
        web=portal_web(),
    )
    yield harness
    await harness.stop()


# -- driving the browser -----------------------------------------------------------------------


def wait_for(driver, css: str, timeout: float = 20):
    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def at(driver, path: str) -> None:
    WebDriverWait(driver, 20).until(lambda d: d.current_url.split("?")[0].endswith(path))


def fill(driver, field_id: str, text: str) -> None:
    element = driver.find_element(By.ID, field_id)
    element.clear()
    element.send_keys(text)


def click(driver, css: str) -> None:
    driver.find_element(By.CSS_SELECTOR, css).click()


def sign_in(driver, base: str, login: str, password: str) -> None:
    driver.delete_all_cookies()
    driver.get(base + "/signin")
    fill(driver, "login", login)
    fill(driver, "password", password)
    click(driver, "main form button[type=submit]")


def create_code(driver, label: str, shots: str | None = None) -> str:
    click(driver, "a.button[href$='/new'], a.button[href^='/admin/new']")
    wait_for(driver, "#label")
    fill(driver, "label", label)
    if shots:
        screenshot(driver, shots)
    click(driver, "form button.primary[type=submit]")
    code = wait_for(driver, "#new-code").text.strip()
    assert driver.find_element(By.CSS_SELECTOR, "button[data-copy='new-code']").is_displayed()
    return code


def imap_login(port: int, user: str, code: str) -> str:
    try:
        with imaplib.IMAP4("127.0.0.1", port) as imap:
            return imap.login(user, code)[0]
    except imaplib.IMAP4.error as exc:
        return str(exc)


def row_text(driver, label: str) -> str:
    for row in driver.find_elements(By.CSS_SELECTOR, "table.codes tbody tr"):
        if row.find_element(By.CSS_SELECTOR, "th").text.strip() == label:
            return row.text
    raise AssertionError(f"no row for {label!r}")


# -- the tests ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ldap_user_enrols_totp_creates_uses_and_revokes_a_code(browser, ldap_portal):
    base = f"http://127.0.0.1:{ldap_portal.port('portal')}"
    imap_port = ldap_portal.port("imap")

    def run() -> str:
        driver = browser
        driver.delete_all_cookies()
        driver.get(base + "/")
        wait_for(driver, "#login")
        screenshot(driver, "signin")
        sign_in(driver, base, "alice@example.org", LDAP_PASSWORDS["alice"])
        secret = wait_for(driver, "#totp-secret").text.replace(" ", "")
        assert (
            driver.find_element(By.CSS_SELECTOR, "img.qr")
            .get_attribute("src")
            .startswith("data:image/svg+xml")
        )
        screenshot(driver, "enrol")
        fill(driver, "code", pyotp.TOTP(secret).now())
        click(driver, "form[action='/enrol'] button[type=submit]")
        wait_for(driver, "#recovery-codes li")
        recovery = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#recovery-codes li")]
        assert len(recovery) == 10
        click(driver, "a.button.primary")
        at(driver, "/codes")
        code = create_code(driver, "Thunderbird at home", shots="new")
        screenshot(driver, "created")
        assert "mail.example.org" in driver.page_source  # setup hints: web.mail_host
        assert imap_login(imap_port, "alice", code) == "OK"
        driver.get(base + "/codes")
        row = row_text(driver, "Thunderbird at home")
        assert "1" in row.split("Uses")[-1] or "\n1\n" in row, row
        assert "IMAP from 127.0.0.1" in row
        screenshot(driver, "codes")
        # Revoke, with the confirmation step.
        driver.find_element(By.CSS_SELECTOR, "a[aria-label='Revoke Thunderbird at home']").click()
        wait_for(driver, "button.danger").click()
        assert "revoked" in wait_for(driver, ".notice").text
        assert "EXPIRED" in imap_login(imap_port, "alice", code)
        # Signing in again asks for the second factor; the next time step's code works once.
        click(driver, "form.signout button")
        sign_in(driver, base, "alice", LDAP_PASSWORDS["alice"])
        wait_for(driver, "#code")
        fill(driver, "code", pyotp.TOTP(secret).at(time.time() + 30))
        click(driver, "form[action='/signin/totp'] button[type=submit]")
        at(driver, "/codes")
        return code

    code = await threads.deferToThread(run)
    assert code not in ldap_portal.audit_text()
    assert LDAP_PASSWORDS["alice"] not in ldap_portal.audit_text()
    enrolled = [e for e in ldap_portal.audit_events("portal_mfa") if e["action"] == "enrol"]
    assert enrolled and enrolled[0]["login"] == "alice"


@pytest_twisted.ensureDeferred
async def test_an_account_outside_the_legacy_group_sees_the_prerequisites(browser, ldap_portal):
    base = f"http://127.0.0.1:{ldap_portal.port('portal')}"

    def run() -> str:
        driver = browser
        sign_in(driver, base, "bob", LDAP_PASSWORDS["bob"])
        secret = wait_for(driver, "#totp-secret").text.replace(" ", "")
        fill(driver, "code", pyotp.TOTP(secret).now())
        click(driver, "form[action='/enrol'] button[type=submit]")
        wait_for(driver, "#recovery-codes li")
        click(driver, "a.button.primary")
        at(driver, "/prerequisites")
        screenshot(driver, "prerequisites")
        return driver.find_element(By.CSS_SELECTOR, "ul.verdicts").text

    verdicts = await threads.deferToThread(run)
    assert "not a member of legacy-mail" in verdicts
    assert "ask the IT helpdesk to add you to legacy-mail" in verdicts


@pytest_twisted.ensureDeferred
async def test_yaml_user_and_an_admin_creating_a_printer_code(browser, yaml_portal):
    base = f"http://127.0.0.1:{yaml_portal.port('portal')}"
    imap_port = yaml_portal.port("imap")

    def run() -> tuple[str, str]:
        driver = browser
        sign_in(driver, base, "alice", PASSWORDS["alice"])
        at(driver, "/codes")
        code = create_code(driver, "iPhone Mail")
        assert imap_login(imap_port, "alice", code) == "OK"
        # The admin: search, the account, a code on the printer's behalf.
        click(driver, "form.signout button")
        sign_in(driver, base, "carol", PASSWORDS["carol"])
        at(driver, "/prerequisites")  # carol is not in legacy-mail herself
        driver.get(base + "/admin")
        fill(driver, "q", "printer")
        click(driver, "form.search button")
        wait_for(driver, "table.accounts")
        screenshot(driver, "admin")
        click(driver, "table.accounts a")
        wait_for(driver, "ul.verdicts")
        printer = create_code(driver, "Scanner 3rd floor")
        driver.get(base + "/admin/account?login=printer1")
        wait_for(driver, "table.codes")
        # Later the admin limits what the scanner may send, without a new code for it.
        click(driver, "a[aria-label='Sending limits of Scanner 3rd floor']")
        wait_for(driver, "#rcpt_domains")
        fill(driver, "mail_from", "scanner@example.org")
        fill(driver, "rcpt_domains", "example.org")
        fill(driver, "max_messages_per_day", "20")
        screenshot(driver, "sending")
        click(driver, "form button.primary[type=submit]")
        wait_for(driver, "table.codes")
        assert "The sending limits are saved" in driver.page_source
        # And who else hears of its expiry: the printer's team.
        click(driver, "a[aria-label='Notices of Scanner 3rd floor']")
        wait_for(driver, "#custodian")
        fill(driver, "custodian", "print-team@example.org")
        screenshot(driver, "notices")
        click(driver, "form button.primary[type=submit]")
        wait_for(driver, "table.codes")
        limits = row_text(driver, "Scanner 3rd floor")
        screenshot(driver, "account")
        return code, printer, limits

    code, printer, limits = await threads.deferToThread(run)
    assert "sends as scanner@example.org; to example.org; 20 messages a day" in limits
    assert "notices also to print-team@example.org" in limits
    record = next(r for r in yaml_portal.store.list("key-printer1"))
    assert record.label == "Scanner 3rd floor" and record.created_by == "admin:carol"
    assert record.sending.max_per_day == 20
    assert code not in yaml_portal.audit_text() and printer not in yaml_portal.audit_text()
