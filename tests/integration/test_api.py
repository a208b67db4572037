"""The admin API over real HTTP against a started proxy: every endpoint, every error class,
read-only, revoked and expired tokens, the rate limit, and a code made over the API logging in
through the proxy to the real Dovecot. Every response is held to the OpenAPI document the
server publishes (tests/support/apiclient.py checks each one before a test sees it)."""

from __future__ import annotations

import contextlib
import imaplib
import io
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from twisted.internet import threads

from proxy.cli import main as cli
from proxy.web.openapi import document
from proxy.web.records import WebRecords
from tests.integration.harness import start_proxy
from tests.servers.common import free_port
from tests.servers.dovecot import MASTER_PASSWORD, MASTER_USER
from tests.servers.slapd import Slapd
from tests.support.apiclient import Api, request
from tests.support.openapi import OpenApi

pytestmark = pytest.mark.integration

V1 = "/api/v1"
CODE = re.compile(r"^[A-Za-z2-9]{4}(-[A-Za-z2-9]{4}){3}$")


def web_listener() -> dict:
    return {"name": "api", "bind": f"127.0.0.1:{free_port()}", "tls": "none", "serve": ["api"]}


def imap_upstream(dovecot) -> dict:
    return {
        "imap": {
            "host": "127.0.0.1",
            "port": dovecot.imap_port,
            "tls": "none",
            "master_user": MASTER_USER,
            "master_password": MASTER_PASSWORD,
        }
    }


PLAIN_IMAP = {
    "name": "plain",
    "protocol": "imap",
    "tls": "none",
    "plaintext_auth_from": ["127.0.0.0/8"],
}


async def published(port: int) -> OpenApi:
    """The document as the server publishes it (the one every response is held to)."""
    response = await threads.deferToThread(request, port, "GET", f"{V1}/openapi.json")
    assert response.status == 200
    return OpenApi(response.json)


@pytest_twisted.async_yield_fixture(scope="module")
async def proxy(dovecot, tmp_path_factory):
    harness = await start_proxy(
        tmp_path_factory.mktemp("api"),
        listeners=[dict(PLAIN_IMAP)],
        upstream=imap_upstream(dovecot),
        web={"listeners": [web_listener()]},
    )
    records = WebRecords(harness.store)
    harness.tokens = {
        "helpdesk": records.create_token("helpdesk", False, None, "test")[1],
        "auditor": records.create_token("auditor", True, None, "test")[1],
    }
    yield harness
    await harness.stop()


@pytest_twisted.async_fixture
async def api(proxy):
    port = proxy.port("api")
    return Api(port, await published(port), token=proxy.tokens["helpdesk"])


async def create(api: Api, login: str = "alice", **fields) -> dict:
    response = await api.post(f"{V1}/accounts/{login}/codes", {"label": "test device", **fields})
    assert response.status == 201, response.error
    return response.json


def holds(text: str, secret: str) -> bool:
    """Whether a secret (a code, grouped or not, or a token) is in the text. Tests assert on
    this, never on `secret in text`, whose failure would print the secret."""
    return secret in text or secret.replace("-", "") in text


def imap_login(port: int, login: str, code: str) -> str:
    with imaplib.IMAP4("127.0.0.1", port) as imap:
        try:
            return imap.login(login, code)[0]
        except imaplib.IMAP4.error as exc:
            return f"refused: {exc}"


# -- the document ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_document_is_served_without_a_token_and_is_the_api_s_own(api):
    response = await api.get(f"{V1}/openapi.json", anonymous=True)
    assert response.status == 200
    assert response.json == document()
    assert response.json["openapi"] == "3.1.0"
    # The site's security headers reach the API too.
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


# -- accounts --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_account_shows_each_verdict_and_may_be_named_by_an_alias(api):
    response = await api.get(f"{V1}/accounts/alice%40example.test")
    assert response.status == 200
    account = response.json
    assert (account["login"], account["key"], account["allowed"]) == ("alice", "key-alice", True)
    assert [v["check"] for v in account["verdicts"]] == ["enabled", "legacy", "mfa", "identity"]
    assert all(v["ok"] and v["advice"] is None for v in account["verdicts"])


@pytest_twisted.ensureDeferred
async def test_an_account_outside_the_legacy_group_says_why_and_what_to_do(api):
    account = (await api.get(f"{V1}/accounts/bob")).json
    legacy = next(v for v in account["verdicts"] if v["check"] == "legacy")
    assert account["allowed"] is False and legacy["ok"] is False
    assert "legacy-mail" in legacy["advice"] and account["refusal"] == legacy["detail"]


@pytest_twisted.ensureDeferred
async def test_an_unknown_login_is_404_naming_the_login(api):
    response = await api.get(f"{V1}/accounts/nobody")
    assert (response.status, response.json["error"], response.json["field"]) == (
        404,
        "not_found",
        "login",
    )


# -- codes: create, use, list, change ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_code_created_over_the_api_logs_in_through_the_proxy_to_dovecot(api, proxy):
    response = await api.post(
        f"{V1}/accounts/alice/codes",
        {"label": "mail app", "scopes": ["imap"], "expires_in": "30d", "max_uses": 5},
    )
    assert response.status == 201
    assert response.headers["cache-control"] == "no-store"
    created = response.json
    code, record = created["code"], created["record"]
    shaped = CODE.match(code) is not None
    assert shaped, "the code is not four groups of four"
    assert response.headers["location"] == f"{V1}/codes/{record['id']}"
    assert (record["label"], record["scopes"], record["max_uses"], record["state"]) == (
        "mail app",
        ["imap"],
        5,
        "active",
    )
    assert record["created_by"] == "api:helpdesk"
    expires = datetime.fromisoformat(record["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)

    logged_in = await threads.deferToThread(imap_login, proxy.port("plain"), "alice", code)
    assert logged_in == "OK"

    seen = (await api.get(f"{V1}/codes/{record['id']}")).json
    assert (seen["use_count"], seen["last_used_protocol"], seen["last_used_ip"]) == (
        1,
        "imap",
        "127.0.0.1",
    )
    # Shown once: no later answer holds it, and nothing was written down with it.
    listed = await api.get(f"{V1}/accounts/alice/codes?all=true")
    shown_again = holds(listed.body.decode(), code)
    written_down = holds(proxy.audit_text(), code)
    assert not shown_again and not written_down


@pytest_twisted.ensureDeferred
async def test_a_sending_policy_and_a_custodian_are_made_and_shown(api):
    created = await create(
        api,
        "printer1",
        label="scanner",
        scopes=["smtp"],
        mail_from=["Scanner@example.test"],
        rcpt_domains=["example.test"],
        max_messages_per_day=10,
        custodian="print-team@example.test",
    )
    record = created["record"]
    assert (record["mail_from"], record["rcpt_domains"], record["max_messages_per_day"]) == (
        ["scanner@example.test"],
        ["example.test"],
        10,
    )
    seen = (await api.get(f"{V1}/codes/{record['id']}")).json
    assert (seen["sent_today"], seen["custodian"], seen["send_refused_count"]) == (
        0,
        "print-team@example.test",
        0,
    )
    own = (await create(api, "printer1", label="fax", scopes=["smtp"], rcpt_domains=["x.test"]))[
        "record"
    ]
    assert own["mail_from"] == ["own"]  # a policy without senders sends as the account
    for made in (record, own):
        assert (await api.post(f"{V1}/codes/{made['id']}/revoke")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_codes_custodian_is_changed_or_removed(api):
    record = (await create(api, "printer1", label="scanner"))["record"]
    path = f"{V1}/codes/{record['id']}/custodian"
    changed = await api.post(path, {"custodian": "Facilities@example.test"})
    assert (changed.status, changed.json["custodian"]) == (200, "facilities@example.test")
    removed = await api.post(path, {"custodian": None})
    assert (removed.status, removed.json["custodian"]) == (200, None)
    nothing = await api.post(path, {})
    assert (nothing.status, nothing.json["field"]) == (400, "custodian")
    bad = await api.post(path, {"custodian": "facilities"})
    assert (bad.status, bad.json["field"]) == (400, "custodian")
    assert (await api.post(f"{V1}/codes/{record['id']}/revoke")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_codes_sending_policy_is_replaced_or_lifted(api):
    record = (await create(api, "printer1", label="scanner", scopes=["smtp"]))["record"]
    path = f"{V1}/codes/{record['id']}/sending"
    changed = await api.post(
        path, {"mail_from": ["Scanner@example.test"], "max_messages_per_day": 20}
    )
    assert changed.status == 200
    assert (
        changed.json["mail_from"],
        changed.json["rcpt_domains"],
        changed.json["max_messages_per_day"],
        changed.json["sent_today"],
    ) == (["scanner@example.test"], [], 20, 0)
    lifted = await api.post(path, {"mail_from": [], "max_messages_per_day": None})
    assert (lifted.json["mail_from"], lifted.json["max_messages_per_day"]) == ([], None)
    nothing = await api.post(path, {})
    assert (nothing.status, nothing.error, nothing.json["field"]) == (400, "invalid", "mail_from")
    bad = await api.post(path, {"rcpt_domains": ["not a domain"]})
    assert (bad.status, bad.json["field"]) == (400, "rcpt_domains")
    imap = (await create(api, "printer1", label="tablet", scopes=["imap"]))["record"]
    wrong = await api.post(f"{V1}/codes/{imap['id']}/sending", {"max_messages_per_day": 5})
    assert (wrong.status, wrong.json["field"]) == (400, "scopes")
    for made in (record, imap):
        assert (await api.post(f"{V1}/codes/{made['id']}/revoke")).status == 200
    gone = await api.post(path, {"max_messages_per_day": 5})
    assert (gone.status, gone.error) == (409, "conflict")


@pytest_twisted.ensureDeferred
async def test_a_device_retrying_a_revoked_code_shows_as_still_retrying(api, proxy):
    created = await create(api, scopes=["imap"], label="old phone")
    code_id, code = created["record"]["id"], created["code"]
    assert created["record"]["stale"] == {
        "count": 0,
        "since": None,
        "last_at": None,
        "last_ip": None,
        "still_retrying": None,
    }
    assert (await api.post(f"{V1}/codes/{code_id}/revoke")).status == 200
    for _ in range(2):
        refused = await threads.deferToThread(imap_login, proxy.port("plain"), "alice", code)
        assert refused.startswith("refused") and "EXPIRED" in refused
    stale = (await api.get(f"{V1}/codes/{code_id}")).json["stale"]
    assert (stale["count"], stale["last_ip"]) == (2, "127.0.0.1")
    assert re.fullmatch(
        r"still retrying: 2 attempts since \d{4}-\d\d-\d\d from 127\.0\.0\.1",
        stale["still_retrying"],
    )


@pytest_twisted.ensureDeferred
async def test_expiry_as_a_date_a_date_time_or_never(api):
    day = (await create(api, expires_at="2099-06-30"))["record"]
    assert day["expires_at"] == "2099-06-30T23:59:59+00:00"
    moment = (await create(api, expires_at="2099-01-02T03:04:05Z"))["record"]
    assert moment["expires_at"] == "2099-01-02T03:04:05+00:00"
    never = (await create(api, expires_at=None))["record"]
    assert never["expires_at"] is None
    for made in (day, moment, never):
        assert (await api.post(f"{V1}/codes/{made['id']}/revoke")).status == 200


@pytest_twisted.ensureDeferred
async def test_the_list_leaves_out_revoked_codes_unless_all_is_true(api):
    kept = (await create(api, "printer1", label="kept"))["record"]
    gone = (await create(api, "printer1", label="gone"))["record"]
    assert (await api.post(f"{V1}/codes/{gone['id']}/revoke")).status == 200

    active = (await api.get(f"{V1}/accounts/printer1/codes")).json["codes"]
    every = (await api.get(f"{V1}/accounts/printer1/codes?all=true")).json["codes"]
    assert kept["id"] in [c["id"] for c in active] and gone["id"] not in [c["id"] for c in active]
    assert {kept["id"], gone["id"]} <= {c["id"] for c in every}
    assert next(c for c in every if c["id"] == gone["id"])["state"] == "revoked"
    explicit = (await api.get(f"{V1}/accounts/printer1/codes?all=false")).json["codes"]
    assert explicit == active


@pytest_twisted.ensureDeferred
async def test_disable_enable_and_revoke_and_what_cannot_follow_a_revoke(api, proxy):
    created = await create(api, scopes=["imap"])
    code_id, code = created["record"]["id"], created["code"]
    port = proxy.port("plain")

    disabled = await api.post(f"{V1}/codes/{code_id}/disable")
    assert (disabled.status, disabled.json["state"], disabled.json["disabled"]) == (
        200,
        "disabled",
        True,
    )
    while_disabled = await threads.deferToThread(imap_login, port, "alice", code)
    assert while_disabled.startswith("refused")
    enabled = await api.post(f"{V1}/codes/{code_id}/enable", {})
    assert (enabled.status, enabled.json["state"]) == (200, "active")
    while_enabled = await threads.deferToThread(imap_login, port, "alice", code)
    assert while_enabled == "OK"

    revoked = await api.post(f"{V1}/codes/{code_id}/revoke")
    assert (revoked.status, revoked.json["state"]) == (200, "revoked")
    assert revoked.json["revoked_at"] is not None
    while_revoked = await threads.deferToThread(imap_login, port, "alice", code)
    assert while_revoked.startswith("refused")
    for action in ("revoke", "enable", "disable"):
        again = await api.post(f"{V1}/codes/{code_id}/{action}")
        assert (again.status, again.error) == (409, "conflict"), action


@pytest_twisted.ensureDeferred
async def test_revoke_all_ends_every_code_of_the_account(api):
    for label in ("scanner", "fax"):
        await create(api, "demo", label=label)
    response = await api.post(f"{V1}/accounts/demo/revoke-all")
    assert response.status == 200
    assert response.json["login"] == "demo" and response.json["revoked"] >= 2
    assert (await api.get(f"{V1}/accounts/demo/codes")).json["codes"] == []
    again = await api.post(f"{V1}/accounts/demo/revoke-all")
    assert again.json["revoked"] == 0


@pytest_twisted.ensureDeferred
async def test_an_account_that_may_not_have_codes_is_403_with_the_cli_s_reason(api):
    response = await api.post(f"{V1}/accounts/bob/codes", {"label": "phone"})
    assert (response.status, response.error) == (403, "forbidden")
    assert "legacy sign-in" in response.json["message"]


@pytest_twisted.ensureDeferred
async def test_past_the_cap_is_409_cap_reached(api, proxy):
    # The account's share of codes.max_per_account (25) made directly, the last one asked for.
    cap = proxy.settings.codes.max_per_account
    have = len((await api.get(f"{V1}/accounts/ghost/codes")).json["codes"])
    for _ in range(cap - have):
        await threads.deferToThread(proxy.issue, "ghost")
    response = await api.post(f"{V1}/accounts/ghost/codes", {"label": "one too many"})
    assert (response.status, response.error) == (409, "cap_reached")
    assert str(cap) in response.json["message"]


@pytest_twisted.ensureDeferred
async def test_someone_else_s_or_no_code_id_is_404(api):
    for path in (
        f"{V1}/codes/999999",
        f"{V1}/codes/abc",
        f"{V1}/codes/0",
        f"{V1}/codes/{'9' * 30}",
    ):
        response = await api.get(path)
        assert (response.status, response.error) == (404, "not_found"), path
    assert (await api.post(f"{V1}/codes/999999/revoke")).status == 404


# -- bad input ---------------------------------------------------------------------------------

BAD_BODIES = [
    ({"scopes": ["imap"]}, "label"),
    ({"label": 5}, "label"),
    ({"label": ""}, "label"),
    ({"label": "a\nb"}, "label"),
    ({"label": "x" * 101}, "label"),
    ({"label": "x", "scopes": "imap"}, "scopes"),
    ({"label": "x", "scopes": ["imap", "ftp"]}, "scopes"),
    ({"label": "x", "scopes": []}, "scopes"),
    ({"label": "x", "max_uses": "5"}, "max_uses"),
    ({"label": "x", "max_uses": True}, "max_uses"),
    ({"label": "x", "max_uses": 0}, "max_uses"),
    ({"label": "x", "networks": ["10.0.0.0/33"]}, "networks"),
    ({"label": "x", "networks": [10]}, "networks"),
    ({"label": "x", "expires_at": "2001-01-01"}, "expires_at"),
    ({"label": "x", "expires_at": "90d"}, "expires_at"),
    ({"label": "x", "expires_at": "2027-13-45"}, "expires_at"),
    ({"label": "x", "expires_in": "soon"}, "expires_in"),
    ({"label": "x", "expires_in": 90}, "expires_in"),
    ({"label": "x", "expires_in": "90d", "expires_at": "2099-01-01"}, "expires_in"),
    ({"label": "x", "code": "Xk7m-9QpR-t4Vw-Hn2c"}, "code"),
    ({"label": "x", "mail_from": "scanner@example.test"}, "mail_from"),
    ({"label": "x", "mail_from": ["scanner"]}, "mail_from"),
    ({"label": "x", "rcpt_domains": ["example..test"]}, "rcpt_domains"),
    ({"label": "x", "max_messages_per_day": 0}, "max_messages_per_day"),
    ({"label": "x", "max_messages_per_day": "10"}, "max_messages_per_day"),
    ({"label": "x", "custodian": "team"}, "custodian"),
    ({"label": "x", "custodian": ["team@example.test"]}, "custodian"),
    ({"label": "x", "scopes": ["imap"], "rcpt_domains": ["example.test"]}, "scopes"),
]


@pytest_twisted.ensureDeferred
async def test_bad_fields_are_400_naming_the_field(api):
    before = len((await api.get(f"{V1}/accounts/alice/codes")).json["codes"])
    for body, field in BAD_BODIES:
        response = await api.post(f"{V1}/accounts/alice/codes", body)
        assert (response.status, response.error, response.json.get("field")) == (
            400,
            "invalid",
            field,
        ), body
    assert len((await api.get(f"{V1}/accounts/alice/codes")).json["codes"]) == before


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_a_json_object_is_400(api):
    path = f"{V1}/accounts/alice/codes"
    for raw in (b"{", b"[1]", b'"label"', b'{"label": "a", "label": "b"}', b"[" * 40000):
        response = await api.post(path, body=raw, headers={"Content-Type": "application/json"})
        assert (response.status, response.error) == (400, "invalid"), raw[:20]
        assert "field" not in response.json
    bad_utf8 = await api.post(
        path, body=b'{"label": "\xff"}', headers={"Content-Type": "application/json"}
    )
    assert (bad_utf8.status, bad_utf8.error) == (400, "invalid")
    fields = await api.post(f"{V1}/codes/1/disable", {"really": True})
    assert (fields.status, fields.json["field"]) == (400, "really")


@pytest_twisted.ensureDeferred
async def test_a_bad_query_is_400_naming_the_parameter(api):
    for query, field in (("all=yes", "all"), ("all=true&all=false", "all"), ("limit=5", "limit")):
        response = await api.get(f"{V1}/accounts/alice/codes?{query}")
        assert (response.status, response.json["field"]) == (400, field), query
    # A token sent in the URL by mistake is refused, not used, and not written down.
    token = api.token
    response = await api.get(f"{V1}/accounts/alice?access_token={token}", anonymous=True)
    assert response.status == 401


@pytest_twisted.ensureDeferred
async def test_a_login_with_control_characters_is_400(api):
    response = await api.get(f"{V1}/accounts/ali%0Ace")
    assert (response.status, response.json["field"]) == (400, "login")


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_json_is_415(api):
    response = await api.post(
        f"{V1}/accounts/alice/codes",
        body=b"label=phone",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert (response.status, response.error) == (415, "unsupported_media_type")


@pytest_twisted.ensureDeferred
async def test_a_body_past_64_kib_is_413_whether_its_length_is_said_or_chunked(api):
    big = json.dumps({"label": "x" * (64 * 1024)}).encode()
    headers = {"Content-Type": "application/json"}
    said = await api.post(f"{V1}/accounts/alice/codes", body=big, headers=headers)
    assert (said.status, said.error) == (413, "too_large")
    pieces = [big[i : i + 4096] for i in range(0, len(big), 4096)]
    chunked = await api.post(
        f"{V1}/accounts/alice/codes", body=iter(pieces), headers=headers, chunked=True
    )
    assert (chunked.status, chunked.error) == (413, "too_large")


# -- paths and methods -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_paths_are_json_404_and_wrong_methods_json_405(api):
    for path in ("/api", "/api/", f"{V1}", f"{V1}/nothing", "/api/v2/codes/1", f"{V1}/codes/"):
        response = await api.get(path)
        assert (response.status, response.error) == (404, "not_found"), path
        assert response.headers["content-type"] == "application/json"
    cases = [
        ("DELETE", f"{V1}/codes/1", "GET"),
        ("GET", f"{V1}/codes/1/revoke", "POST"),
        ("PUT", f"{V1}/accounts/alice/codes", "GET, POST"),
        ("POST", f"{V1}/openapi.json", "GET"),
        ("PATCH", f"{V1}/accounts/alice", "GET"),
    ]
    for method, path, allow in cases:
        response = await api.call(method, path)
        assert (response.status, response.error) == (405, "method_not_allowed"), path
        assert response.headers["allow"] == allow


# -- tokens ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_token_or_a_bad_one_is_401_with_a_bearer_challenge(api, proxy):
    records = WebRecords(proxy.store)
    revoked_token, revoked = records.create_token("old script", False, None, "test")
    records.revoke_token(revoked_token.id)
    past = datetime.now(UTC) - timedelta(minutes=1)
    expired = records.create_token("contractor", False, past, "test")[1]
    path = f"{V1}/accounts/alice"

    missing = await api.get(path, anonymous=True)
    assert (missing.status, missing.error) == (401, "unauthorized")
    assert missing.headers["www-authenticate"] == 'Bearer realm="apppass"'
    basic = await api.get(path, headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"})
    assert basic.status == 401

    wrong = api.token[:-1] + ("x" if api.token[-1] != "x" else "y")
    for value in (revoked, expired, "apt_nothing_here", wrong, "x" * 4000):
        response = await api.get(path, token=value)
        assert (response.status, response.error) == (401, "unauthorized")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert (await api.get(path)).status == 200


@pytest_twisted.ensureDeferred
async def test_a_read_only_token_reads_and_changes_nothing(api, proxy):
    created = await create(api, "printer1", label="read-only test")
    code_id = created["record"]["id"]
    reader = proxy.tokens["auditor"]
    assert (await api.get(f"{V1}/accounts/printer1", token=reader)).status == 200
    assert (await api.get(f"{V1}/accounts/printer1/codes", token=reader)).status == 200
    assert (await api.get(f"{V1}/codes/{code_id}", token=reader)).status == 200
    writes = [
        (f"{V1}/accounts/printer1/codes", {"label": "sneaky"}),
        (f"{V1}/codes/{code_id}/disable", None),
        (f"{V1}/codes/{code_id}/revoke", None),
        (f"{V1}/codes/{code_id}/sending", {"max_messages_per_day": 1}),
        (f"{V1}/accounts/printer1/revoke-all", None),
    ]
    for path, body in writes:
        response = await api.post(path, body, token=reader)
        assert (response.status, response.error) == (403, "forbidden"), path
        assert "read-only" in response.json["message"]
    assert (await api.get(f"{V1}/codes/{code_id}")).json["state"] == "active"


@pytest_twisted.ensureDeferred
async def test_a_token_made_with_the_cli_works_until_the_cli_revokes_it(api, proxy):
    config = str(proxy.folder / "apppass.yaml")

    def run(*args: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = cli(["-c", config, "tokens", *args])
        return status, out.getvalue()

    status, printed = await threads.deferToThread(run, "create", "--label", "offboarding")
    assert status == 0
    token = re.search(r"^    (apt_\S+)$", printed, re.M).group(1)
    token_id = int(re.search(r"API token (\d+)", printed).group(1))
    assert (await api.get(f"{V1}/accounts/alice", token=token)).status == 200
    assert (await threads.deferToThread(run, "revoke", str(token_id)))[0] == 0
    assert (await api.get(f"{V1}/accounts/alice", token=token)).status == 401
    listed = json.loads((await threads.deferToThread(run, "list", "--json"))[1])
    mine = next(t for t in listed if t["id"] == token_id)
    assert (mine["state"], mine["last_used_ip"]) == ("revoked", "127.0.0.1")
    listed_value = holds(json.dumps(listed), token)
    assert not listed_value, "tokens list shows a token's value"


# -- the audit -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_every_call_is_audited_by_path_template_and_token_label_never_a_secret(api, proxy):
    before = len(proxy.audit_events("api"))
    created = await create(api, label="audited")
    code_id = created["record"]["id"]
    await api.get(f"{V1}/codes/{code_id}")
    await api.get(f"{V1}/accounts/alice", token="apt_wrong_token")
    await api.get(f"{V1}/no/such/path")
    events = proxy.audit_events("api")[before:]
    summary = [
        (e["method"], e["path"], e["status"], e.get("token"), e.get("error")) for e in events
    ]
    assert summary == [
        ("POST", f"{V1}/accounts/{{login}}/codes", 201, "helpdesk", None),
        ("GET", f"{V1}/codes/{{id}}", 200, "helpdesk", None),
        ("GET", f"{V1}/accounts/{{login}}", 401, None, "unauthorized"),
        ("GET", "-", 404, None, "not_found"),
    ]
    assert all(e["client"] == "127.0.0.1" for e in events)
    made = [e for e in proxy.audit_events("manage") if e.get("code") == code_id]
    assert [(e["action"], e["actor"], e["by"]) for e in made] == [("create", "api", "helpdesk")]
    text = proxy.audit_text()
    leaked = [holds(text, secret) for secret in (created["code"], *proxy.tokens.values())]
    assert leaked == [False, False, False]


# -- limits and trouble ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_address_that_keeps_sending_bad_tokens_gets_429_with_retry_after(
    dovecot, tmp_path
):
    harness = await start_proxy(
        tmp_path / "limited",
        listeners=[dict(PLAIN_IMAP)],
        upstream=imap_upstream(dovecot),
        auth={"ip_failures_per_minute": 3},
        web={"listeners": [web_listener()]},
    )
    try:
        good = WebRecords(harness.store).create_token("script", False, None, "test")[1]
        port = harness.port("api")
        api = Api(port, await published(port), token=good)
        assert (await api.get(f"{V1}/accounts/alice")).status == 200
        for _ in range(3):
            assert (await api.get(f"{V1}/accounts/alice", token="apt_guess_guess")).status == 401
        for token in ("apt_guess_again", good):
            response = await api.get(f"{V1}/accounts/alice", token=token)
            assert (response.status, response.error) == (429, "limited")
            assert response.headers["retry-after"] == "60"
        # The document stays readable: it needs no token, so it is not what is limited.
        assert (await api.get(f"{V1}/openapi.json", anonymous=True)).status == 200
        failures = [e for e in harness.audit_events("api") if e["status"] in (401, 429)]
        assert [e["status"] for e in failures] == [401, 401, 401, 429, 429]
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_store_that_stays_locked_is_503_and_not_a_bad_token(api, proxy):
    # Another process holds the database's write lock past the store's busy timeout (5 s):
    # checking the token cannot record its use, so the call fails closed, as temporary.
    lock = sqlite3.connect(proxy.folder / "codes.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        response = await api.get(f"{V1}/accounts/alice")
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert (response.status, response.error) == (503, "unavailable")
    assert (await api.get(f"{V1}/accounts/alice")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_directory_that_cannot_answer_is_503(dovecot, tmp_path):
    server = Slapd(None)
    await threads.deferToThread(server.start)
    (tmp_path / "ldap").mkdir()
    (tmp_path / "ldap" / "bind-password").write_text(server.service_password + "\n")
    harness = await start_proxy(
        tmp_path / "ldap",
        directory={
            "ldap": {
                "preset": "openldap",
                "uris": [server.uri],
                "bind_dn": server.service_dn,
                "bind_password_file": "bind-password",
                "base_dn": server.base_dn,
                "cache_ttl": "0s",
                "negative_cache_ttl": "0s",
                "timeout": "2s",
                "connect_timeout": "2s",
            }
        },
        listeners=[dict(PLAIN_IMAP)],
        upstream=imap_upstream(dovecot),
        web={"listeners": [web_listener()]},
    )
    try:
        token = WebRecords(harness.store).create_token("script", True, None, "test")[1]
        port = harness.port("api")
        api = Api(port, await published(port), token=token)
        assert (await api.get(f"{V1}/accounts/alice")).status == 200
        await threads.deferToThread(server.stop)
        response = await api.get(f"{V1}/accounts/alice")
        assert (response.status, response.error) == (503, "unavailable")
        assert "directory" in response.json["message"]
    finally:
        await harness.stop()
        await threads.deferToThread(server.cleanup)
