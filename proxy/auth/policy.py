"""Account policy: may this account use app passwords at all? Each refusal carries a reason."""

from __future__ import annotations

from proxy.config import PolicySettings
from proxy.directory.account import Account


def account_refusal(account: Account, policy: PolicySettings) -> str | None:
    """Why this account may not sign in with an app password, or None if it may."""
    if not account.enabled:
        return f"account {account.disabled_reason or 'disabled'}"
    if not account.legacy_allowed:
        group = policy.legacy_group or "the legacy sign-in filter"
        return f"account not allowed legacy sign-in (not a member of {group})"
    if policy.require_mfa and not account.mfa:
        return "account has no second factor and policy.require_mfa is on"
    return None
