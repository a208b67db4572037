"""A private Samba Active Directory domain controller for integration tests (samba 4.17).

Provisioned once per test session in a short folder under /tmp, it serves LDAP only
(`server services = ldap`) on 389 and 636 of its own loopback address 127.0.0.N: AD's LDAP
ports cannot be moved, so each instance takes an address of its own (NOTES.md). Its TLS
certificate comes from the session's test CA and names that address.

    etc/smb.conf    written before provisioning, so no system smb.conf is merged in
    private/ state/ cache/ lock/ sysvol/    Samba's folders      output.log  samba -i output

The seed (SEED_USERS, SEED_GROUPS) is made with samba-tool; a few states samba-tool cannot
set (an expiry in the past, no userPrincipalName) are written over LDAP as Administrator.
Fixture (import it into the test module): `samba_dc`, one per session. Tests change only
the accounts made for them (larry is locked out by a test, pat's password is changed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import ldap3
import pytest

from tests.servers.common import (
    ServerError,
    ServerProcess,
    ensure_installed,
    port_is_free,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_for_port,
    wait_until,
)
from tests.support.ca import TestCA

SAMBA = "/usr/sbin/samba"
SAMBA_TOOL = "/usr/bin/samba-tool"
SAMBA_PYTHON = "/usr/bin/python3"  # the interpreter samba-tool runs on (samba's bindings)

# What /usr/bin/samba-tool does, once per command of a JSON list given as argv[1].
_BATCH_RUNNER = """
import json, sys
from samba.netcmd.main import cmd_sambatool
for argv in json.loads(sys.argv[1]):
    try:
        status = cmd_sambatool()._run("samba-tool", *argv)
    except SystemExit as exc:
        status = exc.code
    if status:
        sys.exit(f"samba-tool {' '.join(argv)} failed with status {status}")
"""
# Without samba-vfs-modules provisioning fails (NOTES.md).

REALM = "SAMDOM.EXAMPLE.COM"
DNS_DOMAIN = REALM.lower()
NETBIOS_DOMAIN = "SAMDOM"
BASE_DN = "DC=samdom,DC=example,DC=com"
USERS_DN = f"CN=Users,{BASE_DN}"
ADMIN_PASSWORD = "Admin-Passw0rd-1"
SERVICE_USER = "svc-apppass"
SERVICE_PASSWORD = "Service-Passw0rd-2"

LDAP_PORT = 389
LDAPS_PORT = 636

# Account lockout: after this many failed binds, for this many minutes.
LOCKOUT_THRESHOLD = 3
LOCKOUT_MINUTES = 30

# FILETIME of 2020-01-01T00:00:00Z: an accountExpires in the past.
PAST_FILETIME = 132223104000000000


@dataclass(frozen=True)
class SeedUser:
    name: str  # sAMAccountName
    password: str
    mail: str | None = None
    given: str = ""
    surname: str = ""
    disabled: bool = False
    expired: bool = False  # accountExpires in the past
    upn: bool = True  # False: userPrincipalName removed (only the implicit UPN works)

    @property
    def cn(self) -> str:
        return f"{self.given} {self.surname}".strip() or self.name

    @property
    def dn(self) -> str:
        return f"CN={self.cn},{USERS_DN}"

    @property
    def upn_value(self) -> str:
        return f"{self.name}@{DNS_DOMAIN}"


SEED_USERS: tuple[SeedUser, ...] = (
    SeedUser(SERVICE_USER, SERVICE_PASSWORD),
    SeedUser("alice", "Alice-Pw-1", "alice@example.com", "Alice", "Liddell"),
    SeedUser("bob", "Bob-Pw-2", "bob@example.com", "Bob", "Builder"),
    SeedUser("carl", "Carl-Pw-3", "carl@example.com", "Carl", "Nested"),
    SeedUser("printer1", "Printer1-Pw-4", "printer1@example.com"),
    SeedUser("noupn", "Noupn-Pw-5", "noupn-mail@example.com", upn=False),
    SeedUser("dora", "Dora-Pw-6", "dora@example.com", "Dora", "Disabled", disabled=True),
    SeedUser("eve", "Eve-Pw-7", "eve@example.com", "Eve", "Expired", expired=True),
    SeedUser("larry", "Larry-Pw-8", "larry@example.com", "Larry", "Lockout"),
    SeedUser("pat", "Pat-Pw-9", "pat@example.com", "Pat", "Password"),
    SeedUser("nomail", "Nomail-Pw-10"),
)


@dataclass(frozen=True)
class SeedGroup:
    name: str
    members: tuple[str, ...]  # users or groups

    @property
    def dn(self) -> str:
        return f"CN={self.name},{USERS_DN}"


# Order matters: a group is created before it becomes a member of another.
SEED_GROUPS: tuple[SeedGroup, ...] = (
    SeedGroup("mail-staff", ("carl",)),
    SeedGroup("legacy-mail", ("alice", "printer1", "larry", "pat", "dora", "mail-staff")),
    SeedGroup("mfa-enrolled", ("alice",)),
)


def ensure_samba() -> None:
    ensure_installed((SAMBA, SAMBA_TOOL))


def pick_address() -> str:
    """A 127.0.0.N (N from 10 to 250) whose LDAP ports are free."""
    rng = random.SystemRandom()
    for _ in range(200):
        ip = f"127.0.0.{rng.randint(10, 250)}"
        if port_is_free(LDAP_PORT, ip) and port_is_free(LDAPS_PORT, ip):
            return ip
    raise ServerError("no 127.0.0.N with free ports 389 and 636")


def to_filetime(when: datetime) -> int:
    delta = when - datetime(1601, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


class SambaDC:
    """A private AD DC. provision() once, then start()/stop() as often as needed."""

    realm = REALM
    dns_domain = DNS_DOMAIN
    netbios_domain = NETBIOS_DOMAIN
    base_dn = BASE_DN
    admin_password = ADMIN_PASSWORD
    service_user = SERVICE_USER
    service_password = SERVICE_PASSWORD

    def __init__(
        self, tls: TestCA | None = None, root: Path | None = None, ip: str | None = None
    ) -> None:
        self.tls = tls
        self.root = root or short_tempdir("ad-")
        self.ip = ip or pick_address()
        self.conf = self.root / "etc" / "smb.conf"
        self.tls_dir = self.root / "private" / "tls"
        self.process = ServerProcess(
            "samba",
            [SAMBA, "-s", str(self.conf), "-i", "--no-process-group"],
            output=self.root / "output.log",
        )
        self.provisioned = False

    # --- addresses -----------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://{self.ip}:{LDAP_PORT}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://{self.ip}:{LDAPS_PORT}"

    @property
    def service_bind_dn(self) -> str:
        return next(u.dn for u in SEED_USERS if u.name == SERVICE_USER)

    @staticmethod
    def user_dn(name: str) -> str:
        return next(u.dn for u in SEED_USERS if u.name == name)

    @staticmethod
    def group_dn(name: str) -> str:
        return f"CN={name},{USERS_DN}"

    # --- lifecycle -----------------------------------------------------------------------

    def provision(self) -> None:
        ensure_samba()
        for sub in ("etc", "private", "state", "cache", "lock", "sysvol", "bind-dns"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if self.tls is not None:
            self._install_certificate()
        self.conf.write_text(self.config())
        run_checked(
            [
                SAMBA_TOOL,
                "domain",
                "provision",
                "-s",
                str(self.conf),
                f"--targetdir={self.root}",
                f"--realm={REALM}",
                f"--domain={NETBIOS_DOMAIN}",
                "--server-role=dc",
                "--dns-backend=NONE",
                "--use-rfc2307",
                "--host-name=dc1",
                f"--host-ip={self.ip}",
                f"--adminpass={ADMIN_PASSWORD}",
            ],
            "samba-tool domain provision",
            timeout=300,
        )
        # Provisioning may rewrite smb.conf; ours is the one we want.
        self.conf.write_text(self.config())
        # Simple test passwords, changes at once, and lockout after a few failures.
        self.samba_tool(
            "domain",
            "passwordsettings",
            "set",
            "--complexity=off",
            "--min-pwd-age=0",
            "--max-pwd-age=0",
            "--min-pwd-length=1",
            "--history-length=0",
            f"--account-lockout-threshold={LOCKOUT_THRESHOLD}",
            f"--account-lockout-duration={LOCKOUT_MINUTES}",
            f"--reset-account-lockout-after={LOCKOUT_MINUTES}",
        )
        self.provisioned = True

    def start(self, timeout: float = 60.0) -> None:
        if not self.provisioned:
            self.provision()
        self.process.start()
        try:
            wait_for_port(LDAP_PORT, self.ip, timeout, self.process)
            wait_until(self._answers, timeout, "samba to answer LDAP binds", process=self.process)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.process.running

    def cleanup(self) -> None:
        self.stop()
        remove_tree(self.root)

    def _answers(self) -> bool:
        try:
            with self.admin():
                return True
        except ldap3.core.exceptions.LDAPException:
            return False

    # --- accounts ------------------------------------------------------------------------

    def samba_tool(self, *args: str) -> str:
        return run_checked(
            [SAMBA_TOOL, *args, "-s", str(self.conf)],
            f"samba-tool {' '.join(args[:2])}",
            timeout=120,
        )

    def samba_tool_batch(self, commands: Sequence[Sequence[str]]) -> str:
        """Run several samba-tool commands in one Python process: samba-tool's start (about
        0.5 s of imports) is paid once. Stops at the first command that fails."""
        argv = [[*c, "-s", str(self.conf)] for c in commands]
        return run_checked(
            [SAMBA_PYTHON, "-c", _BATCH_RUNNER, json.dumps(argv)],
            f"samba-tool batch of {len(argv)} commands",
            timeout=300,
        )

    def seed(
        self, users: Sequence[SeedUser] = SEED_USERS, groups: Sequence[SeedGroup] = SEED_GROUPS
    ) -> None:
        """Create the seed accounts and groups (the DC must be running)."""
        commands = [self._create_args(u) for u in users]
        for group in groups:
            commands.append(["group", "add", group.name])
            commands.append(["group", "addmembers", group.name, ",".join(group.members)])
        commands += [["user", "disable", u.name] for u in users if u.disabled]
        self.samba_tool_batch(commands)
        for user in users:
            if user.expired:
                self.modify(
                    user.dn, {"accountExpires": [(ldap3.MODIFY_REPLACE, [str(PAST_FILETIME)])]}
                )
            if not user.upn:
                self.modify(user.dn, {"userPrincipalName": [(ldap3.MODIFY_DELETE, [])]})

    def add_user(self, user: SeedUser) -> None:
        self.samba_tool(*self._create_args(user))

    @staticmethod
    def _create_args(user: SeedUser) -> list[str]:
        args = ["user", "create", user.name, user.password]
        if user.mail:
            args.append(f"--mail-address={user.mail}")
        if user.given:
            args.append(f"--given-name={user.given}")
        if user.surname:
            args.append(f"--surname={user.surname}")
        return args

    def disable(self, name: str) -> None:
        self.samba_tool("user", "disable", name)

    def set_password(self, name: str, password: str) -> None:
        """An administrator's reset (samba-tool user setpassword): pwdLastSet moves."""
        self.samba_tool("user", "setpassword", name, f"--newpassword={password}")

    def fail_binds(self, name: str, times: int = LOCKOUT_THRESHOLD) -> None:
        """Bind as name with a wrong password `times` times (badPwdCount, then lockout)."""
        for _ in range(times):
            conn = ldap3.Connection(
                self._server(), f"{name}@{DNS_DOMAIN}", "Wrong-Password-0", receive_timeout=10
            )
            try:
                if conn.bind():
                    raise ServerError(f"a wrong password bound as {name}")
            finally:
                conn.unbind()

    def admin(self) -> ldap3.Connection:
        """A connection bound as Administrator (use it in a with block)."""
        return ldap3.Connection(
            self._server(),
            f"{NETBIOS_DOMAIN}\\Administrator",
            ADMIN_PASSWORD,
            auto_bind=True,
            auto_referrals=False,
            receive_timeout=10,
            raise_exceptions=True,
        )

    def modify(self, dn: str, changes: dict) -> None:
        with self.admin() as conn:
            conn.modify(dn, changes)

    def read(self, dn: str, attributes: Sequence[str]) -> dict:
        with self.admin() as conn:
            conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=list(attributes))
            entries = [r for r in conn.response if r.get("type") == "searchResEntry"]
            return dict(entries[0]["raw_attributes"]) if entries else {}

    def count_entries(self, filt: str) -> int:
        with self.admin() as conn:
            conn.search(BASE_DN, filt, ldap3.SUBTREE, attributes=[ldap3.NO_ATTRIBUTES])
            return sum(1 for r in conn.response if r.get("type") == "searchResEntry")

    def _server(self) -> ldap3.Server:
        return ldap3.Server(self.ip, port=LDAP_PORT, get_info=ldap3.NONE, connect_timeout=5)

    # --- generated files -----------------------------------------------------------------

    def _install_certificate(self) -> None:
        """Our CA's certificate for this address, in place before the first start (otherwise
        Samba makes a self-signed one without an IP SAN)."""
        assert self.tls is not None
        files = self.tls.issue(f"samba-{self.ip}", dns_names=("dc1." + DNS_DOMAIN,), ips=(self.ip,))
        self.tls_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files.cert, self.tls_dir / "cert.pem")
        shutil.copyfile(self.tls.ca, self.tls_dir / "ca.pem")
        key = self.tls_dir / "key.pem"
        shutil.copyfile(files.key, key)
        os.chmod(key, 0o600)  # Samba refuses a key others can read

    def config(self) -> str:
        d = self.root
        tls = "    tls enabled = no\n"
        if self.tls is not None:
            tls = (
                f"    tls enabled = yes\n    tls keyfile = {self.tls_dir}/key.pem\n"
                f"    tls certfile = {self.tls_dir}/cert.pem\n"
                f"    tls cafile = {self.tls_dir}/ca.pem\n"
            )
        return f"""\
# Generated by tests/servers/samba.py.
[global]
    netbios name = DC1
    realm = {REALM}
    workgroup = {NETBIOS_DOMAIN}
    server role = active directory domain controller
    server services = ldap
    interfaces = {self.ip}/8
    bind interfaces only = yes
    ldap server require strong auth = no
    old password allowed period = 0
    private dir = {d}/private
    state directory = {d}/state
    cache directory = {d}/cache
    lock directory = {d}/lock
    pid directory = {d}/lock
    binddns dir = {d}/bind-dns
    log file = {d}/log.%m
    log level = 1
{tls}
[sysvol]
    path = {d}/sysvol
    read only = no

[netlogon]
    path = {d}/sysvol/{DNS_DOMAIN}/scripts
    read only = no
"""


@pytest.fixture(scope="session")
def samba_dc(test_ca: TestCA) -> Iterator[SambaDC]:
    """A running, seeded Samba AD DC shared by the session (see SEED_USERS, SEED_GROUPS)."""
    dc = SambaDC(test_ca)
    try:
        dc.provision()
        dc.start()
        dc.seed()
        yield dc
    finally:
        dc.cleanup()


__all__ = [
    "PAST_FILETIME",
    "SEED_GROUPS",
    "SEED_USERS",
    "SambaDC",
    "SeedGroup",
    "SeedUser",
    "ensure_samba",
    "samba_dc",
    "to_filetime",
]
