"""The portal's pure rules: session expiry and the recent-sign-in rule, CSRF tokens and cookies,
single-use form nonces, the create form, setup hints from the listeners, TOTP steps and
recovery codes, who is an admin."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyotp
import pytest

from proxy.codes.sending import SendingPolicy
from proxy.config import DirectorySettings, Listener, Settings, StoreSettings
from proxy.directory.account import Account
from proxy.manage import ManageError
from proxy.protocols import MailProtocol, TlsMode
from proxy.web.forms import code_request, sending_change, sending_values
from proxy.web.hints import setup_hints
from proxy.web.records import WebSession
from proxy.web.session import (
    FormNonces,
    clear_cookie,
    cookie_name,
    ended,
    recent_signin,
    same_token,
    set_cookie,
)
from proxy.web.settings import WebSettings
from proxy.web.state import is_admin
from proxy.web.totp import (
    matching_step,
    new_recovery_codes,
    normal_recovery_code,
    qr_data_uri,
)

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def session(**changes) -> WebSession:
    base = WebSession(
        id="digest-1",
        account_key="key-alice",
        login="alice",
        admin=False,
        created_at=T0,
        seen_at=T0,
        signed_in_at=T0,
        second_factor_at=None,
        client_ip="192.0.2.10",
        csrf="csrf-secret",
    )
    return replace(base, **changes)


# -- expiry and the recent-sign-in rule ----------------------------------------------------------

IDLE, MAX = timedelta(minutes=30), timedelta(hours=12)


def test_a_session_lives_until_idle_for_the_idle_time():
    s = session(seen_at=T0 + timedelta(hours=1), created_at=T0)
    assert ended(s, T0 + timedelta(hours=1, minutes=29), IDLE, MAX) is None
    assert ended(s, T0 + timedelta(hours=1, minutes=30), IDLE, MAX) == "idle"


def test_a_busy_session_still_ends_at_its_maximum_age():
    s = session(seen_at=T0 + timedelta(hours=11, minutes=59))
    assert ended(s, T0 + timedelta(hours=11, minutes=59, seconds=59), IDLE, MAX) is None
    assert ended(s, T0 + timedelta(hours=12), IDLE, MAX) == "max"


def test_a_sign_in_is_recent_only_within_the_window_and_from_the_same_address():
    window = timedelta(minutes=10)
    s = session(signed_in_at=T0)
    assert recent_signin(s, T0 + timedelta(minutes=9), window, "192.0.2.10")
    assert not recent_signin(s, T0 + timedelta(minutes=10), window, "192.0.2.10")
    # A cookie carried to another address must sign in again there.
    assert not recent_signin(s, T0 + timedelta(minutes=1), window, "198.51.100.7")


# -- CSRF and cookies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expected,given", [("abc", "abd"), ("abc", ""), ("", ""), (None, "abc"), ("abc", None)]
)
def test_a_csrf_token_matches_only_itself(expected, given):
    assert not same_token(expected, given)


def test_a_csrf_token_matches():
    assert same_token("abc-123", "abc-123")


def test_cookies_are_httponly_strict_and_secure_with_the_host_prefix_on_https():
    secure = set_cookie(cookie_name(True), "v", True)
    assert secure == "__Host-apppass=v; Path=/; HttpOnly; SameSite=Strict; Secure"
    plain = set_cookie(cookie_name(False), "v", False)
    assert plain == "apppass=v; Path=/; HttpOnly; SameSite=Strict"
    assert clear_cookie("apppass", False).endswith("Max-Age=0")
    assert cookie_name(True, pre=True).startswith("__Host-")


# -- single-use form nonces ---------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_nonce_is_spent_once():
    nonces = FormNonces(clock=Clock())
    s = session()
    nonce = nonces.issue(s)
    assert nonces.spend(s, nonce)
    assert not nonces.spend(s, nonce)


def test_a_nonce_of_another_session_or_altered_is_refused():
    nonces = FormNonces(clock=Clock())
    nonce = nonces.issue(session())
    assert not nonces.spend(session(id="digest-2"), nonce)
    assert not nonces.spend(session(csrf="other"), nonce)
    body, _, mac = nonce.rpartition(".")
    assert not nonces.spend(session(), f"{body}.{'0' * len(mac)}")
    assert not nonces.spend(session(), "")
    assert not nonces.spend(session(), None)


def test_a_nonce_expires():
    clock = Clock()
    nonces = FormNonces(ttl=3600, clock=clock)
    nonce = nonces.issue(session())
    clock.now += 3601
    assert not nonces.spend(session(), nonce)


# -- the create form ----------------------------------------------------------------------------

NOW = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC)


def form(**fields) -> dict[str, list[str]]:
    base = {"label": ["Phone"], "scopes": ["imap", "smtp"], "expires": ["default"]}
    base.update({k: v if isinstance(v, list) else [v] for k, v in fields.items()})
    return base


def test_the_form_reads_presets_a_date_limits_and_networks():
    request = code_request(form(expires="90d", max_uses="5", networks="10.0.0.0/8, 192.0.2.1"), NOW)
    assert request.label == "Phone" and request.scopes == ("imap", "smtp")
    assert request.expires_at == NOW.replace(microsecond=0) + timedelta(days=90)
    assert request.max_uses == 5 and request.networks == ("10.0.0.0/8", "192.0.2.1")
    dated = code_request(form(expires="date", expires_date="2027-06-30"), NOW)
    assert dated.expires_at == datetime(2027, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert code_request(form(), NOW).expires_at is None  # the site's default


def test_the_form_reads_a_sending_policy_and_a_custodian():
    request = code_request(
        form(
            mail_from="scanner@example.org, *@scan.example.org",
            rcpt_domains="example.org;example.net",
            max_messages_per_day=" 10 ",
            custodian=" team@example.org ",
        ),
        NOW,
    )
    assert request.mail_from == ("scanner@example.org", "*@scan.example.org")
    assert request.rcpt_domains == ("example.org", "example.net")
    assert (request.max_messages_per_day, request.custodian) == (10, "team@example.org")
    plain = code_request(form(), NOW)
    assert (plain.mail_from, plain.max_messages_per_day, plain.custodian) == ((), None, None)


def test_the_sending_limits_form_starts_from_the_policy_and_reads_back_the_same():
    policy = SendingPolicy(("scanner@example.org", "*@scan.example.org"), ("example.org",), 10)
    values = sending_values(policy)
    assert values == {
        "mail_from": ["scanner@example.org, *@scan.example.org"],
        "rcpt_domains": ["example.org"],
        "max_messages_per_day": ["10"],
    }
    change = sending_change(values)
    assert (change.mail_from, change.rcpt_domains, change.max_messages_per_day) == (
        policy.mail_from,
        policy.rcpt_domains,
        10,
    )
    empty = sending_change(sending_values(SendingPolicy()))
    assert (empty.mail_from, empty.rcpt_domains, empty.max_messages_per_day) == ((), (), None)
    with pytest.raises(ManageError) as info:
        sending_change({"max_messages_per_day": ["a dozen"]})
    assert info.value.field == "max_messages_per_day"


@pytest.mark.parametrize(
    "fields,field",
    [
        ({"max_messages_per_day": "ten"}, "max_messages_per_day"),
        ({"max_messages_per_day": "1" * 12}, "max_messages_per_day"),
        ({"label": "  "}, "label"),
        ({"scopes": []}, "scopes"),
        ({"expires": "forever"}, "expires"),
        ({"expires": "date", "expires_date": "30/06/2027"}, "expires_date"),
        ({"expires": "date", "expires_date": "2020-01-01"}, "expires_date"),
        ({"max_uses": "ten"}, "max_uses"),
        ({"max_uses": "-1"}, "max_uses"),
        ({"label": "x" * 3000}, "label"),
    ],
)
def test_a_form_mistake_names_its_field(fields, field):
    with pytest.raises(ManageError) as caught:
        code_request(form(**fields), NOW)
    assert caught.value.field == field and caught.value.code == "invalid"


# -- setup hints --------------------------------------------------------------------------------


def settings(listeners: tuple[Listener, ...], mail_host: str | None = None) -> Settings:
    return Settings(
        source=Path("apppass.yaml"),
        hostname="proxy.example.org",
        store=StoreSettings("sqlite", None),
        directory=DirectorySettings("static"),
        listeners=listeners,
        web=WebSettings(mail_host=mail_host),
    )


def listener(protocol: str, host: str, port: int, tls: TlsMode, **kw) -> Listener:
    return Listener(f"{protocol}-{port}", MailProtocol(protocol), host, port, tls, **kw)


ALICE = Account(
    key="k",
    login="alice",
    upstream_identity="alice",
    names=("alice", "alice@example.org"),
)


def test_hints_list_each_listener_best_encryption_first_with_the_mail_host():
    s = settings(
        (
            listener("imap", "0.0.0.0", 143, TlsMode.STARTTLS),
            listener("imap", "0.0.0.0", 993, TlsMode.IMPLICIT),
            listener("pop3", "0.0.0.0", 995, TlsMode.IMPLICIT),
            listener("smtp", "0.0.0.0", 587, TlsMode.STARTTLS),
            listener("smtp", "0.0.0.0", 465, TlsMode.IMPLICIT),
        ),
        mail_host="mail.example.org",
    )
    hints = setup_hints(s, ALICE, ("imap", "smtp"))
    assert [(e.protocol, e.port, e.security) for e in hints.incoming] == [
        ("IMAP", 993, "SSL/TLS"),
        ("IMAP", 143, "STARTTLS"),
    ]  # POP3 is not in the code's scopes
    assert {e.server for e in hints.incoming + hints.outgoing} == {"mail.example.org"}
    assert hints.printer is not None and (hints.printer.port, hints.printer.security) == (
        465,
        "SSL/TLS",
    )
    assert hints.username == "alice" and hints.other_names == ("alice@example.org",)
    assert hints.sender == "alice@example.org"


def test_without_a_mail_host_hints_name_this_machine_or_a_loopback_listener():
    s = settings(
        (
            listener("imap", "::", 993, TlsMode.IMPLICIT),
            listener(
                "smtp",
                "127.0.0.1",
                1587,
                TlsMode.NONE,
                plaintext_auth_from=(ipaddress.ip_network("127.0.0.0/8"),),
            ),
        )
    )
    hints = setup_hints(s, ALICE, ("imap", "smtp"))
    assert hints.incoming[0].server == "proxy.example.org"
    assert hints.outgoing[0].server == "127.0.0.1"
    assert hints.outgoing[0].security == "None"
    assert hints.outgoing[0].note == "only from 127.0.0.0/8"


def test_no_smtp_scope_no_printer_hint():
    s = settings((listener("smtp", "0.0.0.0", 587, TlsMode.STARTTLS),))
    assert setup_hints(s, ALICE, ("imap",)).printer is None


# -- TOTP and recovery codes --------------------------------------------------------------------

SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"


def test_a_totp_code_matches_its_step_within_one_step_of_drift():
    now = 1_800_000_015.0
    step = int(now // 30)
    totp = pyotp.TOTP(SECRET)
    assert matching_step(SECRET, totp.at(now), now) == step
    assert matching_step(SECRET, totp.at(now - 30), now) == step - 1
    assert matching_step(SECRET, totp.at(now + 30), now) == step + 1
    assert matching_step(SECRET, " ".join(totp.at(now)), now) == step  # spaces typed
    assert matching_step(SECRET, totp.at(now - 60), now) is None
    assert matching_step(SECRET, totp.at(now + 60), now) is None


@pytest.mark.parametrize("typed", ["", "12345", "1234567", "12345a", "١٢٣٤٥٦", "abcdef"])
def test_anything_but_six_ascii_digits_is_no_totp_code(typed):
    assert matching_step(SECRET, typed, 1_800_000_000.0) is None


def test_recovery_codes_are_ten_distinct_and_typed_forgivingly():
    codes = new_recovery_codes()
    assert len(codes) == len(set(codes)) == 10
    assert all(normal_recovery_code(c) == c for c in codes)
    assert normal_recovery_code(codes[0].upper().replace("-", " ")) == codes[0]
    assert normal_recovery_code("abcde-fghi") is None  # too short
    assert normal_recovery_code("abcde-fghi0") is None  # 0 is not in the alphabet


def test_the_qr_code_is_an_svg_data_uri_made_here():
    uri = qr_data_uri("otpauth://totp/x:alice?secret=" + SECRET)
    assert uri.startswith("data:image/svg+xml") and "http" not in uri.split(",", 1)[0]


# -- admins -------------------------------------------------------------------------------------


def test_an_admin_is_a_member_of_the_admin_group_by_name_or_dn():
    carol = replace(ALICE, groups=("Staff", "HelpDesk"))
    assert is_admin(carol, "helpdesk")
    assert is_admin(carol, "CN=helpdesk,OU=Groups,DC=example,DC=org")
    assert not is_admin(carol, "admins")
    assert not is_admin(carol, None)


# -- packaging ----------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_every_template_and_static_file_is_packaged_and_served():
    import fnmatch
    import tomllib

    from proxy.web.view import STATIC_FILES

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["proxy.web"]
    web = ROOT / "proxy" / "web"
    files = [p.relative_to(web).as_posix() for p in web.glob("templates/*")]
    files += [p.relative_to(web).as_posix() for p in web.glob("static/*")]
    assert files and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
    assert sorted(p.name for p in web.glob("static/*")) == sorted(STATIC_FILES)
