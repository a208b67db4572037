"""Integration fixtures: real servers, started once per test session."""

from tests.servers.fixtures import dovecot, postfix, test_ca  # noqa: F401
