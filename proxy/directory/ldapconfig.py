"""`directory: {ldap: {...}}` in apppass.yaml -> LdapSettings, with the config's error style."""

from __future__ import annotations

from typing import Any

from proxy.configschema import Invalid, Node, boolean, choice, duration, existing_file, integer, text, text_list


def _seconds(node: Node, key: str, value: Any) -> float:
    return duration()(node, key, value).total_seconds()


def _optional_text(node: Node, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("must be a string")
    return value


def _uris(node: Node, key: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str) or not item.lower().startswith(("ldap://", "ldaps://")):
            raise Invalid("must be a list of ldap:// or ldaps:// URIs")
    return tuple(items)


# key -> rule; keys match LdapSettings fields one to one (see proxy/directory/ldap.py).
RULES = {
    "uris": _uris, "start_tls": boolean, "ca_file": lambda n, k, v: str(existing_file(n, k, v)),
    "bind_dn": _optional_text, "bind_password_file": lambda n, k, v: str(existing_file(n, k, v)),
    "base_dn": text, "user_filter": text, "login_attributes": text_list,
    "short_name_attribute": _optional_text, "netbios_domains": text_list, "dns_domains": text_list,
    "discover_domains": boolean, "id_attribute": text, "id_format": choice("text", "guid"),
    "upstream_identity_attribute": text, "display_name_attribute": _optional_text,
    "group_membership": choice("memberof", "search"), "member_of_attribute": text,
    "group_base_dn": _optional_text, "group_object_filter": text, "group_member_filter": text,
    "group_name_attribute": text, "nested_groups": boolean, "disabled_filter": _optional_text,
    "account_control_attribute": _optional_text, "computed_account_control_attribute": _optional_text,
    "locked_time_attribute": _optional_text, "password_policy_dn": _optional_text,
    "expiry_attributes": text_list, "password_changed_attribute": _optional_text,
    "connect_timeout": _seconds, "timeout": _seconds, "retry_after": _seconds, "idle_timeout": _seconds,
    "cache_ttl": _seconds, "negative_cache_ttl": _seconds,
    "pool_size": integer(1, 256), "page_size": integer(1, 100000),
}

_MISSING = object()


def ldap_settings(node: Node):
    from proxy.directory.ldap import LdapSettings

    preset = node.get("preset", choice("openldap", "active_directory"), "openldap")
    for required in ("uris", "base_dn"):
        if not node.has(required):
            node.ctx.error(node.key_path(required), "is required")
    values = {}
    for key, rule in RULES.items():
        value = node.get(key, rule, _MISSING)
        if value is not _MISSING and value is not None:
            values[key] = value
    if values.get("bind_dn") and "bind_password_file" not in values and not node.has("bind_password_file"):
        node.ctx.error(node.key_path("bind_password_file"), "is required when bind_dn is set")
    if node.ctx.problems:
        return None
    try:
        return LdapSettings.preset(preset, **values)
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        node.ctx.error(node.key_path(field) if field in RULES else node.path, message or str(exc))
        return None
