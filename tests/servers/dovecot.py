"""A private Dovecot 2.3 for integration tests: IMAP and POP3 on loopback, LMTP and auth sockets.

One instance runs from a config generated in a short folder under /tmp (see NOTES.md):

    run/        base_dir: master, login, auth and lmtp sockets (lmtp, auth-postfix)
    state/      state_dir
    mail/USER/Maildir   mail of each user, owned by the system user `mail` (uid 8)
    passwd      users, scheme PLAIN        masters   master users (login as anyone)
    dovecot.log everything Dovecot logs    output.log   its stdout/stderr

Users log in with their own password, or as any user with the master user's: SASL PLAIN
authzid=USER authcid=MASTER, or LOGIN "USER*MASTER" (LOGIN and PLAIN, no TLS required).
A wrong password or unknown user is answered at once (a last static passdb fails with
`nodelay`), a wrong master password after 0.5 s (auth_failure_delay = 0 still waits for
Dovecot's timer), and there is no auth penalty (the anvil penalty socket is closed), so a test
that fails a login on purpose does not slow down the tests after it. From 127.0.0.0/8 (login_
trusted_networks) IMAP ID x-originating-ip and POP3 XCLIENT set the logged rip=.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from pathlib import Path

from tests.servers.common import (
    LOOPBACK,
    LogFile,
    ServerError,
    ServerProcess,
    check_socket_path,
    chown,
    ensure_installed,
    free_port,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_for_port,
    wait_for_unix_socket,
    wait_until,
)
from tests.support.ca import CertFiles, TestCA

DOVECOT = "/usr/sbin/dovecot"
DOVECONF = "/usr/bin/doveconf"
DOVEADM = "/usr/bin/doveadm"
REQUIRED = (
    DOVECOT,
    DOVECONF,
    DOVEADM,
    "/usr/lib/dovecot/imap",
    "/usr/lib/dovecot/pop3",
    "/usr/lib/dovecot/lmtp",
)

# Known accounts of every test session. Passwords are deliberately unlike app passwords.
DEFAULT_USERS: Mapping[str, str] = {
    "alice": "alice-Upstream-1",
    "bob": "bob-Upstream-2",
    "printer1": "printer1-Upstream-3",
    "demo": "demo-Upstream-4",
}
MASTER_USER = "proxy"
MASTER_PASSWORD = "proxy-Master-Secret-9"
MASTER_SEPARATOR = "*"

# Dovecot's defaults (default_process_limit = 100, mail_max_userip_connections = 10) break as
# soon as many sessions come from one address, which is what a proxy is: raise them.
PROCESS_LIMIT = 1000
CLIENT_LIMIT = 4000
USERIP_CONNECTIONS = 10000
AUTH_CLIENT_LIMIT = 8 * PROCESS_LIMIT

# Stopping takes 0.03 s, or about 0.3 s right after a start, when children still starting
# miss the first SIGTERM (ServerProcess repeats it). Whatever is left after this is killed.
STOP_GRACE = 5.0

DH_PARAMS = Path("/usr/share/dovecot/dh.pem")
MAIL_USER = "mail"

# What wait_for_message looks for: text in the raw message, a predicate, or None for any.
MessageMatch = str | Callable[[EmailMessage], bool] | None


class Dovecot:
    """A private Dovecot instance; ports are chosen at construction and kept across restarts."""

    def __init__(
        self,
        tls: TestCA | CertFiles,
        users: Mapping[str, str] | None = None,
        master_user: str = MASTER_USER,
        master_password: str = MASTER_PASSWORD,
        root: Path | None = None,
        debug: bool = False,
        extra_config: str = "",
        oauth2_introspection: str | None = None,
    ) -> None:
        self.tls = tls
        self.root = root or short_tempdir("dc-")
        self.host = LOOPBACK
        self.imap_port = free_port()
        self.imaps_port = free_port()
        self.pop3_port = free_port()
        self.pop3s_port = free_port()
        self.users: dict[str, str] = dict(DEFAULT_USERS if users is None else users)
        self.master_user = master_user
        self.master_password = master_password
        self.debug = debug
        self.extra_config = extra_config
        # OAuth2 logins (XOAUTH2, OAUTHBEARER) validated by this introspection URL (RFC 7662).
        self.oauth2_introspection = oauth2_introspection

        self.config_path = self.root / "dovecot.conf"
        self.passwd_path = self.root / "passwd"
        self.masters_path = self.root / "masters"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.mail_root = self.root / "mail"
        self.log = LogFile(self.root / "dovecot.log")
        self.instance_name = f"apppass-{self.root.name}"
        # Postfix talks to these two: LMTP delivery and SASL for submission.
        self.lmtp_socket = Path(check_socket_path(self.base_dir / "lmtp"))
        self.auth_socket = Path(check_socket_path(self.base_dir / "auth-postfix"))
        check_socket_path(self.base_dir / "login" / "imap-master")  # the deepest socket

        self.process = ServerProcess(
            "dovecot",
            [DOVECOT, "-c", str(self.config_path), "-F"],
            output=self.root / "output.log",
            logs=[self.log.path],
            signal_group=True,
            stop_grace=STOP_GRACE,
        )

    # --- accounts ---------------------------------------------------------------------

    def add_user(self, name: str, password: str) -> None:
        """Add or change a user, also while running: then it returns once Dovecot has re-read
        its passwd-file and accepts the new password (checked with `doveadm auth test`)."""
        # Dovecot lowercases login names (auth_username_format = %Ln) and splits at "*".
        if (
            name != name.lower()
            or any(c in name for c in f":{MASTER_SEPARATOR}@ \n\r\0")
            or any(c in password for c in "\n\r\0")
        ):
            raise ValueError(f"unusable user name or password for the passwd-file: {name!r}")
        self.users[name] = password
        if self.passwd_path.exists():
            self._write_passwd()
        if self.running:
            self._wait_for_passdb(name, password, accepted=True)

    def remove_user(self, name: str) -> None:
        password = self.users.pop(name, None)
        if self.passwd_path.exists():
            self._write_passwd()
        if self.running and password is not None:
            self._wait_for_passdb(name, password, accepted=False)

    def _wait_for_passdb(
        self, name: str, password: str, accepted: bool, timeout: float = 10.0
    ) -> None:
        """Dovecot looks at a changed passwd-file at most once a second: poll until it did."""

        def visible() -> bool:
            proc = subprocess.run(
                [
                    DOVEADM,
                    "-c",
                    str(self.config_path),
                    "auth",
                    "test",
                    "-x",
                    "service=imap",
                    name,
                    password,
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
            return (proc.returncode == 0) == accepted

        wait_until(
            visible,
            timeout,
            f"Dovecot to {'accept' if accepted else 'refuse'} {name}",
            interval=0.1,
            process=self.process,
        )

    def master_login(self, user: str) -> str:
        """The LOGIN name that logs in as user with the master password: "user*proxy"."""
        return f"{user}{MASTER_SEPARATOR}{self.master_user}"

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        ensure_installed(REQUIRED)
        self._write_files()
        run_checked([DOVECONF, "-c", str(self.config_path), "-n"], "doveconf validation")
        self.process.start()
        try:
            for port in (self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port):
                wait_for_port(port, self.host, timeout, self.process)
            wait_for_unix_socket(self.lmtp_socket, timeout, self.process)
            wait_for_unix_socket(self.auth_socket, timeout, self.process)
        except BaseException:
            self.process.stop()
            raise

    def stop(self) -> None:
        self.process.stop()

    def restart(self, timeout: float = 30.0) -> None:
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.process.running

    def cleanup(self) -> None:
        """Stop and remove the folder (kept when APPPASS_KEEP_SERVERS is set)."""
        self.stop()
        remove_tree(self.root)

    def __enter__(self) -> Dovecot:
        try:
            self.start()
        except BaseException:
            remove_tree(self.root)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- mail -------------------------------------------------------------------------

    def maildir(self, user: str) -> Path:
        return self.mail_root / user / "Maildir"

    def message_files(self, user: str) -> list[Path]:
        """Files of the INBOX (new/ and cur/), oldest first."""
        base = self.maildir(user)
        files = [
            p
            for sub in ("new", "cur")
            if (base / sub).is_dir()
            for p in (base / sub).iterdir()
            if p.is_file()
        ]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def messages(self, user: str) -> list[EmailMessage]:
        """The INBOX of user, parsed, oldest first."""
        return [_parse(p.read_bytes()) for p in self.message_files(user)]

    def wait_for_message(
        self, user: str, match: MessageMatch = None, timeout: float = 15.0
    ) -> EmailMessage:
        """Wait until user's INBOX holds a message containing match (a string searched in the
        raw message) or satisfying it (a predicate); return the first such message."""

        def find() -> EmailMessage | None:
            for path in self.message_files(user):
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:  # moved from new/ to cur/ meanwhile
                    continue
                message = _parse(raw)
                if match is None:
                    return message
                if isinstance(match, str):
                    if match in raw.decode(errors="replace"):
                        return message
                elif match(message):
                    return message
            return None

        return wait_until(
            find, timeout, f"a message for {user} matching {match!r}", process=self.process
        )

    def clear_mail(self, user: str) -> None:
        shutil.rmtree(self.mail_root / user, ignore_errors=True)

    # --- log --------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log.text()

    def log_mark(self) -> int:
        return self.log.mark()

    def log_since(self, mark: int) -> str:
        return self.log.since(mark)

    def wait_for_log(
        self, needle: str | Callable[[str], bool], since: int = 0, timeout: float = 10.0
    ) -> str:
        return self.log.wait_for(needle, since, timeout)

    # --- generated files --------------------------------------------------------------

    def _write_files(self) -> None:
        for path in (self.base_dir, self.state_dir, self.mail_root):
            path.mkdir(parents=True, exist_ok=True)
        chown(self.mail_root, MAIL_USER)
        self.mail_root.chmod(0o750)
        _write_world_readable(
            self.masters_path, _passwd_line(self.master_user, self.master_password)
        )
        self._write_passwd()
        if self.oauth2_introspection:
            for name, text in _oauth2_args(self.oauth2_introspection).items():
                _write_world_readable(self.root / name, text)
        self.config_path.write_text(self.config())

    def _write_passwd(self) -> None:
        text = "".join(
            _passwd_line(name, password, self.mail_root / name)
            for name, password in sorted(self.users.items())
        )
        _write_world_readable(self.passwd_path, text)

    def config(self) -> str:
        cert, key = (self.tls.cert, self.tls.key)
        dh = f"ssl_dh = <{DH_PARAMS}\n" if DH_PARAMS.exists() else ""
        debug = "yes" if self.debug else "no"
        oauth2 = _OAUTH2_PASSDBS.format(root=self.root) if self.oauth2_introspection else ""
        mechanisms = "plain login xoauth2 oauthbearer" if oauth2 else "plain login"
        return f"""\
# Generated by tests/servers/dovecot.py for one test session.
instance_name = {self.instance_name}
base_dir = {self.base_dir}
state_dir = {self.state_dir}
log_path = {self.log.path}
log_timestamp = "%Y-%m-%d %H:%M:%S "
protocols = imap pop3 lmtp
listen = {self.host}
verbose_proctitle = yes

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
{dh}ssl_min_protocol = TLSv1.2

disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_username_format = %Ln
auth_master_user_separator = {MASTER_SEPARATOR}
auth_verbose = yes
auth_debug = {debug}
auth_failure_delay = 0
login_trusted_networks = 127.0.0.0/8
login_log_format_elements = user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}>

first_valid_uid = 8
first_valid_gid = 8
mail_location = maildir:~/Maildir
mail_debug = {debug}
mail_max_userip_connections = {USERIP_CONNECTIONS}
default_process_limit = {PROCESS_LIMIT}
default_client_limit = {CLIENT_LIMIT}

{oauth2}# Master users (login as anyone): SASL PLAIN authzid=USER authcid=MASTER, or "USER*MASTER".
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.masters_path}
  master = yes
  result_success = continue
  result_failure = continue-fail
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.passwd_path}
  result_success = return-ok
  result_failure = continue-fail
}}
# Reached only when the users' passdb failed: still a failure, but with `nodelay`, so the
# reply is not held back (auth_failure_delay = 0 alone still waits for a 0.5 s timer, and a
# failed passdb's own fields are discarded). A wrong master password is answered after 0.5 s.
passdb {{
  driver = static
  args = nopassword=y nodelay=yes
  result_success = return-fail
  result_failure = return-fail
}}
userdb {{
  driver = passwd-file
  args = {self.passwd_path}
}}

service imap-login {{
  inet_listener imap {{
    address = {self.host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {self.host}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {self.host}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {self.host}
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
# All users share uid mail, so mail processes may serve one user after another.
service imap {{
  service_count = 0
}}
service pop3 {{
  service_count = 0
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  # Above the sum of the process limits of the services that talk to auth.
  client_limit = {AUTH_CLIENT_LIMIT}
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
# No auth penalty: behind a proxy every failure would slow down every later login.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@example.test
}}
{self.extra_config}
"""


# Bearer tokens, checked by introspection at the token service (tests/servers/tokenservice.py).
# A user's token (Google's service-account grant) must name the user who logs in; an
# application's (client credentials, as Exchange Online's full-access grant) is good for every
# mailbox of its tenant: Dovecot then compares the domain parts (%Ld), and the test users have
# none. Dovecot always compares a name from the introspection with the login's (no setting
# turns that off), hence a passdb for each kind.
_OAUTH2_PASSDBS = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2-user.conf
  result_success = return-ok
  result_failure = continue
  result_internalfail = continue
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2-app.conf
  result_success = return-ok
  result_failure = return-fail
  result_internalfail = return-fail
}}
"""


def _oauth2_args(url: str) -> dict[str, str]:
    common = (
        f"introspection_url = {url}\nintrospection_mode = post\n"
        "active_attribute = active\nactive_value = true\n"
    )
    return {
        "oauth2-user.conf": common + "username_attribute = username\n",
        "oauth2-app.conf": common + "username_attribute = tenant\nusername_format = %Ld\n",
    }


def _passwd_line(name: str, password: str, home: Path | None = None) -> str:
    """user:password:uid:gid:gecos:home:shell: a passdb and userdb entry (uid/gid of mail)."""
    if home is None:
        return f"{name}:{{PLAIN}}{password}\n"
    mail = pwd.getpwnam(MAIL_USER)
    return f"{name}:{{PLAIN}}{password}:{mail.pw_uid}:{mail.pw_gid}::{home}::\n"


def _write_world_readable(path: Path, text: str) -> None:
    """Write atomically (so a running Dovecot never reads half a file); readable by the
    unprivileged auth process."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def ensure_dovecot() -> None:
    ensure_installed(REQUIRED)


__all__ = [
    "DEFAULT_USERS",
    "MASTER_PASSWORD",
    "MASTER_SEPARATOR",
    "MASTER_USER",
    "Dovecot",
    "ServerError",
]
