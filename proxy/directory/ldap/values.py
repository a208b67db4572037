"""LDAP attribute values: AD FILETIMEs and flags, GeneralizedTime, shadow days, GUIDs and DNs.
A policy value that cannot be read raises Unreadable: the caller fails closed."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn

# Active Directory constants (MS-ADTS 2.2.16, MS-ADA3). PASSWORD_EXPIRED appears only in the
# computed msDS-User-Account-Control-Computed (Samba 4.17 sets it too, also for pwdLastSet 0).
UF_ACCOUNTDISABLE = 0x0002
UF_LOCKOUT = 0x0010
UF_PASSWORD_EXPIRED = 0x800000
FILETIME_NEVER = (0, 0x7FFFFFFFFFFFFFFF)

# How much of an unreadable value an error shows (values are not secret, but may be long).
SHOWN_VALUE_CHARS = 40

# OpenLDAP ppolicy: pwdAccountLockedTime set to this value means "locked by an administrator
# until unlocked" (slapo-ppolicy(5)); we call that disabled.
PPOLICY_ADMIN_LOCK = "000001010000Z"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FILETIME_EPOCH = datetime(1601, 1, 1, tzinfo=UTC)
_GENERALIZED_TIME_RE = re.compile(
    r"^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})?(\d{2})?(?:[.,](\d+))?(Z|[+-]\d{2}(?:\d{2})?)$"
)

_INTEGER_RE = re.compile(r"-?[0-9]+")

_FILETIME_ATTRIBUTES = frozenset(
    {"accountexpires", "pwdlastset", "lockouttime", "lastlogontimestamp", "badpasswordtime"}
)
_DAYS_ATTRIBUTES = frozenset({"shadowexpire", "shadowlastchange"})


class Unreadable(ValueError):
    """An attribute value that is not what its attribute holds: a decision on it fails closed."""

    def __init__(self, attribute: str, value: str, expected: str) -> None:
        shown = value if len(value) <= SHOWN_VALUE_CHARS else value[:SHOWN_VALUE_CHARS] + "..."
        super().__init__(f"{attribute} {shown!r} is not {expected}")
        self.attribute = attribute


# --- times -----------------------------------------------------------------------------------


def filetime_to_datetime(value: int) -> datetime | None:
    """An AD FILETIME (100 ns since 1601-01-01 UTC) as a UTC datetime; None for 0 and 'never'."""
    if value in FILETIME_NEVER or value < 0:
        return None
    try:
        return _FILETIME_EPOCH + timedelta(microseconds=value // 10)
    except OverflowError:
        return None  # beyond year 9999: never, for our purposes


def parse_generalized_time(text: str) -> datetime | None:
    """RFC 4517 §3.3.13 GeneralizedTime ("20240131120000Z", with optional minutes, seconds,
    fraction and offset) as a UTC datetime; None if malformed."""
    match = _GENERALIZED_TIME_RE.match(text.strip())
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        result = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute or 0),
            int(second or 0),
            tzinfo=UTC,
        )
    except ValueError:
        return None
    if fraction:
        result += timedelta(microseconds=round(float("0." + fraction) * 1_000_000))
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[3:5] or 0))
        result -= sign * offset
    return result


def days_to_datetime(value: int) -> datetime | None:
    """shadowExpire / shadowLastChange: days since 1970-01-01; -1 means never."""
    if value < 0:
        return None
    try:
        return _EPOCH + timedelta(days=value)
    except OverflowError:
        return None


def attribute_time(attribute: str, raw: str) -> datetime | None:
    """A time attribute's value, in the encoding its name implies (FILETIME for AD's, days for
    the shadow ones, GeneralizedTime otherwise); None for never. Raises Unreadable for
    anything else, a negative FILETIME or a day count below -1 included."""
    name = attribute.lower()
    if name in _FILETIME_ATTRIBUTES:
        value = read_int(attribute, raw, "a FILETIME (100 ns intervals since 1601)")
        if value < 0:
            raise Unreadable(attribute, raw, "a FILETIME (100 ns intervals since 1601)")
        return filetime_to_datetime(value)
    if name in _DAYS_ATTRIBUTES:
        value = read_int(attribute, raw, "a number of days since 1970 (or -1)")
        if value < -1:
            raise Unreadable(attribute, raw, "a number of days since 1970 (or -1)")
        return days_to_datetime(value)
    moment = parse_generalized_time(raw)
    if moment is None:
        raise Unreadable(attribute, raw, "a GeneralizedTime like 20240131120000Z")
    return moment


# --- numbers and ids -------------------------------------------------------------------------


def parse_int(text: str) -> int | None:
    """An integer attribute value (userAccountControl, pwdLockoutDuration…); None if it is not."""
    try:
        return int(text)
    except ValueError:
        return None


def read_int(attribute: str, raw: str, expected: str = "an integer") -> int:
    """An integer attribute value (flags, counts, FILETIMEs); raises Unreadable if it is not."""
    if not _INTEGER_RE.fullmatch(raw):  # RFC 4517 §3.3.16; int() would take " +1_0" too
        raise Unreadable(attribute, raw, expected)
    return int(raw)


def guid_to_str(raw: bytes) -> str:
    """An objectGUID (16 bytes, the first three fields little-endian) as its usual string."""
    return str(uuid.UUID(bytes_le=raw))


# --- DNs -------------------------------------------------------------------------------------


def normalize_dn(dn: str) -> str:
    """A DN folded for comparison: attribute types and values lower-cased, spaces trimmed."""
    try:
        parts = parse_dn(dn, strip=True)
    except (LDAPException, ValueError, IndexError):
        return dn.strip().lower()
    return ",".join(f"{a.strip().lower()}={v.strip().lower()}" for a, v, _ in parts)


def rdn_value(dn: str) -> str:
    """The value of a DN's first RDN, unescaped: a group's name from its DN."""
    try:
        parts = parse_dn(dn, strip=True)
    except (LDAPException, ValueError, IndexError):
        return dn
    if not parts:
        return dn
    value = parts[0][1]
    out = bytearray()
    i = 0
    while i < len(value):  # RFC 4514 §3: \ followed by a special character or two hex digits
        if value[i] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        elif value[i] == "\\" and i + 1 < len(value):
            out += value[i + 1].encode("utf-8")
            i += 2
        else:
            out += value[i].encode("utf-8")
            i += 1
    return out.decode("utf-8", "replace")


def looks_like_dn(text: str) -> bool:
    if "=" not in text:
        return False
    try:
        return bool(parse_dn(text, strip=True))
    except (LDAPException, ValueError, IndexError):
        return False
