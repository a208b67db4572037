"""The web records (proxy/web/records.py) on SQLite: tests/support/records_contract.py."""

from __future__ import annotations

import pytest

from proxy.config import StoreSettings
from tests.support.records_contract import RecordsContract


class TestSqliteRecords(RecordsContract):
    @pytest.fixture
    def store_settings(self, tmp_path):
        return StoreSettings("sqlite", tmp_path / "codes.db")
