"""Which notices are due (pure), who gets each, and its text from a template the site may
replace: a file of the same name in `notify.templates` wins over the built-in one
(proxy/notify/templates). A template is a whole message: a `Subject:` line, a blank line, the
body. It sees the code's record and the account, never a code (apppass does not have them).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from proxy.codes.sending import address_problem, own_addresses
from proxy.codes.store import CodeRecord, State
from proxy.directory.account import Account

# Notices before a code expires: two weeks ahead (time to reach a device on another floor or
# site), then a last reminder three days ahead. A code that expires sooner than the first gets
# only the later one.
EXPIRY_NOTICES = ((3, "expiry-3"), (14, "expiry-14"))
IDLE = "idle"

TEMPLATES = {"expiry-3": "expiry.txt", "expiry-14": "expiry.txt", IDLE: "idle.txt"}

# A subject line longer than this is cut (RFC 5322 §2.1.1 recommends lines of at most 78).
MAX_SUBJECT = 200


class NotifyError(Exception):
    """A notice cannot be made or sent (a broken template, the mail server's refusal)."""


@dataclass(frozen=True)
class Notice:
    code: CodeRecord
    kind: str  # expiry-14, expiry-3 or idle
    ref: int  # the occasion (the expiry, or when it was disabled): a notice per occasion
    days: int  # days left before the expiry, or days unused


def due(records: list[CodeRecord], now: datetime) -> list[Notice]:
    """The notices these codes call for now (whether already sent is the store's to say)."""
    out = []
    for code in records:
        state = code.state(now)
        if state is State.ACTIVE and code.expires_at is not None:
            left = code.expires_at - now
            for days, kind in EXPIRY_NOTICES:
                if left <= timedelta(days=days):
                    out.append(Notice(code, kind, int(code.expires_at.timestamp()), _days(left)))
                    break
        elif state is State.DISABLED and code.idle_disabled_at is not None:
            out.append(idle_notice(code, code.idle_disabled_at))
    return out


def idle_notice(code: CodeRecord, disabled_at: datetime) -> Notice:
    days = (disabled_at - unused_since(code)).days
    return Notice(code, IDLE, int(disabled_at.timestamp()), days)


def unused_since(code: CodeRecord) -> datetime:
    """When the code was last used, made or enabled again: the idle clock's start."""
    return max(code.last_used_at or code.created_at, code.enabled_at or code.created_at)


def _days(left: timedelta) -> int:
    """Whole days left, rounded up (an expiry in 13 days and 2 hours is "14 days")."""
    return max(1, -(-int(left.total_seconds()) // 86400))


def notice_address(account: Account) -> str | None:
    """Where an account's notices go: its upstream identity if that is an address, else its
    first name that is one."""
    found = own_addresses(account.names, account.upstream_identity)
    if address_problem(account.upstream_identity) is None:
        return account.upstream_identity.lower()
    return found[0] if found else None


def recipients(notice: Notice, account: Account | None) -> tuple[str, ...]:
    found = [notice_address(account) if account else None, notice.code.custodian]
    return tuple(dict.fromkeys(a for a in found if a))


class Templates:
    """The notices' templates: the site's folder first, then the built-in ones."""

    def __init__(self, folder: Path | None) -> None:
        loaders: list[jinja2.BaseLoader] = [jinja2.PackageLoader("proxy.notify", "templates")]
        if folder is not None:
            loaders.insert(0, jinja2.FileSystemLoader(folder))
        # Sandboxed: a template may be written by someone who may not run code on this host.
        self.env = SandboxedEnvironment(
            loader=jinja2.ChoiceLoader(loaders),
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
        )

    def render(
        self, notice: Notice, account: Account | None, site: str, portal: str | None
    ) -> tuple[str, str]:
        """(subject, body) of a notice."""
        name = TEMPLATES[notice.kind]
        try:
            text = self.env.get_template(name).render(
                kind=notice.kind,
                days=notice.days,
                code=notice.code,
                account=account,
                name=(account.display_name or account.login) if account else "",
                site=site,
                portal=portal,
            )
        except jinja2.TemplateError as exc:
            raise NotifyError(f"template {name}: {exc}") from None
        head, _, body = text.partition("\n\n")
        if not head.startswith("Subject:") or "\n" in head.strip():
            raise NotifyError(f"template {name}: must start with one Subject: line, then a blank")
        subject = " ".join(head[len("Subject:") :].split())[:MAX_SUBJECT]
        if not subject:
            raise NotifyError(f"template {name}: the Subject: line is empty")
        return subject, body.strip("\n") + "\n"


def message(
    sender: str, to: tuple[str, ...], subject: str, body: str, hostname: str, now: datetime
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid("apppass", domain=hostname)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to it
    msg.set_content(body)
    return msg
