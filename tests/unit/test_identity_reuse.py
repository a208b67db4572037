"""A reused login never inherits app passwords: John `jsmith` leaves and a new `jsmith`, Jane,
arrives with another id. John's codes are refused for her, listed as orphaned and revocable by
their old key. (The same for LDAP entries deleted and recreated: tests/integration/
test_account_identity.py.)"""

import io

import pytest
import pytest_twisted
from twisted.internet import reactor

from proxy.audit import Audit
from proxy.auth.authenticator import Authenticator
from proxy.auth.decision import Attempt, Refusal
from proxy.cli import main
from proxy.codes.hashing import CodeHasher
from proxy.codes.issue import issue_code
from proxy.codes.sqlite import SqliteCodeStore
from proxy.codes.store import AsyncCodeStore
from proxy.config import load
from proxy.directory.static import StaticDirectory
from proxy.protocols import MailProtocol

JOHN = "0c5d2f4e-7a61-4b0e-9d3c-1f2a3b4c5d6e"
JANE = "8e7f6a5b-4c3d-4e2f-8a1b-0c9d8e7f6a5b"
CONFIG = (
    "store: {sqlite: codes.db}\n"
    "directory: {static: users.yaml}\n"
    "policy: {legacy_group: legacy-mail}\n"
    "codes: {argon2: {memory_kib: 8192, time_cost: 1}}\n"
)


def users(key: str, name: str) -> str:
    return f"accounts:\n  jsmith: {{id: {key}, name: {name}, groups: [legacy-mail]}}\n"


def cli(config, capsys, *args):
    code = main(["-c", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def proxy(tmp_path):
    (tmp_path / "users.yaml").write_text(users(JOHN, "John Smith"))
    (tmp_path / "apppass.yaml").write_text(CONFIG)
    settings = load(tmp_path / "apppass.yaml")
    directory = StaticDirectory(settings.directory.static_file, legacy_group="legacy-mail")
    sync_store = SqliteCodeStore(settings.store.target)
    hasher = CodeHasher(settings.codes.argon2)
    hasher.start(reactor)
    store = AsyncCodeStore(sync_store, reactor)
    auth = Authenticator(settings, directory, store, hasher, Audit(io.StringIO()), reactor)
    yield tmp_path, settings, directory, sync_store, hasher, auth
    auth.stop()
    hasher.stop()
    store.stop()


@pytest_twisted.inlineCallbacks
def test_a_reused_login_does_not_inherit_the_previous_owners_codes(proxy, capsys):
    folder, settings, directory, sync_store, hasher, auth = proxy
    johns = issue_code(settings, directory, sync_store, hasher, login="jsmith", label="phone")

    def attempt():
        return auth.authenticate(
            Attempt(MailProtocol.IMAP, "jsmith", johns.code.value, "192.0.2.10", session="s1")
        )

    assert (yield attempt()).ok  # John's code works for John

    # John leaves (his entry is deleted); later Jane joins with the same login and a new id.
    (folder / "users.yaml").write_text(users(JANE, "Jane Smith"))
    directory.reload()
    decision = yield attempt()
    assert (decision.ok, decision.refusal) == (False, Refusal.CREDENTIALS)
    assert decision.reason == "no app password with this selector"
    assert decision.account.key == JANE

    config = folder / "apppass.yaml"
    code, out, _ = cli(config, capsys, "codes", "list")
    assert code == 0
    assert out.splitlines()[1].rstrip().endswith("active, orphaned: account gone")
    assert f"revoke with: apppass codes revoke-all --key {JOHN}" in out
    code, out, _ = cli(config, capsys, "codes", "revoke-all", "--key", JOHN)
    assert (code, out) == (0, f"revoked 1 code of account key '{JOHN}'\n")
    assert sync_store.get(johns.record.id).revoked_at is not None
    code, out, _ = cli(config, capsys, "codes", "revoke-all", "jsmith")  # Jane: none of John's
    assert (code, out) == (0, "revoked 0 codes of jsmith\n")
