"""Integration fixtures: real servers, each started once per test session on first use."""

from tests.servers.fixtures import dovecot, postfix, test_ca  # noqa: F401
from tests.servers.samba import samba_dc  # noqa: F401
from tests.servers.slapd import slapd, slapd_factory  # noqa: F401
