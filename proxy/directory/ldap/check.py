"""`directory check`: what the LDAP directory sees for a login, each policy verdict and why."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.directory.account import Account


@dataclass(frozen=True)
class Verdict:
    """One policy fact about an account and why."""

    name: str
    ok: bool
    reason: str


def verdicts(account: Account) -> tuple[Verdict, ...]:
    reasons = account.extra.get("reasons", {})
    return (
        Verdict(
            "enabled",
            account.enabled,
            account.disabled_reason
            + (": " if account.disabled_reason else "")
            + reasons.get("enabled", ""),
        ),
        Verdict("legacy sign-in", account.legacy_allowed, reasons.get("legacy", "")),
        Verdict("mfa", account.mfa, reasons.get("mfa", "")),
    )


@dataclass(frozen=True)
class CheckReport:
    """The result of `LdapDirectory.check`: data for the CLI, and lines to print."""

    login: str
    outcome: str  # found, not found, ambiguous, invalid, refused, unavailable
    reason: str = ""
    account: Account | None = None
    form: str = ""
    filter: str = ""
    server: str = ""
    verdicts: tuple[Verdict, ...] = ()
    elapsed: float = 0.0

    @property
    def found(self) -> bool:
        return self.account is not None

    @property
    def allowed(self) -> bool:
        """Found, enabled and allowed legacy sign-in (MFA is the policy layer's to judge)."""
        return self.account is not None and self.account.enabled and self.account.legacy_allowed

    def lines(self) -> list[str]:
        rows: list[tuple[str, str]] = [
            ("login", self.login),
            ("result", self.outcome + (f": {self.reason}" if self.reason else "")),
        ]
        if self.form:
            rows.append(("form", self.form))
        if self.filter:
            rows.append(("filter", self.filter))
        if self.server:
            rows.append(("server", self.server))
        a = self.account
        if a is not None:
            rows += [
                ("dn", a.dn),
                ("key", a.key),
                ("login name", a.login),
                ("upstream identity", a.upstream_identity or "(none)"),
                ("display name", a.display_name),
                ("names", ", ".join(a.names)),
                ("groups", ", ".join(a.groups) or "(none)"),
            ]
            for v in self.verdicts:
                rows.append(
                    (
                        v.name,
                        f"{'yes' if v.ok else 'no'} ({v.reason})"
                        if v.reason
                        else ("yes" if v.ok else "no"),
                    )
                )
            changed = a.password_changed_at.isoformat() if a.password_changed_at else "unknown"
            if a.extra.get("password_must_change"):
                changed += f" ({a.extra.get('reasons', {}).get('password', '')})"
            rows.append(("password changed", changed))
        rows.append(("time", f"{self.elapsed * 1000:.0f} ms"))
        width = max(len(k) for k, _ in rows)
        return [f"{k.ljust(width)}  {v}" for k, v in rows]

    def __str__(self) -> str:
        return "\n".join(self.lines())
