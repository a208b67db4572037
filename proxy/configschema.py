"""A small validating reader for YAML config trees: every mistake names the key path, the rule
and the value, unknown keys get a did-you-mean, and all mistakes are collected before failing."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import json
import os
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

# The default of a key that must be given (Node.get reports it as "is required" when absent).
REQUIRED: Any = object()
_MISSING = REQUIRED


class Invalid(Exception):
    """A value broke a rule; the message says the rule ("must be an integer >= 1")."""


class ConfigError(Exception):
    """The config has mistakes; `problems` lists each as `file: key.path: what is wrong`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def show(value: Any) -> str:
    """A value as the user typed it, short, for an error message."""
    if isinstance(value, (dict, list)):
        text = json.dumps(value, default=str)
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Context:
    """Where the config came from and what is wrong with it so far."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(
            f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}"
        )

    def check(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


class Node:
    """One mapping of the config tree. Reads keys with rules; `finish()` reports unknown keys."""

    def __init__(self, ctx: Context, path: str, data: dict) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, rule: Callable[[Node, str, Any], Any], default: Any = _MISSING) -> Any:
        """The value of `key` checked by `rule`; `default` when absent (or an error if required)."""
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            if default is _MISSING:
                self.ctx.error(self.key_path(key), "is required")
                return None
            return default
        try:
            return rule(self, key, value)
        except Invalid as exc:
            self.ctx.error(self.key_path(key), f"{exc} (got {show(value)})")
            return None if default is _MISSING else default

    def node(self, key: str, required: bool = False) -> Node | None:
        """A nested mapping, or None if absent (an error if required or not a mapping)."""
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                self.ctx.error(self.key_path(key), "is required")
            return None
        if not isinstance(value, dict):
            self.ctx.error(self.key_path(key), f"must be a mapping (got {show(value)})")
            return None
        return Node(self.ctx, self.key_path(key), value)

    def nodes(self, key: str) -> list[Node]:
        """A list of mappings (e.g. listeners), each with its index in the path."""
        self._used.add(key)
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.ctx.error(self.key_path(key), f"must be a list (got {show(value)})")
            return []
        out = []
        for i, item in enumerate(value):
            path = f"{self.key_path(key)}[{i}]"
            if isinstance(item, dict):
                out.append(Node(self.ctx, path, item))
            else:
                self.ctx.error(path, f"must be a mapping (got {show(item)})")
        return out

    def one_of_keys(self, choices: tuple[str, ...]) -> str | None:
        """For mappings like `store: {sqlite: PATH}`: exactly one of `choices` must be set."""
        present = [k for k in self.data if k in choices]
        if len(present) != 1:
            self.ctx.error(
                self.path, f"must set exactly one of {', '.join(choices)} (got {show(self.data)})"
            )
            self._used.update(self.data)
            return None
        return present[0]

    def finish(self) -> None:
        """Report keys nobody read, with a did-you-mean among those that were read."""
        for key in self.data:
            if key in self._used:
                continue
            hint = difflib.get_close_matches(str(key), sorted(self._used), n=1, cutoff=0.6)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            known = (
                f" (known keys: {', '.join(sorted(self._used))})" if not hint and self._used else ""
            )
            self.ctx.error(self.key_path(str(key)), f"unknown key{extra}{known}")


# --- rules: (node, key, value) -> parsed value, or raise Invalid ---------------------------------


def text(node: Node, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a non-empty string")
    return value


def boolean(node: Node, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("must be true or false")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable:
    def rule(node: Node, key: str, value: Any) -> int:
        bounds = []
        if minimum is not None:
            bounds.append(f">= {minimum}")
        if maximum is not None:
            bounds.append(f"<= {maximum}")
        wording = "must be an integer" + (" " + " and ".join(bounds) if bounds else "")
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(wording)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise Invalid(wording)
        return value

    return rule


def choice(*options: str) -> Callable:
    def rule(node: Node, key: str, value: Any) -> str:
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}")
        return value

    return rule


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([smhdw])")


def parse_duration(value: Any, allow_never: bool = False) -> timedelta | None:
    """`90d`, `12h`, `1h30m`, `45s`, `2w` (or an integer of seconds); `never` gives None."""
    if isinstance(value, bool):
        raise Invalid("must be a duration like 30s, 15m, 12h, 90d")
    if isinstance(value, int) and value >= 0:
        return timedelta(seconds=value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s == "never":
            if allow_never:
                return None
            raise Invalid("must be a duration like 30s, 15m, 12h, 90d (never is not allowed here)")
        if s and _DURATION.sub("", s) == "":
            total = sum(int(n) * _UNITS[u] for n, u in _DURATION.findall(s))
            if total <= 10**10:
                return timedelta(seconds=total)
    raise Invalid(
        "must be a duration like 30s, 15m, 12h, 90d" + (" or never" if allow_never else "")
    )


def duration(allow_never: bool = False, minimum: timedelta = timedelta(0)) -> Callable:
    def rule(node: Node, key: str, value: Any) -> timedelta | None:
        parsed = parse_duration(value, allow_never)
        if parsed is not None and parsed < minimum:
            raise Invalid(f"must be at least {int(minimum.total_seconds())}s")
        return parsed

    return rule


def parse_expiry(value: str, now: datetime) -> datetime | None:
    """A code's expiry: a duration from now (`90d`), a date (`2027-06-30`, end of that day UTC)
    or `never` (None)."""
    if isinstance(value, (date, datetime)):
        value = value.isoformat()
    s = str(value).strip()
    try:
        day = date.fromisoformat(s)
    except ValueError:
        pass
    else:
        return datetime(day.year, day.month, day.day, 23, 59, 59, tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(s)
    except ValueError:
        delta = parse_duration(s, allow_never=True)
        return None if delta is None else now + delta
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def path(node: Node, key: str, value: Any) -> Path:
    """A file path; relative paths are relative to the config file's folder."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("must be a file path")
    p = Path(value).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else node.ctx.base_dir / p))


def existing_file(node: Node, key: str, value: Any) -> Path:
    p = path(node, key, value)
    if not p.is_file():
        raise Invalid(f"file not found: {p}")
    return p


def secret_file(node: Node, key: str, value: Any) -> str:
    """Read a secret from a file (`*_file` keys). Its content is never shown in an error."""
    p = path(node, key, value)
    try:
        secret = p.read_text(encoding="utf-8").strip("\r\n")
    except FileNotFoundError:
        raise Invalid(f"file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise Invalid(
            f"cannot read {p}: {getattr(exc, 'strerror', None) or 'not UTF-8 text'}"
        ) from None
    if not secret:
        raise Invalid(f"file is empty: {p}")
    return secret


def network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise Invalid("must be an IP network like 10.0.0.0/8 or 2001:db8::/32") from None


def networks(node: Node, key: str, value: Any) -> tuple:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        try:
            out.append(network(item))
        except Invalid:
            raise Invalid(
                f"must be a list of IP networks like 10.0.0.0/8; {show(item)} is not one"
            ) from None
    return tuple(out)


def host_port(node: Node, key: str, value: Any) -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT` or `:PORT` (all addresses)."""
    s = str(value).strip()
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", s)
    if not m:
        raise Invalid('must be "HOST:PORT", e.g. "127.0.0.1:1143" or "[::]:993"')
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 0 < int(port) < 65536:
        raise Invalid("port must be between 1 and 65535")
    return host or "0.0.0.0", int(port)


def list_of(options: tuple[str, ...]) -> Callable:
    """A list of words from `options` (a comma-separated string also works)."""

    def rule(node: Node, key: str, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) and not isinstance(items, tuple):
            raise Invalid(f"must be a list of {', '.join(options)}")
        out = []
        for item in items:
            word = str(item).strip().lower()
            if word not in options:
                raise Invalid(f"must be a list of {', '.join(options)}; {show(item)} is not one")
            if word not in out:
                out.append(word)
        if not out:
            raise Invalid(f"must name at least one of {', '.join(options)}")
        return tuple(out)

    return rule


def text_list(node: Node, key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise Invalid("must be a list of non-empty strings")
    return tuple(items)


# --- settings dataclasses read from nodes -----------------------------------------------------

T = TypeVar("T")
E = TypeVar("E", bound=enum.StrEnum)
Rule = Callable[[Node, str, Any], Any]


def default_of(cls: type, name: str) -> Any:
    """The default a settings dataclass declares for a field (the one place it is written), or
    REQUIRED when it declares none."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED if f.default is dataclasses.MISSING else f.default


def read_settings_of(node: Node, cls: type[T], rules: dict[str, Rule], **fixed: Any) -> T:
    """Settings of type `cls` from a node: each key checked by its rule, defaults from `cls`."""
    values = {key: node.get(key, rule, default_of(cls, key)) for key, rule in rules.items()}
    return cls(**values, **fixed)


def section(root: Node, key: str, cls: type[T], rules: dict[str, Rule]) -> T:
    node = root.node(key)
    if node is None:
        return cls()
    out = read_settings_of(node, cls, rules)
    node.finish()
    return out


def enum_rule(kind: type[E], options: tuple[E, ...] | None = None) -> Rule:
    """A rule accepting the values of a str enum (or some of them)."""
    names = tuple(str(o) for o in (options or tuple(kind)))
    check = choice(*names)
    return lambda node, key, value: kind(check(node, key, value))
