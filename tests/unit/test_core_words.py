"""Every protocol words every situation the shared pre-auth core can say (proxy/core.py), and
answers every refusal: a missing entry would be a crash in the middle of a login."""

from __future__ import annotations

import pytest

from proxy.auth.decision import Refusal
from proxy.core import Say
from proxy.imap.server import ImapCore
from proxy.pop3.server import Pop3Core
from proxy.smtp.server import SmtpCore


@pytest.mark.parametrize("core", [ImapCore, Pop3Core, SmtpCore], ids=["imap", "pop3", "smtp"])
def test_every_situation_and_refusal_has_words(core):
    assert set(core.WORDS) == set(Say)
    assert set(core.REFUSALS) == set(Refusal)


@pytest.mark.parametrize("core", [ImapCore, Pop3Core, SmtpCore], ids=["imap", "pop3", "smtp"])
def test_a_draining_proxy_closes_an_idle_connection_but_not_a_login(core):
    idle = core(tls_active=True, starttls_available=False, plaintext_auth=False)
    assert idle.shutting_down()[-1].__class__.__name__ == "Close"
    assert idle.closed
