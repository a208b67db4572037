"""Real upstream servers for the integration tests, started from generated configs.

Classes: Dovecot (tests/servers/dovecot.py), Postfix (tests/servers/postfix.py), the
process/port helpers (tests/servers/common.py) and TestCA (tests/support/ca.py). Session
fixtures: tests/servers/fixtures.py.
"""

from tests.servers.common import LOOPBACK, ServerError, free_port
from tests.servers.dovecot import (
    DEFAULT_USERS,
    MASTER_PASSWORD,
    MASTER_SEPARATOR,
    MASTER_USER,
    Dovecot,
)
from tests.servers.postfix import DOMAIN, Postfix
from tests.support.ca import CertFiles, TestCA

__all__ = [
    "DEFAULT_USERS",
    "DOMAIN",
    "LOOPBACK",
    "MASTER_PASSWORD",
    "MASTER_SEPARATOR",
    "MASTER_USER",
    "CertFiles",
    "Dovecot",
    "Postfix",
    "ServerError",
    "TestCA",
    "free_port",
]
