"""Integration fixtures: real servers, each started once per test session on first use.

Every test here carries the `integration` marker (`pytestmark = pytest.mark.integration` in its
module), so `-m "not integration"` leaves them all out: collection fails, naming the tests,
when one lacks it.
"""

from pathlib import Path

import pytest

from tests.servers.fixtures import (  # noqa: F401
    dovecot,
    oauth_dovecot,
    oauth_postfix,
    postfix,
    test_ca,
    token_service,
)
from tests.servers.postgres import pg_database, postgres  # noqa: F401
from tests.servers.samba import samba_dc  # noqa: F401
from tests.servers.slapd import slapd, slapd_factory  # noqa: F401

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    unmarked = [
        item.nodeid
        for item in items
        if item.path.is_relative_to(HERE) and item.get_closest_marker("integration") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests in tests/integration without the integration marker "
            "(add `pytestmark = pytest.mark.integration` to the module):\n  "
            + "\n  ".join(unmarked)
        )
