"""Unit tests do no network I/O: while a test in tests/unit runs (its fixtures included), binding
or connecting an IP socket raises. A test that needs sockets belongs in tests/integration."""

from __future__ import annotations

import contextlib
import socket

import pytest


class NetworkUsed(RuntimeError):
    """A unit test tried to bind or connect an IP socket."""


def _guarded(name: str, original):
    def guarded(sock: socket.socket, *args, **kwargs):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            address = args[0] if args else ""
            raise NetworkUsed(
                f"socket.{name}({address!r}) in a unit test: tests that open sockets "
                "belong in tests/integration"
            )
        return original(sock, *args, **kwargs)

    return guarded


@contextlib.contextmanager
def _no_network():
    with pytest.MonkeyPatch.context() as patch:
        for name in ("bind", "connect", "connect_ex"):
            patch.setattr(socket.socket, name, _guarded(name, getattr(socket.socket, name)))
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _no_network():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _no_network():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    if nextitem is None:
        # The last test of the whole run: its teardown also ends the session-wide fixtures of
        # tests/integration and tests/browser (servers, the browser), which may use sockets.
        yield
        return
    with _no_network():
        yield
