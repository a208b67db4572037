"""`apppass codes create`'s options for a code's sending policy (SMTP: --mail-from, --rcpt-domain,
--max-messages-per-day) and its custodian, kept out of proxy/cli.py; proxy/manage.py checks the
values, as it does for the portal and the API."""

from __future__ import annotations

import argparse
from typing import Any


def add_arguments(create: argparse.ArgumentParser) -> None:
    create.add_argument(
        "--mail-from",
        action="append",
        default=[],
        metavar="ADDR",
        help="SMTP: may send as this address, *@domain, own (the account's addresses) or * "
        "(repeatable; with any sending option the default is own)",
    )
    create.add_argument(
        "--rcpt-domain",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="SMTP: may send only to recipients in this domain (repeatable)",
    )
    create.add_argument(
        "--max-messages-per-day", type=int, metavar="N", help="SMTP: at most N messages a UTC day"
    )
    create.add_argument(
        "--custodian",
        metavar="ADDR",
        help="also mail this address the code's expiry and idle notices (e.g. the printer's team)",
    )


def request_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The CodeRequest fields these options give."""
    return {
        "mail_from": tuple(args.mail_from),
        "rcpt_domains": tuple(args.rcpt_domain),
        "max_messages_per_day": args.max_messages_per_day,
        "custodian": args.custodian,
    }
