"""Real upstream servers for the integration tests, started from generated configs.

Classes: Dovecot (tests/servers/dovecot.py), Postfix (tests/servers/postfix.py), TestCA and
the process/port helpers (tests/servers/common.py). Session fixtures: tests/servers/fixtures.py.
"""

from tests.servers.common import LOOPBACK, CertFiles, ServerError, TestCA, free_port
from tests.servers.dovecot import (
    DEFAULT_USERS,
    MASTER_PASSWORD,
    MASTER_SEPARATOR,
    MASTER_USER,
    Dovecot,
)
from tests.servers.postfix import DOMAIN, Postfix

__all__ = [
    "LOOPBACK", "CertFiles", "ServerError", "TestCA", "free_port",
    "DEFAULT_USERS", "MASTER_PASSWORD", "MASTER_SEPARATOR", "MASTER_USER", "Dovecot",
    "DOMAIN", "Postfix",
]
