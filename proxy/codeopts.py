"""The options of `apppass codes create`, `codes sending` (a code's sending policy, SMTP:
--mail-from, --rcpt-domain, --max-messages-per-day) and `codes custodian`, kept out of cli.py;
proxy/manage.py checks the values, as it does for the portal and the API."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.manage import SendingChange


def add_create_command(codes: Any) -> argparse.ArgumentParser:
    """`apppass codes create LOGIN --label ...`."""
    c = codes.add_parser("create", help="create a code and show it once")
    c.add_argument("login")
    c.add_argument("--label", required=True, help='what the code is for, e.g. "3rd floor printer"')
    c.add_argument(
        "--scope", help="comma-separated: imap,pop3,smtp (default: codes.default_scopes)"
    )
    c.add_argument(
        "--expires", help="90d, 12h, 2027-06-30 or never (default: codes.default_expires)"
    )
    c.add_argument("--max-uses", type=int, metavar="N", help="stop working after N logins")
    c.add_argument(
        "--net", action="append", metavar="CIDR", help="only from this network (repeatable)"
    )
    _add_sending(c, "(repeatable; with any sending option the default is own)")
    c.add_argument(
        "--custodian",
        metavar="ADDR",
        help="also mail this address the code's expiry and idle notices (e.g. the printer's team)",
    )
    c.add_argument("--created-by", default=None, help=argparse.SUPPRESS)
    c.add_argument("--json", action="store_true")
    return c


def add_sending_command(codes: Any) -> argparse.ArgumentParser:
    """`apppass codes sending ID ...`: the code's whole new sending policy, or --none."""
    parser = codes.add_parser(
        "sending",
        help="replace a code's sending policy (SMTP); its live SMTP sessions end and log in again",
    )
    parser.add_argument("id", type=int)
    _add_sending(parser, "(repeatable; with only the other options it is own)")
    parser.add_argument(
        "--none",
        action="store_true",
        help="lift the policy: any sender, any recipient, no daily cap",
    )
    return parser


def add_custodian_command(codes: Any) -> argparse.ArgumentParser:
    """`apppass codes custodian ID ADDR | --none`."""
    parser = codes.add_parser(
        "custodian", help="who else is mailed a code's expiry and idle notices"
    )
    parser.add_argument("id", type=int)
    parser.add_argument("address", nargs="?", help="e.g. the printer's team: team@example.org")
    parser.add_argument("--none", action="store_true", help="notify the account only")
    return parser


def sending_change(args: argparse.Namespace) -> SendingChange | None:
    """The change `codes sending` asks for; None when it names no policy, or both a policy
    and --none."""
    from proxy.manage import SendingChange  # the CLI imports what a command needs, when it runs

    given = bool(args.mail_from or args.rcpt_domain or args.max_messages_per_day is not None)
    if given == args.none:
        return None
    return SendingChange(tuple(args.mail_from), tuple(args.rcpt_domain), args.max_messages_per_day)


def _add_sending(parser: argparse.ArgumentParser, senders_note: str) -> None:
    parser.add_argument(
        "--mail-from",
        action="append",
        default=[],
        metavar="ADDR",
        help="SMTP: may send as this address, *@domain, own (the account's addresses) or * "
        + senders_note,
    )
    parser.add_argument(
        "--rcpt-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="SMTP: may send only to recipients in this domain (repeatable)",
    )
    parser.add_argument(
        "--max-messages-per-day", type=int, metavar="N", help="SMTP: at most N messages a UTC day"
    )


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CodeRequest fields these options give."""
    return {
        "mail_from": tuple(args.mail_from),
        "rcpt_domains": tuple(args.rcpt_domain),
        "max_messages_per_day": args.max_messages_per_day,
        "custodian": args.custodian,
    }
