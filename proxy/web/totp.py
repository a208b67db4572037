"""The portal's second factor: TOTP (RFC 6238) secrets, their QR code (drawn here, as SVG: no
outside service ever sees a secret), checking a typed code to the time step it belongs to (the
store refuses a step used before: no replay), and recovery codes. Pure: no store, no clock of
its own.
"""

from __future__ import annotations

import hmac
import secrets

import pyotp
import segno

# RFC 6238's defaults, which every authenticator app supports: SHA-1, 6 digits, 30 s steps.
STEP_SECONDS = 30
DIGITS = 6
# Codes from one step before or after the current one count too (RFC 6238 §5.2: at most one
# step of clock drift and transmission delay).
DRIFT_STEPS = 1

# Recovery codes shown once at enrolment, each good for one sign-in (GitHub, Google: 10).
RECOVERY_CODES = 10
# 10 characters from 31 letters and digits that cannot be mistaken for each other: 49 bits,
# kept only as SHA-256 digests (proxy/web/records.py); shown as two groups of five.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
RECOVERY_LENGTH = 10


def new_secret() -> str:
    """A base32 secret of 160 bits (RFC 4226 §4 recommends 160)."""
    return pyotp.random_base32(32)


def grouped_secret(secret: str) -> str:
    """The secret as a person types it into an app: groups of four."""
    return " ".join(secret[i : i + 4] for i in range(0, len(secret), 4))


def provisioning_uri(secret: str, login: str, issuer: str) -> str:
    """The otpauth:// URI authenticator apps read from the QR code."""
    return pyotp.TOTP(secret).provisioning_uri(name=login, issuer_name=issuer)


def qr_data_uri(uri: str) -> str:
    """The QR code of `uri` as an SVG data: URI for an <img> (the CSP allows img-src data:)."""
    code = segno.make(uri, error="m")
    return code.svg_data_uri(scale=5, border=2, dark="#000", light="#fff")


def matching_step(secret: str, typed: str, now: float) -> int | None:
    """The time step whose code was typed (within DRIFT_STEPS), or None."""
    digits = "".join(typed.split())
    if len(digits) != DIGITS or not digits.isascii() or not digits.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now // STEP_SECONDS)
    for step in range(current - DRIFT_STEPS, current + DRIFT_STEPS + 1):
        if hmac.compare_digest(totp.at(step * STEP_SECONDS), digits):
            return step
    return None


def new_recovery_codes() -> list[str]:
    codes = []
    for _ in range(RECOVERY_CODES):
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
        codes.append(f"{raw[:5]}-{raw[5:]}")
    return codes


def normal_recovery_code(typed: str) -> str | None:
    """A typed recovery code in its one spelling (case, spaces and dashes ignored), or None
    if it cannot be one."""
    raw = "".join(c for c in typed.lower() if c not in " -\t")
    if len(raw) != RECOVERY_LENGTH or any(c not in RECOVERY_ALPHABET for c in raw):
        return None
    return f"{raw[:5]}-{raw[5:]}"


def issuer_label(public_url: str | None, hostname: str) -> str:
    """What the authenticator app shows above the codes: the portal's host."""
    host = (public_url or "").split("://", 1)[-1].split("/", 1)[0] or hostname
    return f"apppass ({host.replace(':', ' ')})"  # a colon would split issuer and account
