"""Account policy: may this account use app passwords at all? Each refusal carries a reason."""

from __future__ import annotations

from proxy.config import PolicySettings
from proxy.directory.account import Account


def account_problems(account: Account, policy: PolicySettings) -> list[tuple[str, str]]:
    """Every reason this account may not sign in with an app password, as (check, reason), in
    the order they are reported; empty if it may. Checks: enabled, legacy, mfa."""
    problems = []
    if not account.enabled:
        problems.append(("enabled", f"account {account.disabled_reason or 'disabled'}"))
    if not account.legacy_allowed:
        group = policy.legacy_group or "the legacy sign-in filter"
        problems.append(("legacy", f"account not allowed legacy sign-in (not a member of {group})"))
    if policy.require_mfa and not account.mfa:
        problems.append(("mfa", "account has no second factor, which app passwords require here"))
    return problems


def account_refusal(account: Account, policy: PolicySettings) -> str | None:
    """Why this account may not sign in with an app password, or None if it may."""
    problems = account_problems(account, policy)
    return problems[0][1] if problems else None
