"""The create form's fields to a CodeRequest and the sending-limits form's to a SendingChange
(proxy/manage.py checks the rest), and the create form's choices. Pure: a mistake is a
ManageError naming the field, shown next to it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from proxy.codes.sending import SendingPolicy
from proxy.config import SCOPES, Settings
from proxy.configschema import parse_expiry
from proxy.manage import CodeRequest, ManageError, SendingChange

# Expiry choices (Google and Microsoft app passwords never expire; Fastmail offers presets).
PRESETS = {"30d": ("30 days", 30), "90d": ("90 days", 90), "365d": ("1 year", 365)}

# One form field's longest value: a label is at most 100 characters, 16 networks fit easily.
MAX_FIELD = 2000


@dataclass(frozen=True)
class Choices:
    """What the form offers and what it starts with."""

    scopes: tuple[str, ...]
    default_scopes: tuple[str, ...]
    presets: tuple[tuple[str, str], ...]  # (value, label)
    default_label: str  # what "default" means: "never" or the site's default expiry
    min_date: str  # the earliest date the date field accepts (tomorrow)


def choices(settings: Settings, today: date) -> Choices:
    default = settings.codes.default_expires
    label = "Never" if default is None else f"Site default ({_days(default)})"
    return Choices(
        scopes=SCOPES,
        default_scopes=settings.codes.default_scopes,
        presets=tuple((value, text) for value, (text, _) in PRESETS.items()),
        default_label=label,
        min_date=(today + timedelta(days=1)).isoformat(),
    )


def _days(delta: timedelta) -> str:
    days = delta.total_seconds() / 86400
    return f"{days:g} days" if days >= 1 else f"{delta.total_seconds() / 3600:g} hours"


def first(form: Mapping[str, Sequence[str]], name: str) -> str:
    values = form.get(name) or [""]
    value = values[0]
    if len(value) > MAX_FIELD:
        raise ManageError("invalid", "this field is too long", name)
    return value


def code_request(form: Mapping[str, Sequence[str]], now: datetime) -> CodeRequest:
    """The request the form describes; ManageError(field) for what cannot be read."""
    label = first(form, "label").strip()
    if not label:
        raise ManageError(
            "invalid", "give the app password a name, e.g. “Printer 3rd floor”", "label"
        )
    scopes = tuple(s for s in form.get("scopes", ()) if s)
    if not scopes:
        raise ManageError("invalid", "choose at least one of IMAP, POP3 or SMTP", "scopes")
    return CodeRequest(
        label=label,
        scopes=scopes,
        expires_at=_expiry(first(form, "expires"), first(form, "expires_date"), now),
        max_uses=_max_uses(first(form, "max_uses")),
        networks=_words(first(form, "networks")),
        mail_from=_words(first(form, "mail_from")),
        rcpt_domains=_words(first(form, "rcpt_domains")),
        max_messages_per_day=_per_day(first(form, "max_messages_per_day")),
        custodian=first(form, "custodian").strip() or None,
    )


def sending_change(form: Mapping[str, Sequence[str]]) -> SendingChange:
    """The sending limits the form gives; all three empty removes them."""
    return SendingChange(
        mail_from=_words(first(form, "mail_from")),
        rcpt_domains=_words(first(form, "rcpt_domains")),
        max_messages_per_day=_per_day(first(form, "max_messages_per_day")),
    )


def sending_values(policy: SendingPolicy) -> dict[str, list[str]]:
    """A code's sending policy as the form's values, to start from."""
    return {
        "mail_from": [", ".join(policy.mail_from)],
        "rcpt_domains": [", ".join(policy.rcpt_domains)],
        "max_messages_per_day": [str(policy.max_per_day or "")],
    }


def _per_day(value: str) -> int | None:
    return _whole(
        value, "messages per day is a whole number, or empty for no limit", "max_messages_per_day"
    )


def _words(value: str) -> tuple[str, ...]:
    """A field's list: separated by spaces, commas or semicolons."""
    return tuple(w for w in re.split(r"[\s,;]+", value) if w)


def _expiry(choice: str, day: str, now: datetime) -> datetime | None:
    if choice in ("", "default"):
        return None
    if choice in PRESETS:
        return now.astimezone(UTC).replace(microsecond=0) + timedelta(days=PRESETS[choice][1])
    if choice == "date":
        try:
            date.fromisoformat(day.strip())
            moment = parse_expiry(day.strip(), now)
        except ValueError:
            moment = None
        if moment is None:
            raise ManageError("invalid", "give a date like 2027-06-30", "expires_date")
        if moment <= now:
            raise ManageError("invalid", "the date must be in the future", "expires_date")
        return moment
    raise ManageError("invalid", "choose one of the expiry options", "expires")


def _max_uses(value: str) -> int | None:
    return _whole(value, "max uses is a whole number, or empty for no limit", "max_uses")


def _whole(value: str, message: str, field: str) -> int | None:
    value = value.strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or len(value) > 9:
        raise ManageError("invalid", message, field)
    return int(value)
