"""`apppass notify [--dry-run]`, run daily (systemd/apppass-notify.timer): first disables the
codes left unused for codes.disable_after_unused (not revoked: they can be enabled again), then
mails the notices that are due, each once: 14 and 3 days before a code expires, and when one was
disabled for not being used, to the account and the code's custodian.

Once: a notice is claimed in the store before it is sent (one row per code, kind and occasion,
whichever node runs), marked sent after, and given up only if sending failed, for the next run
to try again; so running twice, or on two nodes at once, sends nothing twice. `--dry-run`
changes nothing and prints what a run would do and send (never a code: apppass has none).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from proxy.codes.store import CodeRecord, utcnow
from proxy.config import Settings
from proxy.directory.account import Account
from proxy.manage import Actor, ManageError, Manager
from proxy.notify.mailer import Mailer, mailer_for
from proxy.notify.notices import (
    Notice,
    NotifyError,
    Templates,
    due,
    idle_notice,
    message,
    notice_address,
    recipients,
    unused_since,
)

# Who `apppass notify` is in the audit log (actor cli, by this name).
ACTOR = Actor("cli", "apppass notify")


@dataclass
class Outcome:
    disabled: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0  # no one to send it to, or no way to send it


def add_notify(commands: Any) -> None:
    """`apppass notify` in the CLI's parser (proxy/cli.py)."""
    n = commands.add_parser(
        "notify",
        help="disable unused codes and mail expiry and idle notices (run daily; each once)",
    )
    n.add_argument(
        "--dry-run", action="store_true", help="change and send nothing; print what would be"
    )
    n.set_defaults(fn=cmd_notify)


def cmd_notify(ctx: Any) -> int:
    out = Notifier(
        ctx.settings, ctx.manager(), mailer_for(ctx.settings), _print, ctx.args.dry_run
    ).run()
    return 1 if out.failed else 0


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


class Notifier:
    def __init__(
        self,
        settings: Settings,
        manager: Manager,
        mailer: Mailer | None,
        say: Callable[[str], None],
        dry_run: bool = False,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.store = manager.store
        self.mailer = mailer
        self.say = say
        self.dry_run = dry_run
        self.templates = Templates(settings.notify.templates)

    def run(self, now: datetime | None = None) -> Outcome:
        now = now or utcnow()
        outcome = Outcome()
        about_to = self._disable_idle(now, outcome)
        records = self.manager.all_codes(ACTOR, include_inactive=True)
        notices = due(records, now) + [idle_notice(r, now) for r in about_to]
        if notices and not self.dry_run and self._cannot_send():
            outcome.skipped += len(notices)
        else:
            for notice in notices:
                self._notice(notice, now, outcome)
        word = "would be " if self.dry_run else ""
        self.say(
            f"notify: {outcome.disabled} code{_s(outcome.disabled)} {word}disabled, "
            f"{outcome.sent} notice{_s(outcome.sent)} {word}sent, {outcome.failed} failed, "
            f"{outcome.skipped} skipped"
        )
        return outcome

    def _disable_idle(self, now: datetime, outcome: Outcome) -> list[CodeRecord]:
        """Disable idle codes; in a dry run, the ones that would be (their notices are due too)."""
        after = self.settings.codes.disable_after_unused
        if after is None:
            return []
        would = []
        for record in self.manager.idle_codes(after, now):
            since = f"{unused_since(record):%Y-%m-%d}"
            what = (
                f"code {record.id} ({record.account_login}, {record.label}): unused since {since}"
            )
            if self.dry_run:
                self.say(f"would disable {what}")
                would.append(replace(record, disabled=True, idle_disabled_at=now))
                outcome.disabled += 1
            elif self.manager.disable_idle(ACTOR, record, after, now) is not None:
                self.say(f"disabled {what}")
                outcome.disabled += 1
        return would

    def _cannot_send(self) -> bool:
        why = None
        if self.settings.notify.sender is None:
            why = "notify.from is not set"
        elif self.mailer is None:
            why = "there is neither notify.smtp nor upstream.smtp"
        if why:
            self.say(f'notices not sent: {why} (README, "Expiry and idle notices")')
        return why is not None

    def _notice(self, notice: Notice, now: datetime, outcome: Outcome) -> None:
        code = notice.code
        what = f"{notice.kind} notice for code {code.id} ({code.account_login}, {code.label})"
        if not self.dry_run and not self.store.claim_notice(code.id, notice.kind, notice.ref, now):
            return  # sent already (or being sent by another run)
        try:
            account = self._account(code)
            to = recipients(notice, account)
            if not to:
                self.say(f"{what}: no address to send it to (no account address, no custodian)")
                outcome.skipped += 1
                return  # kept claimed: an address will not appear for this occasion
            portal = self.settings.web.public_url
            subject, body = self.templates.render(notice, account, self.settings.hostname, portal)
            sender = self.settings.notify.sender or "apppass"
            msg = message(sender, to, subject, body, self.settings.hostname, now)
            if self.dry_run:
                self.say(f"would send {what}:\n" + _indented(msg.as_string()))
                outcome.sent += 1
                return
            self._send(msg, to, account)
        except (NotifyError, ManageError) as exc:
            message_ = exc.message if isinstance(exc, ManageError) else str(exc)
            self.say(f"{what} not sent: {message_} (the next run tries again)")
            outcome.failed += 1
            if not self.dry_run:
                self.store.drop_notice(code.id, notice.kind, notice.ref)
            return
        self.store.notice_sent(code.id, notice.kind, notice.ref, now)
        self.say(f"sent {what} to {', '.join(to)}")
        outcome.sent += 1

    def _account(self, code: CodeRecord) -> Account | None:
        return self.manager.account_by_key(code.account_key)

    def _send(self, msg: Any, to: tuple[str, ...], account: Account | None) -> None:
        assert self.mailer is not None
        sender = self.settings.notify.address or ""
        if self.settings.notify.relay is None:  # logged in as the account: from its address
            if account is None:
                raise NotifyError("the account is gone: only notify.smtp can send its notices")
            sender = notice_address(account) or sender
        self.mailer.send(msg, sender, to, account.upstream_identity if account else "")


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.rstrip("\n").splitlines())
