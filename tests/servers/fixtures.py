"""Session-scoped pytest fixtures for the real upstream servers: test_ca, dovecot, postfix.

A conftest.py makes them available with

    from tests.servers.fixtures import dovecot, postfix, test_ca  # noqa: F401

Each server starts once per test session (on first use) and is stopped, and its folder
removed, at the end of the session, also when a test or the start itself failed. Set
APPPASS_KEEP_SERVERS=1 to keep the folders (configs and logs) for a look afterwards.
Tests share the servers: use a unique token (e.g. a uuid in the Subject) to find your mail,
a log mark (server.log_mark()) to read only your log lines, and restart a server you stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.servers.common import remove_tree, short_tempdir
from tests.servers.dovecot import Dovecot
from tests.servers.postfix import Postfix
from tests.support.ca import TestCA

# Seconds each session server took to start, for reports (filled as fixtures start).
STARTUP_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def test_ca() -> Iterator[TestCA]:
    """A throwaway CA; its ca.pem verifies cert.pem/key.pem for 127.0.0.1 and localhost."""
    began = time.monotonic()
    directory = short_tempdir("ca-")
    try:
        ca = TestCA.create(directory)
        STARTUP_SECONDS["test_ca"] = time.monotonic() - began
        yield ca
    finally:
        remove_tree(directory)


@pytest.fixture(scope="session")
def dovecot(test_ca: TestCA) -> Iterator[Dovecot]:
    """A running Dovecot with DEFAULT_USERS and the master user (see tests/servers/dovecot.py)."""
    server = Dovecot(test_ca)
    try:
        began = time.monotonic()
        server.start()
        STARTUP_SECONDS["dovecot"] = time.monotonic() - began
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postfix(dovecot: Dovecot, test_ca: TestCA) -> Iterator[Postfix]:
    """A running Postfix delivering example.test to the dovecot fixture over LMTP."""
    server = Postfix(dovecot, test_ca)
    try:
        began = time.monotonic()
        server.start()
        STARTUP_SECONDS["postfix"] = time.monotonic() - began
        yield server
    finally:
        server.cleanup()
