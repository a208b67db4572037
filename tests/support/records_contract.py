"""What the portal and the API keep in the store (proxy/web/records.py) behaves the same on every
store: tests/unit/test_web_records.py runs `RecordsContract` on SQLite, and
tests/integration/test_web_records_postgres.py on a real PostgreSQL. A subclass gives the fixture
`store_settings` (StoreSettings of a fresh, empty store)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from proxy.codes.open import open_store
from proxy.codes.store import utcnow
from proxy.web.records import WebRecords, digest


class RecordsContract:
    @pytest.fixture
    def records(self, store_settings):
        store = open_store(store_settings)
        yield WebRecords(store)
        store.close()

    def test_a_token_is_shown_once_kept_as_a_digest_and_recognised(self, records):
        token, value = records.create_token("offboarding", False, None, "cli:root")
        assert value.startswith("apt_") and value not in repr(token)
        found = records.authenticate_token(value, "192.0.2.7")
        assert found is not None and found.id == token.id and found.label == "offboarding"
        seen = records.token(token.id)
        assert seen is not None and seen.last_used_ip == "192.0.2.7"
        row = records.store.run("SELECT hash FROM api_tokens WHERE id = ?", (token.id,))
        assert row.fetchone()[0] == digest(value.split("_", 2)[2])

    def test_wrong_revoked_and_expired_tokens_are_refused(self, records):
        token, value = records.create_token("helpdesk", True, None, "cli:root")
        wrong = value[:-1] + ("x" if value[-1] != "x" else "y")
        assert records.authenticate_token(wrong, "192.0.2.7") is None
        assert records.authenticate_token("Bearer nonsense", "192.0.2.7") is None
        assert records.revoke_token(token.id) and not records.revoke_token(token.id)
        assert records.authenticate_token(value, "192.0.2.7") is None
        _, old = records.create_token("old", False, utcnow() - timedelta(seconds=1), "cli:root")
        assert records.authenticate_token(old, "192.0.2.7") is None
        assert [t.label for t in records.tokens()] == ["helpdesk", "old"]

    def test_a_portal_session_is_found_by_its_cookie_only(self, records):
        session, cookie = records.open_session("key-alice", "alice", False, "192.0.2.7", False)
        assert records.session(cookie) == session and records.session(cookie + "x") is None
        assert session.second_factor_at is None and not session.admin
        later = utcnow() + timedelta(minutes=5)
        records.touch_session(session, second_factor_at=later, client_ip="198.51.100.1")
        touched = records.session(cookie)
        assert touched is not None and touched.client_ip == "198.51.100.1"
        assert touched.second_factor_at == later.replace(microsecond=0)
        records.close_session(session)
        assert records.session(cookie) is None

    def test_totp_steps_are_used_once_and_recovery_codes_once(self, records):
        records.start_totp("key-alice", "JBSWY3DPEHPK3PXP")
        records.start_totp("key-alice", "KRSXG5CTMVRXEZLU")  # restarting an unfinished enrolment
        assert records.totp("key-alice").secret == "KRSXG5CTMVRXEZLU"
        assert records.finish_totp("key-alice", 100, [digest("r1"), digest("r2")])
        assert not records.finish_totp("key-alice", 100, [])
        records.start_totp("key-alice", "JBSWY3DPEHPK3PXP")  # an enrolled secret stays
        assert records.totp("key-alice").secret == "KRSXG5CTMVRXEZLU"
        assert records.use_step("key-alice", 101) and not records.use_step("key-alice", 101)
        assert not records.use_step("key-alice", 99)
        assert records.use_recovery("key-alice", "r1") and not records.use_recovery(
            "key-alice", "r1"
        )
        assert records.totp("key-alice").recovery == (digest("r2"),)
        records.reset_totp("key-alice")
        assert records.totp("key-alice") is None
