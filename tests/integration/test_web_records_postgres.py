"""The web records (proxy/web/records.py) on a real PostgreSQL: the same contract as on SQLite
(tests/support/records_contract.py), so the portal and the API work on several nodes."""

from __future__ import annotations

import pytest

from tests.support.records_contract import RecordsContract

pytestmark = pytest.mark.integration


class TestPostgresRecords(RecordsContract):
    @pytest.fixture
    def store_settings(self, pg_database):
        return pg_database.store_settings()
