"""The `apppass` command: serve, demo, migrate, check-config, codes …, directory check, users
hash-password, tokens …, notify."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from proxy import codeopts
from proxy.cliformat import fmt_time as _fmt_time
from proxy.cliformat import notes as _notes
from proxy.cliformat import record_json as _record_json
from proxy.cliformat import sending as _sending
from proxy.cliformat import table as _table
from proxy.config import SCOPES, ConfigError, Settings, config_path, load
from proxy.configschema import Invalid, parse_duration, parse_expiry

if TYPE_CHECKING:  # opened lazily, by the commands that need them
    from proxy.codes.store import SqlCodeStore
    from proxy.directory.account import Directory

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments: exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits with 2 too; keep one message style
        raise UsageError(message)


def _scopes(value: str) -> tuple[str, ...]:
    words = [w.strip().lower() for w in value.split(",") if w.strip()]
    bad = [w for w in words if w not in SCOPES]
    if bad or not words:
        raise UsageError(
            f"invalid scope {bad[0] if bad else value!r}: use a comma-separated list of "
            f"{', '.join(SCOPES)}"
        )
    return tuple(dict.fromkeys(words))


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise UsageError(
            f"invalid CIDR {value!r}: use a network like 10.0.4.0/24 or 2001:db8::/48"
        ) from None


def _expiry(value: str) -> datetime | None:
    try:
        moment = parse_expiry(value, datetime.now(UTC).replace(microsecond=0))
    except Invalid:
        raise UsageError(
            f"invalid expiry {value!r}: use a duration like 90d or 12h, a date like "
            f"2027-06-30, or never"
        ) from None
    if moment is not None and moment <= datetime.now(UTC):
        raise UsageError(f"invalid expiry {value!r}: it is in the past")
    return moment


def _duration(value: str):
    try:
        return parse_duration(value)
    except Invalid:
        raise UsageError(
            f"invalid duration {value!r}: use a duration like 30d, 12h or 15m"
        ) from None


class _Context:
    """Lazily opened config, directory, store and hasher for one command."""

    def __init__(self, args) -> None:
        self.args = args
        self._settings: Settings | None = None
        self._store: SqlCodeStore | None = None
        self._directory: Directory | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load(config_path(self.args.config))
        return self._settings

    @property
    def store(self) -> SqlCodeStore:
        if self._store is None:
            from proxy.codes.open import open_store

            self._store = open_store(self.settings.store)
        return self._store

    @property
    def directory(self) -> Directory:
        if self._directory is None:
            from proxy.directory.open import open_directory

            self._directory = open_directory(self.settings.directory, self.settings.policy)
        return self._directory

    def hasher(self):
        from proxy.codes.hashing import CodeHasher

        return CodeHasher(self.settings.codes.argon2)

    def manager(self):
        """The one service layer (proxy/manage.py) the portal and the API use too; changes are
        audited when audit.file is a file."""
        from proxy.audit import Audit
        from proxy.manage import Manager

        audit_file = self.settings.audit.file
        audit = Audit(path=audit_file) if audit_file != "-" else None
        directory = _OpenedWhenUsed(lambda: self.directory)  # revoking by id needs none
        return Manager(self.settings, directory, self.store, self.hasher(), audit)

    def actor(self, name: str | None = None):
        """The CLI as a Manager actor: named after the user running it (or --created-by)."""
        import getpass

        from proxy.manage import Actor

        if name is None:
            try:
                name = getpass.getuser()
            except (KeyError, OSError):
                name = "unknown"
        return Actor("cli", name)

    def code(self, code_id: int):
        return self.manager().code(self.actor(), code_id)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if self._directory is not None:
            self._directory.close()


class _OpenedWhenUsed:
    """Stands for an object that is opened only when first used (a broken users file must not
    stop `codes revoke ID`)."""

    def __init__(self, open_: Callable[[], Any]) -> None:
        self._open = open_

    def __getattr__(self, name: str) -> Any:
        return getattr(self._open(), name)


class _Refused(Exception):
    """Refused or not found: exit code 1."""


def _checked_directory(ctx: _Context) -> Directory:
    """The directory; a broken users file also says what a running proxy does about it."""
    try:
        return ctx.directory
    except ConfigError as exc:
        if (users := ctx.settings.directory.static_file) is None:
            raise
        from proxy.directory.static import STILL_SERVING

        raise ConfigError([*exc.problems, f"{users}: {STILL_SERVING}"]) from None


def _print(text: str = "") -> None:
    sys.stdout.write(text + "\n")


# -- commands ---------------------------------------------------------------------------------


def cmd_check_config(ctx: _Context) -> int:
    """Validate the file, then open what it names: the users file and the TLS certificates."""
    s = ctx.settings
    from proxy.tls import ServerTLS, TLSConfigError

    _checked_directory(ctx)
    problems = []
    for i, listener in enumerate(s.listeners):
        if listener.tls != "none":
            try:
                ServerTLS(str(listener.cert_file), str(listener.key_file), listener.min_tls)
            except TLSConfigError as exc:
                problems.append(f"{s.source.name}: listeners[{i}]: {exc}")
    if problems:
        raise ConfigError(problems)
    from proxy.exposure import clear_text_warnings

    for warning in clear_text_warnings(s):  # allowed, but said (README, "No clear text …")
        sys.stderr.write(f"{s.source.name}: warning: {warning}\n")
    _print(
        f"{s.source}: ok ({len(s.listeners)} listeners, store {s.store.kind}, "
        f"directory {s.directory.kind})"
    )
    return EXIT_OK


def cmd_migrate(ctx: _Context) -> int:
    before, after = ctx.store.migrate()
    _print(
        f"store schema at version {after}"
        + (f" (was {before})" if before != after else " (up to date)")
    )
    return EXIT_OK


def cmd_codes_create(ctx: _Context) -> int:
    from proxy.manage import CodeRequest

    a = ctx.args
    scopes = _scopes(a.scope) if a.scope else None
    nets = tuple(_network(n) for n in a.net or ())
    if a.max_uses is not None and a.max_uses < 1:
        raise UsageError("--max-uses must be a whole number >= 1")
    expires = _expiry(a.expires) if a.expires is not None else None
    manager = ctx.manager()
    never = a.expires is not None and expires is None  # `--expires never`
    request = CodeRequest(
        a.label, scopes, expires, a.max_uses, nets, never, **codeopts.request_fields(a)
    )
    issued = manager.create(ctx.actor(a.created_by), manager.account(a.login), request)
    rec = issued.record
    if a.json:
        _print(json.dumps({**_record_json(rec), "code": issued.code.grouped()}, indent=2))
        return EXIT_OK
    _print(f"App password {rec.id} for {rec.account_login} ({rec.label}):")
    _print()
    _print(f"    {issued.code.grouped()}")
    _print()
    _print(
        f"Scopes: {', '.join(rec.scopes)}; "
        f"expires: {_fmt_time(rec.expires_at) if rec.expires_at else 'never'}"
        + (f"; max uses: {rec.max_uses}" if rec.max_uses else "")
        + (f"; networks: {' '.join(rec.networks)}" if rec.networks else "")
    )
    if (policy := _sending(rec)) is not None:
        _print(f"It {policy}; custodian: {rec.custodian or '-'}")
    _print("Enter it as the password on the device. It will not be shown again.")
    return EXIT_OK


def _account_key(ctx: _Context, login: str | None, key: str | None) -> tuple[str, str] | None:
    """(account key, how to name it) for a LOGIN (resolved now) or a --key; None for neither."""
    if login and key:
        raise UsageError("give a LOGIN or --key KEY, not both")
    if not login:
        return (key, f"account key {key!r}") if key else None
    from proxy.codes.issue import Refused, resolve

    try:
        account = resolve(ctx.directory, login)
        return account.key, account.login
    except Refused as exc:
        raise _Refused(
            f"{exc} (`apppass codes list` shows the codes of a gone account as orphaned; "
            "--key KEY names them)"
        ) from None


def cmd_codes_list(ctx: _Context) -> int:
    a = ctx.args
    chosen = _account_key(ctx, a.login, a.key)
    key = chosen[0] if chosen else None
    records = ctx.manager().all_codes(ctx.actor(), key, include_inactive=a.all, stale=a.stale)
    from proxy.directory.account import DirectoryUnavailable
    from proxy.directory.orphans import orphan_notes, orphaned_keys

    try:
        orphaned = orphaned_keys(ctx.directory, (r.account_key for r in records))
    except (DirectoryUnavailable, ConfigError) as exc:  # the codes are still worth listing
        why = exc.problems[0] if isinstance(exc, ConfigError) else f"directory unavailable: {exc}"
        sys.stderr.write(f"apppass: orphaned codes not marked: {why}\n")
        orphaned = set()
    if a.json:
        listed = [{**_record_json(r), "orphaned": r.account_key in orphaned} for r in records]
        _print(json.dumps(listed, indent=2))
    elif records:
        _print(_table(records, orphaned))
        for note in [*orphan_notes(records, orphaned), *_notes(records)]:
            _print(f"\n{note}")
    else:
        _print(
            "no codes"
            + (" that a device still tries" if a.stale else "")
            + ("" if a.all or a.stale else " (--all includes revoked, expired and used-up codes)")
        )
    return EXIT_OK


def cmd_codes_show(ctx: _Context) -> int:
    rec = ctx.code(ctx.args.id)
    data = _record_json(rec)
    if ctx.args.json:
        _print(json.dumps(data, indent=2))
        return EXIT_OK
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, list):
            v = ", ".join(v) or "-"
        _print(f"{k.ljust(width)}  {'-' if v is None else v}")
    return EXIT_OK


def cmd_codes_toggle(ctx: _Context) -> int:
    disable = ctx.args.action == "disable"
    rec = ctx.manager().set_disabled(ctx.actor(), ctx.args.id, disable)
    _print(
        f"code {rec.id} ({rec.account_login}, {rec.label}) {'disabled' if disable else 'enabled'}"
    )
    return EXIT_OK


def cmd_codes_sending(ctx: _Context) -> int:
    change = codeopts.sending_change(ctx.args)
    if change is None:
        raise UsageError(
            "give the new policy (--mail-from, --rcpt-domain, --max-messages-per-day) or --none"
            " to lift it, not both"
        )
    rec = ctx.manager().set_sending(ctx.actor(), ctx.args.id, change)
    policy = _sending(rec) or "sends as anyone, to anyone, without a daily cap"
    _print(f"code {rec.id} ({rec.account_login}, {rec.label}) {policy}")
    return EXIT_OK


def cmd_codes_custodian(ctx: _Context) -> int:
    a = ctx.args
    if (a.address is None) != a.none:
        raise UsageError("give the custodian's ADDRESS, or --none for the account only")
    rec = ctx.manager().set_custodian(ctx.actor(), a.id, a.address)
    who = f"also to {rec.custodian}" if rec.custodian else "to the account only"
    _print(f"code {rec.id} ({rec.account_login}, {rec.label}): notices {who}")
    return EXIT_OK


def cmd_codes_revoke(ctx: _Context) -> int:
    rec = ctx.manager().revoke(ctx.actor(), ctx.args.id)
    _print(f"code {rec.id} ({rec.account_login}, {rec.label}) revoked")
    return EXIT_OK


def cmd_codes_revoke_all(ctx: _Context) -> int:
    a = ctx.args
    chosen = _account_key(ctx, a.login, a.key)
    if chosen is None:
        raise UsageError("give a LOGIN, or --key KEY for an account the directory no longer has")
    n = ctx.manager().revoke_all(ctx.actor(), chosen[0])
    _print(f"revoked {n} code{'s' if n != 1 else ''} of {chosen[1]}")
    return EXIT_OK


def cmd_codes_purge(ctx: _Context) -> int:
    age = _duration(ctx.args.older_than)
    n = ctx.store.purge(datetime.now(UTC) - age)
    _print(
        f"purged {n} revoked, expired or used-up code{'s' if n != 1 else ''} "
        f"older than {ctx.args.older_than}"
    )
    return EXIT_OK


def cmd_directory_check(ctx: _Context) -> int:
    """The account and the same verdicts the portal and the API give (proxy/manage.py)."""
    account = _checked_directory(ctx).lookup(ctx.args.login)
    if account is None:
        raise _Refused(f"unknown login {ctx.args.login!r}")
    p = ctx.settings.policy
    check = ctx.manager().check(account)
    identity = account.upstream_identity
    problem = next(v for v in check.verdicts if v.check == "identity").ok is False
    refusal = check.refusal
    changed = _fmt_time(account.password_changed_at)
    if account.extra.get("password_must_change"):  # AD pwdLastSet 0 (ldap/state.py)
        changed += " (must change at next logon: counts as now)"
    lines = [
        ("login", account.login),
        ("stable id", account.key),
        ("upstream identity", f"{identity!r} (unusable)" if problem else identity),
        ("names", ", ".join(account.names) or "-"),
        ("source", account.dn or "-"),
        ("groups", ", ".join(account.groups) or "-"),
        ("enabled", "yes" if account.enabled else f"no ({account.disabled_reason or 'disabled'})"),
        (
            "legacy sign-in",
            "allowed"
            if account.legacy_allowed
            else f"not allowed (not in {p.legacy_group or 'the legacy filter'})",
        ),
        (
            "second factor",
            ("yes" if account.mfa else "no") + (" (required)" if p.require_mfa else ""),
        ),
        ("password changed", changed),
        ("verdict", "may use app passwords" if refusal is None else f"refused: {refusal}"),
    ]
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        _print(f"{k.ljust(width)}  {v}")
    return EXIT_OK if refusal is None else EXIT_REFUSED


def cmd_serve(ctx: _Context) -> int:
    from proxy.workers import serve_or_supervise  # serve.workers: one process, or a supervisor

    return serve_or_supervise(ctx.settings, ctx.args)


def cmd_demo(ctx: _Context) -> int:
    from proxy.demo.run import run_demo

    return run_demo(ctx.args)


def cmd_users_hash_password(ctx: _Context) -> int:
    """A users file's `password_hash` (the portal sign-in); the password comes from the terminal
    (asked twice) or the first line of standard input, never from the command line."""
    import getpass

    from proxy.directory.passwords import MAX_PASSWORD, hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password or len(password) > MAX_PASSWORD:
        raise UsageError(f"a password is 1 to {MAX_PASSWORD} characters")
    _print(hash_password(password))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="apppass", description="App-password authentication proxy for legacy mail clients."
    )
    p.add_argument(
        "-c",
        "--config",
        help="config file (default: $APPPASS_CONFIG, else /etc/apppass/apppass.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sv = sub.add_parser("serve", help="run the configured listeners")
    sv.set_defaults(fn=cmd_serve)
    for option in ("--worker", "--workers", "--link"):  # given by the supervisor to a worker
        sv.add_argument(option, type=int, default=None, help=argparse.SUPPRESS)
    sv.add_argument("--listen", action="append", default=[], help=argparse.SUPPRESS)
    d = sub.add_parser("demo", help="run a ready demo: SQLite, a demo user, a sandbox upstream")
    d.add_argument(
        "--dir", default="var/demo", help="where the demo keeps its files (default: var/demo)"
    )
    from proxy.demo.run import PORTS, WEB_PORT

    for protocol, port in PORTS.items():
        d.add_argument(
            f"--{protocol}-port",
            type=int,
            default=port,
            metavar="PORT",
            help=f"{protocol.upper()} port on 127.0.0.1 (default: {port})",
        )
    d.add_argument(
        "--web-port",
        type=int,
        default=WEB_PORT,
        metavar="PORT",
        help=f"the self-service portal's port on 127.0.0.1 (default: {WEB_PORT})",
    )
    d.set_defaults(fn=cmd_demo)
    sub.add_parser("migrate", help="bring the store's schema up to date").set_defaults(
        fn=cmd_migrate
    )
    sub.add_parser("check-config", help="validate the config and exit").set_defaults(
        fn=cmd_check_config
    )

    codes = sub.add_parser("codes", help="manage app passwords").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    codeopts.add_create_command(codes).set_defaults(fn=cmd_codes_create)
    ls = codes.add_parser("list", help="list codes")
    ls.add_argument("login", nargs="?")
    ls.add_argument("--key", help="only the codes of this account key (also of a gone account)")
    ls.add_argument("--all", action="store_true", help="include revoked, expired and used-up codes")
    ls.add_argument("--stale", action="store_true", help="only codes a device still tries in vain")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=cmd_codes_list)
    sh = codes.add_parser("show", help="show one code's record")
    sh.add_argument("id", type=int)
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(fn=cmd_codes_show)
    for action, fn in (
        ("disable", cmd_codes_toggle),
        ("enable", cmd_codes_toggle),
        ("revoke", cmd_codes_revoke),
    ):
        x = codes.add_parser(action, help=f"{action} a code")
        x.add_argument("id", type=int)
        x.set_defaults(fn=fn)
    codeopts.add_sending_command(codes).set_defaults(fn=cmd_codes_sending)
    codeopts.add_custodian_command(codes).set_defaults(fn=cmd_codes_custodian)
    ra = codes.add_parser("revoke-all", help="revoke every code of an account")
    ra.add_argument("login", nargs="?")
    ra.add_argument("--key", help="the account key instead (for an account the directory lost)")
    ra.set_defaults(fn=cmd_codes_revoke_all)
    pu = codes.add_parser("purge", help="delete revoked, expired and used-up codes")
    pu.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d")
    pu.set_defaults(fn=cmd_codes_purge)

    directory = sub.add_parser("directory", help="inspect the directory").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    dc = directory.add_parser(
        "check", help="what the proxy sees for an account, with each policy verdict"
    )
    dc.add_argument("login")
    dc.set_defaults(fn=cmd_directory_check)

    from proxy.web.tokencli import cmd_tokens_create, cmd_tokens_list, cmd_tokens_revoke

    tokens = sub.add_parser("tokens", help="the admin API's bearer tokens").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    tc = tokens.add_parser("create", help="create a token and show it once")
    tc.add_argument("--label", required=True, help='who uses it, e.g. "helpdesk tool"')
    tc.add_argument("--read-only", action="store_true", help="may read, never change")
    tc.add_argument("--expires", type=_expiry, help="90d, 2027-06-30 or never (default: never)")
    tc.set_defaults(fn=cmd_tokens_create)
    tl = tokens.add_parser("list", help="list tokens: label, access, last use, state")
    tl.add_argument("--json", action="store_true")
    tl.set_defaults(fn=cmd_tokens_list)
    tr = tokens.add_parser("revoke", help="revoke a token: it stops working at once")
    tr.add_argument("id", type=int)
    tr.set_defaults(fn=cmd_tokens_revoke)

    from proxy.notify.run import add_notify

    add_notify(sub)
    users = sub.add_parser("users", help="the static users file").add_subparsers(
        dest="action", required=True, parser_class=_Parser
    )
    users.add_parser(
        "hash-password",
        help="print a password_hash for the portal (the password is read from the terminal or "
        "standard input)",
    ).set_defaults(fn=cmd_users_hash_password)
    return p


def main(argv: list[str] | None = None) -> int:
    from proxy.codes.store import StoreUnavailable
    from proxy.directory.account import DirectoryUnavailable
    from proxy.manage import ManageError

    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        sys.stderr.write(f"apppass: {exc}\n(see apppass --help)\n")
        return EXIT_USAGE
    ctx = _Context(args)
    try:
        return args.fn(ctx)
    except UsageError as exc:
        sys.stderr.write(f"apppass: {exc}\n")
        return EXIT_USAGE
    except ConfigError as exc:
        sys.stderr.write("\n".join(exc.problems) + "\n")
        return EXIT_USAGE
    except _Refused as exc:
        sys.stderr.write(f"apppass: {exc}\n")
        return EXIT_REFUSED
    except ManageError as exc:
        sys.stderr.write(f"apppass: {exc.message}\n")
        return EXIT_USAGE if exc.code == "invalid" else EXIT_REFUSED
    except (StoreUnavailable, DirectoryUnavailable) as exc:
        sys.stderr.write(f"apppass: temporary failure: {exc}\n")
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return 130
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
