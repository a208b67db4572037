"""Session-scoped pytest fixtures for the real upstream servers: test_ca, dovecot, postfix, and
for OAuth2 logins token_service, oauth_dovecot and oauth_postfix.

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
from tests.servers.tokenservice import TokenService
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


@pytest.fixture(scope="session")
def token_service(test_ca: TestCA) -> Iterator[TokenService]:
    """A running OAuth2 token service (tests/servers/tokenservice.py): https token endpoint,
    http introspection for Dovecot. Tests register their own clients and restore what they
    change (revocations, down, hold)."""
    server = TokenService(test_ca)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def oauth_dovecot(test_ca: TestCA, token_service: TokenService) -> Iterator[Dovecot]:
    """A second Dovecot that also takes XOAUTH2 and OAUTHBEARER, validating the tokens by
    introspection at token_service (the first keeps its plain configuration)."""
    server = Dovecot(test_ca, oauth2_introspection=token_service.introspection_url)
    try:
        began = time.monotonic()
        server.start()
        STARTUP_SECONDS["oauth_dovecot"] = time.monotonic() - began
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def oauth_postfix(oauth_dovecot: Dovecot, test_ca: TestCA) -> Iterator[Postfix]:
    """A Postfix whose submission authenticates through oauth_dovecot (so XOAUTH2 and
    OAUTHBEARER too) and delivers into it."""
    server = Postfix(oauth_dovecot, test_ca)
    try:
        began = time.monotonic()
        server.start()
        STARTUP_SECONDS["oauth_postfix"] = time.monotonic() - began
        yield server
    finally:
        server.cleanup()
