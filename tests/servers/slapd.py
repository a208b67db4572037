"""A private OpenLDAP slapd for integration tests: mdb database with the ppolicy overlay, seeded
offline with slapadd, on loopback high ports (ldap:// with StartTLS, and ldaps://).

One instance runs from a config generated in a short folder under /tmp (see NOTES.md):

    slapd.conf   generated config     data.ldif   the seed        db/   the mdb database
    output.log   slapd's stderr (-d stats: one line per operation)

The seed (SEED_USERS, SEED_GROUPS) has fixed entryUUIDs, so two instances seeded alike are
replicas of each other for failover tests. ppolicy locks an account after LOCKOUT_FAILURES
failed binds, for LOCKOUT_DURATION seconds, and keeps pwdChangedTime.

Fixtures (import them into the test module): `slapd` (one per session, read-only use),
`slapd_factory` (fresh instances for tests that change, stop or pause a server).
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ldap3
import pytest

from tests.servers.common import (
    LOOPBACK,
    ServerError,
    ServerProcess,
    ensure_installed,
    free_port,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_for_port,
    wait_until,
)
from tests.support.ca import TestCA

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPSEARCH = "/usr/bin/ldapsearch"
# No system database, no questions (NOTES.md).

MODULE_PATH = "/usr/lib/ldap"
SCHEMA_DIR = "/etc/ldap/schema"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")

SUFFIX = "dc=example,dc=org"
MAIL_DOMAIN = "example.org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin-Secret-1"
SERVICE_DN = f"cn=apppass,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-Secret-2"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
POLICY_DN = f"cn=default,ou=policies,{SUFFIX}"

# ppolicy: lock after this many failed binds, for this many seconds.
LOCKOUT_FAILURES = 3
LOCKOUT_DURATION = 600

# An old password change, so a test that changes a password sees the time move forward.
OLD_CHANGE = "20200101000000Z"


@dataclass(frozen=True)
class SeedUser:
    uid: str
    password: str
    mail: str | None = None
    cn: str = ""
    extra: tuple[str, ...] = ()  # further LDIF lines
    posix: bool = False  # shadowAccount too (for shadowExpire)

    @property
    def dn(self) -> str:
        return f"uid={self.uid},{PEOPLE}"


SEED_USERS: tuple[SeedUser, ...] = (
    SeedUser(
        "alice",
        "alice-Pw-1",
        "alice@example.org",
        "Alice Liddell",
        (f"pwdChangedTime: {OLD_CHANGE}",),
    ),
    # bob's mail differs from his uid: bob@example.org only works as an implicit UPN.
    SeedUser("bob", "bob-Pw-2", "robert@example.org", "Bob Builder"),
    SeedUser("printer1", "printer1-Pw-3", "printer1@example.org", "Printer on floor 1"),
    # Locked by an administrator (ppolicy's "000001010000Z"): disabled.
    SeedUser(
        "carol",
        "carol-Pw-4",
        "carol@example.org",
        "Carol Disabled",
        ("pwdAccountLockedTime: 000001010000Z",),
    ),
    SeedUser(
        "dave", "dave-Pw-5", "dave@example.org", "Dave Expired", ("pwdEndTime: 20200101000000Z",)
    ),
    SeedUser(
        "erin",
        "erin-Pw-6",
        "erin@example.org",
        "Erin Shadow Expired",
        ("shadowExpire: 1",),
        posix=True,
    ),
    SeedUser("frank", "frank-Pw-7", "frank@example.org", "Frank Locked Out"),
    SeedUser(
        "grace",
        "grace-Pw-8",
        "grace@example.org",
        "Grace Changes Password",
        (f"pwdChangedTime: {OLD_CHANGE}",),
    ),
    # Disabled by a site convention, for disabled_filter.
    SeedUser("heidi", "heidi-Pw-9", "heidi@example.org", "Heidi Left", ("employeeType: disabled",)),
    SeedUser("nomail", "nomail-Pw-10", None, "No Mail Attribute"),
)


@dataclass(frozen=True)
class SeedGroup:
    cn: str
    members: tuple[str, ...]  # uids
    posix: bool = False  # posixGroup with memberUid instead of groupOfNames

    @property
    def dn(self) -> str:
        return f"cn={self.cn},{GROUPS}"


SEED_GROUPS: tuple[SeedGroup, ...] = (
    SeedGroup("legacy-mail", ("alice", "printer1", "carol", "frank", "grace")),
    SeedGroup("mfa-enrolled", ("alice",)),
    SeedGroup("staff", ("bob", "alice"), posix=True),
)


def entry_uuid(dn: str) -> str:
    """The fixed entryUUID of a seeded entry (the same in every instance)."""
    return str(uuid.uuid5(uuid.NAMESPACE_X500, dn.lower()))


def seed_ldif(
    users: Sequence[SeedUser] = SEED_USERS, groups: Sequence[SeedGroup] = SEED_GROUPS
) -> str:
    blocks = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services",
        f"dn: {SERVICE_DN}\nobjectClass: applicationProcess\nobjectClass: simpleSecurityObject\n"
        f"cn: apppass\nuserPassword: {SERVICE_PASSWORD}",
        f"dn: ou=policies,{SUFFIX}\nobjectClass: organizationalUnit\nou: policies",
        f"dn: {POLICY_DN}\nobjectClass: device\nobjectClass: pwdPolicy\ncn: default\n"
        f"pwdAttribute: userPassword\npwdLockout: TRUE\npwdMaxFailure: {LOCKOUT_FAILURES}\n"
        f"pwdLockoutDuration: {LOCKOUT_DURATION}\npwdFailureCountInterval: 0",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS}\nobjectClass: organizationalUnit\nou: groups",
    ]
    for user in users:
        lines = [f"dn: {user.dn}", "objectClass: inetOrgPerson"]
        if user.posix:
            lines.append("objectClass: shadowAccount")
        lines += [
            f"uid: {user.uid}",
            f"cn: {user.cn or user.uid}",
            f"sn: {user.uid}",
            f"userPassword: {user.password}",
            f"entryUUID: {entry_uuid(user.dn)}",
        ]
        if user.mail:
            lines.append(f"mail: {user.mail}")
        lines += user.extra
        blocks.append("\n".join(lines))
    for n, group in enumerate(groups):
        members = [u for u in users if u.uid in group.members]
        if group.posix:
            lines = [
                f"dn: {group.dn}",
                "objectClass: posixGroup",
                f"cn: {group.cn}",
                f"gidNumber: {10000 + n}",
            ]
            lines += [f"memberUid: {u.uid}" for u in members]
        else:
            lines = [f"dn: {group.dn}", "objectClass: groupOfNames", f"cn: {group.cn}"]
            lines += [f"member: {u.dn}" for u in members] or [f"member: {SUFFIX}"]
        lines.append(f"entryUUID: {entry_uuid(group.dn)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# --- packages -------------------------------------------------------------------------------


def ensure_slapd() -> None:
    ensure_installed((SLAPD, SLAPADD, LDAPSEARCH))


# --- the server -----------------------------------------------------------------------------


class Slapd:
    """A private slapd; its ports are chosen at construction and kept across restarts."""

    def __init__(
        self,
        tls: TestCA | None = None,
        root: Path | None = None,
        ldif: str | None = None,
        name: str = "slapd",
    ) -> None:
        self.tls = tls
        self.name = name
        self.root = root or short_tempdir("ld-")
        self.host = LOOPBACK
        self.port = free_port()
        self.ldaps_port = free_port() if tls is not None else None
        self.ldif = ldif if ldif is not None else seed_ldif()
        self.config_path = self.root / "slapd.conf"
        self.ldif_path = self.root / "data.ldif"
        self.db_dir = self.root / "db"
        self.process = ServerProcess(name, self._argv(), output=self.root / "output.log")
        self._seeded = False
        self._paused = False

    # --- addresses -----------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        if self.ldaps_port is None:
            raise ServerError("this slapd has no TLS")
        return f"ldaps://{self.host}:{self.ldaps_port}"

    base_dn = SUFFIX
    admin_dn = ADMIN_DN
    admin_password = ADMIN_PASSWORD
    service_dn = SERVICE_DN
    service_password = SERVICE_PASSWORD
    policy_dn = POLICY_DN

    @staticmethod
    def user_dn(uid: str) -> str:
        return f"uid={uid},{PEOPLE}"

    @staticmethod
    def group_dn(cn: str) -> str:
        return f"cn={cn},{GROUPS}"

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        ensure_slapd()
        if not self._seeded:
            self._write_files()
            run_checked(
                [SLAPADD, "-f", str(self.config_path), "-l", str(self.ldif_path)],
                f"slapadd for {self.name}",
            )
            self._seeded = True
        self.process.start()
        try:
            wait_for_port(self.port, self.host, timeout, self.process)
            if self.ldaps_port is not None:
                wait_for_port(self.ldaps_port, self.host, timeout, self.process)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        if self._paused:
            self.resume()
        self.process.stop()

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the server accepts TCP connections (the kernel does) but never answers,
        like a hung or overloaded slapd."""
        if not self.process.running or self.process.pid is None:
            raise ServerError(f"{self.name} is not running")
        os.kill(self.process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self.process.pid is not None and self._paused:
            os.kill(self.process.pid, signal.SIGCONT)
        self._paused = False

    @property
    def running(self) -> bool:
        return self.process.running

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.root)

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- changing the directory ----------------------------------------------------------

    def admin(self) -> ldap3.Connection:
        """A connection bound as the rootdn (close it, or use it in a with block)."""
        server = ldap3.Server(self.host, port=self.port, get_info=ldap3.NONE, connect_timeout=5)
        return ldap3.Connection(
            server,
            ADMIN_DN,
            ADMIN_PASSWORD,
            auto_bind=True,
            receive_timeout=10,
            raise_exceptions=True,
        )

    def bind_as(self, uid: str, password: str) -> bool:
        server = ldap3.Server(self.host, port=self.port, get_info=ldap3.NONE, connect_timeout=5)
        conn = ldap3.Connection(server, self.user_dn(uid), password, receive_timeout=10)
        try:
            return bool(conn.bind())
        finally:
            conn.unbind()

    def fail_binds(self, uid: str, times: int = LOCKOUT_FAILURES) -> None:
        """Bind as uid with a wrong password `times` times (ppolicy counts each)."""
        for _ in range(times):
            if self.bind_as(uid, "wrong-password"):
                raise ServerError(f"a wrong password bound as {uid}")

    def set_password(self, uid: str, password: str) -> None:
        """The user changes their own password (RFC 3062 password modify): ppolicy records
        pwdChangedTime."""
        server = ldap3.Server(self.host, port=self.port, get_info=ldap3.NONE, connect_timeout=5)
        old = next(u.password for u in SEED_USERS if u.uid == uid)
        with ldap3.Connection(
            server,
            self.user_dn(uid),
            old,
            auto_bind=True,
            receive_timeout=10,
            raise_exceptions=True,
        ) as conn:
            conn.extend.standard.modify_password(self.user_dn(uid), old, password)

    def modify(self, dn: str, changes: dict) -> None:
        with self.admin() as conn:
            conn.modify(dn, changes)

    def read(self, dn: str, attributes: Sequence[str]) -> dict:
        with self.admin() as conn:
            conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=list(attributes))
            return dict(conn.response[0]["raw_attributes"]) if conn.response else {}

    def count_entries(self, filt: str) -> int:
        """How many entries a raw filter matches under the suffix (as the rootdn)."""
        with self.admin() as conn:
            conn.search(SUFFIX, filt, ldap3.SUBTREE, attributes=[ldap3.NO_ATTRIBUTES])
            return sum(1 for r in conn.response if r.get("type") == "searchResEntry")

    def log_text(self) -> str:
        try:
            return self.process.output.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- generated files -----------------------------------------------------------------

    def _argv(self) -> list[str]:
        urls = self.uri + "/"
        if self.ldaps_port is not None:
            urls += f" ldaps://{self.host}:{self.ldaps_port}/"
        # -d 256 (stats): stay in the foreground and log each operation to output.log.
        return [SLAPD, "-f", str(self.config_path), "-h", urls, "-d", "256"]

    def _write_files(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        self.ldif_path.write_text(self.ldif)
        self.config_path.write_text(self.config())

    def config(self) -> str:
        includes = "\n".join(f"include {SCHEMA_DIR}/{s}.schema" for s in SCHEMAS)
        tls = ""
        if self.tls is not None:
            tls = (
                f"TLSCACertificateFile {self.tls.ca}\n"
                f"TLSCertificateFile {self.tls.cert}\n"
                f"TLSCertificateKeyFile {self.tls.key}\n"
            )
        return f"""\
# Generated by tests/servers/slapd.py.
{includes}
modulepath {MODULE_PATH}
moduleload back_mdb
moduleload ppolicy
pidfile {self.root}/slapd.pid
argsfile {self.root}/slapd.args
{tls}
database mdb
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PASSWORD}
directory {self.db_dir}
maxsize 104857600
index objectClass eq
index uid,mail,cn,member,memberUid,uniqueMember,entryUUID eq

overlay ppolicy
ppolicy_default "{POLICY_DN}"
ppolicy_use_lockout

access to attrs=userPassword
  by self write
  by anonymous auth
  by * none
access to *
  by dn.exact="{SERVICE_DN}" read
  by self read
  by * none
"""


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def slapd(test_ca: TestCA) -> Iterator[Slapd]:
    """A running slapd seeded with SEED_USERS/SEED_GROUPS, shared by the session: do not
    change its data, stop or pause it (use slapd_factory for that)."""
    server = Slapd(test_ca, name="slapd-session")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def slapd_factory(test_ca: TestCA) -> Iterator[Callable[..., Slapd]]:
    """Make fresh running slapd instances (same seed, so replicas of each other); all are
    stopped and removed after the test."""
    made: list[Slapd] = []

    def make(name: str = "slapd", tls: bool = True, start: bool = True) -> Slapd:
        server = Slapd(test_ca if tls else None, name=name)
        made.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()


def wait_for_ldap(server: Slapd, timeout: float = 10.0) -> None:
    """Wait until slapd answers a search (not only accepts TCP)."""

    def answers() -> bool:
        try:
            return server.count_entries("(objectClass=organization)") == 1
        except ldap3.core.exceptions.LDAPException:
            return False

    wait_until(answers, timeout, f"{server.name} to answer", process=server.process)


__all__ = [
    "SEED_GROUPS",
    "SEED_USERS",
    "SeedGroup",
    "SeedUser",
    "Slapd",
    "entry_uuid",
    "seed_ldif",
    "slapd",
    "slapd_factory",
    "wait_for_ldap",
]
