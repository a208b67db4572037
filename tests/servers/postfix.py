"""A private Postfix 3.7 for integration tests, delivering into a test Dovecot over LMTP.

One instance runs from main.cf and master.cf generated in a short folder under /tmp
(see NOTES.md for why it is started this way):

    etc/        config_directory (main.cf, master.cf)
    spool/      queue_directory (subfolders made by `postfix check`)
    data/       data_directory, owned by postfix (the master dies silently otherwise)
    postfix.log maillog_file, written by postlogd     output.log   the master's stdout/stderr

Three smtpd listeners on 127.0.0.1:
    smtp_port         MX-like: no AUTH, XCLIENT allowed from 127.0.0.0/8 (the proxy's
                      upstream for `xclient` logins); STARTTLS offered.
    submission_port   AUTH PLAIN/LOGIN through Dovecot's auth socket (so SASL PLAIN with an
                      authzid for Dovecot's master user works); STARTTLS offered.
    submissions_port  the same with implicit TLS.
Mail for DOMAIN (example.test) goes to Dovecot's maildirs over LMTP; anything else fails
at once (default_transport = error), so no test ever reaches out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

from tests.servers.common import (
    LOOPBACK,
    LogFile,
    ServerProcess,
    chown,
    ensure_installed,
    free_port,
    remove_tree,
    run_checked,
    short_tempdir,
    wait_for_port,
)
from tests.servers.dovecot import Dovecot, MessageMatch
from tests.support.ca import CertFiles, TestCA

POSTFIX = "/usr/sbin/postfix"
MASTER = "/usr/lib/postfix/sbin/master"
REQUIRED = (
    POSTFIX,
    MASTER,
    "/usr/lib/postfix/sbin/smtpd",
    "/usr/lib/postfix/sbin/lmtp",
    "/usr/lib/postfix/sbin/postlogd",
)

DOMAIN = "example.test"
HOSTNAME = f"mx.{DOMAIN}"
MAIL_OWNER = "postfix"
CONFIG_BACKDATE = 60.0  # seconds


class Postfix:
    """A private Postfix instance in front of a running test Dovecot (LMTP and SASL)."""

    def __init__(
        self,
        dovecot: Dovecot,
        tls: TestCA | CertFiles,
        domain: str = DOMAIN,
        root: Path | None = None,
        extra_main_cf: str = "",
    ) -> None:
        self.dovecot = dovecot
        self.tls = tls
        self.domain = domain
        self.hostname = f"mx.{domain}"
        self.root = root or short_tempdir("pf-")
        self.host = LOOPBACK
        self.smtp_port = free_port()
        self.submission_port = free_port()
        self.submissions_port = free_port()
        self.extra_main_cf = extra_main_cf

        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "spool"
        self.data_dir = self.root / "data"
        self.log = LogFile(self.root / "postfix.log")
        self.process = ServerProcess(
            "postfix",
            [MASTER, "-c", str(self.config_dir), "-s"],
            output=self.root / "output.log",
            logs=[self.log.path],
        )

    # --- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        ensure_installed(REQUIRED)
        self._write_files()
        run_checked([POSTFIX, "-c", str(self.config_dir), "check"], "postfix check")
        self.process.start()
        try:
            for port in (self.smtp_port, self.submission_port, self.submissions_port):
                wait_for_port(port, self.host, timeout, self.process)
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
        self.stop()
        remove_tree(self.root)

    def __enter__(self) -> Postfix:
        try:
            self.start()
        except BaseException:
            remove_tree(self.root)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- mail -------------------------------------------------------------------------

    def address(self, user: str) -> str:
        return f"{user}@{self.domain}"

    def messages(self, user: str) -> list[EmailMessage]:
        return self.dovecot.messages(user)

    def wait_for_message(
        self, user: str, match: MessageMatch = None, timeout: float = 15.0
    ) -> EmailMessage:
        """Wait until a message for user matching match arrived in Dovecot; return it."""
        return self.dovecot.wait_for_message(user, match, timeout)

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
        for path in (self.config_dir, self.queue_dir, self.data_dir):
            path.mkdir(parents=True, exist_ok=True)
        chown(self.data_dir, MAIL_OWNER)
        for name, text in (("main.cf", self.main_cf()), ("master.cf", self.master_cf())):
            path = self.config_dir / name
            path.write_text(text)
            # Postfix reads a config file only once it is more than a second old (it sleeps in
            # 300 ms steps until then, in every program `postfix check` runs): backdate it.
            past = time.time() - CONFIG_BACKDATE
            os.utime(path, (past, past))

    def main_cf(self) -> str:
        return f"""\
# Generated by tests/servers/postfix.py for one test session.
compatibility_level = 3.6
config_directory = {self.config_dir}
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = {MAIL_OWNER}
maillog_file = {self.log.path}
maillog_file_prefixes = /tmp, /var, /dev/stdout
inet_interfaces = loopback-only
inet_protocols = ipv4

myhostname = {self.hostname}
mydomain = {self.domain}
myorigin = $mydomain
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
smtputf8_enable = no
smtpd_peername_lookup = no
smtp_dns_support_level = disabled

virtual_mailbox_domains = {self.domain}
virtual_transport = lmtp:unix:{self.dovecot.lmtp_socket}
default_transport = error:no mail leaves the test instance
relay_transport = error:no mail leaves the test instance

smtpd_banner = $myhostname ESMTP apppass test Postfix
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
smtpd_tls_chain_files = {self.tls.key}, {self.tls.cert}
smtpd_tls_security_level = may
smtpd_tls_loglevel = 1
smtpd_tls_received_header = yes
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 1000
smtpd_hard_error_limit = 1000
smtpd_sasl_type = dovecot
smtpd_sasl_path = {self.dovecot.auth_socket}
smtpd_sasl_auth_enable = no
broken_sasl_auth_clients = no

# Deliver as soon as mail arrives; retry fast when Dovecot restarts under a test.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 5s
lmtp_connect_timeout = 5s
{self.extra_main_cf}
"""

    def master_cf(self) -> str:
        sasl = _options(
            "smtpd_sasl_auth_enable=yes",
            "smtpd_client_restrictions=permit_sasl_authenticated,reject",
            "smtpd_relay_restrictions=permit_sasl_authenticated,reject",
        )
        return f"""\
# Generated by tests/servers/postfix.py. No chroot: the instance lives under /tmp.
# service type  private unpriv  chroot  wakeup  maxproc command + args
{self.host}:{self.smtp_port} inet n - n - - smtpd
{self.host}:{self.submission_port} inet n - n - - smtpd
{_options("syslog_name=postfix/submission")}
{sasl}
{self.host}:{self.submissions_port} inet n - n - - smtpd
{_options("syslog_name=postfix/submissions", "smtpd_tls_wrappermode=yes")}
{sasl}
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _options(*settings: str) -> str:
    """master.cf continuation lines: one `-o name=value` per line."""
    return "\n".join(f"  -o {setting}" for setting in settings)


def ensure_postfix() -> None:
    ensure_installed(REQUIRED)


__all__ = ["DOMAIN", "HOSTNAME", "Postfix"]
