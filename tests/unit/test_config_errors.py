"""Config mistakes: each is reported with the key path, the rule and the value, all at once."""

import copy

import pytest

from proxy.config import ConfigError, load, parse


@pytest.fixture
def base(tmp_path):
    (tmp_path / "users.yaml").write_text(
        "accounts: {alice: {id: key-alice, groups: [legacy-mail]}}\n"
    )
    (tmp_path / "master").write_text("s3cret-master\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    return {
        "store": {"sqlite": "var/apppass.db"},
        "directory": {"static": "users.yaml"},
        "upstream": {
            "imap": {
                "host": "127.0.0.1",
                "port": 143,
                "master_user": "proxy",
                "master_password_file": "master",
            }
        },
        "listeners": [
            {
                "protocol": "imap",
                "bind": "127.0.0.1:1143",
                "tls": "none",
                "plaintext_auth_from": ["127.0.0.0/8"],
            }
        ],
    }


def errors(data, tmp_path):
    with pytest.raises(ConfigError) as info:
        parse(data, source="apppass.yaml", base_dir=tmp_path)
    return info.value.problems


def with_change(base, path, value):
    data = copy.deepcopy(base)
    node = data
    *parents, last = path
    for key in parents:
        node = node.setdefault(key, {}) if not isinstance(key, int) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()

CASES = [
    (
        ("codes", "disable_after_unused"),
        "12h",
        'apppass.yaml: codes.disable_after_unused: must be at least 86400s (got "12h")',
    ),
    (
        ("notify", "from"),
        "IT department",
        'apppass.yaml: notify.from: must be a mail address, or a name and one: "IT '
        '<it@example.org>" (got "IT department")',
    ),
    (
        ("notify", "templates"),
        "no-such-folder",
        "apppass.yaml: notify.templates: folder not found: {tmp}/no-such-folder "
        '(got "no-such-folder")',
    ),
    (
        ("notify", "smtp"),
        {"host": "relay.example.org", "login": "apppass"},
        "apppass.yaml: notify.smtp.password_file: is required with login",
    ),
    (
        ("notify", "smtp"),
        {"host": "relay.example.org", "password_file": "master"},
        "apppass.yaml: notify.smtp.login: is required with password_file",
    ),
    (
        ("notify", "smtp"),
        {"host": "relay.example.org", "tls": "none", "login": "a", "password_file": "master"},
        "apppass.yaml: notify.smtp.tls: none with a login is only allowed to a loopback relay: "
        "the password would cross the network in clear text",
    ),
    (
        ("notify", "smtp"),
        {"host": "relay.example.org", "ttl": 5},
        "apppass.yaml: notify.smtp.ttl: unknown key; did you mean 'tls'?",
    ),
    (
        ("notify", "from"),
        "it@example.org",
        "apppass.yaml: notify.smtp: is required without upstream.smtp: the notices need a way out",
    ),
    (
        ("codes", "argon2", "memory_kib"),
        "big",
        "apppass.yaml: codes.argon2.memory_kib: must be an integer >= 8192 and <= 4194304 "
        '(got "big")',
    ),
    (
        ("codes", "argon2", "memory_kib"),
        4096,
        "apppass.yaml: codes.argon2.memory_kib: must be an integer >= 8192 and <= 4194304 "
        "(got 4096)",
    ),
    (
        ("codes", "argon2", "time_cost"),
        0,
        "apppass.yaml: codes.argon2.time_cost: must be an integer >= 1 and <= 100 (got 0)",
    ),
    (
        ("codes", "argon2", "threads"),
        True,
        "apppass.yaml: codes.argon2.threads: must be an integer >= 1 and <= 256 (got true)",
    ),
    (
        ("codes", "alphabet"),
        "upper",
        'apppass.yaml: codes.alphabet: must be one of mixed, lower (got "upper")',
    ),
    (
        ("codes", "max_per_account"),
        0,
        "apppass.yaml: codes.max_per_account: must be an integer >= 1 and <= 10000 (got 0)",
    ),
    (
        ("codes", "default_expires"),
        "soon",
        "apppass.yaml: codes.default_expires: must be a duration like 30s, 15m, 12h, 90d or never "
        '(got "soon")',
    ),
    (
        ("codes", "default_scopes"),
        ["imap", "http"],
        'apppass.yaml: codes.default_scopes: must be a list of imap, pop3, smtp; "http" is not one '
        '(got ["imap", "http"])',
    ),
    (
        ("codes", "argon2", "memroy_kib"),
        65536,
        "apppass.yaml: codes.argon2.memroy_kib: unknown key; did you mean 'memory_kib'?",
    ),
    (
        ("auth", "failure_delay"),
        "2 seconds",
        "apppass.yaml: auth.failure_delay: must be a duration like 30s, 15m, 12h, 90d "
        '(got "2 seconds")',
    ),
    (
        ("auth", "login_timeout"),
        "never",
        "apppass.yaml: auth.login_timeout: must be a duration like 30s, 15m, 12h, 90d "
        '(never is not allowed here) (got "never")',
    ),
    (
        ("policy", "require_mfa"),
        "yes please",
        'apppass.yaml: policy.require_mfa: must be true or false (got "yes please")',
    ),
    (
        ("policy", "legacy_filter"),
        "(memberOf=cn=x)",
        "apppass.yaml: policy: legacy_filter and mfa_filter need an ldap directory",
    ),
    (
        ("policy", "mfa_filter"),
        "memberOf=cn=mfa",
        "apppass.yaml: policy.mfa_filter: must be an LDAP filter in parentheses, like "
        '(objectClass=person) (got "memberOf=cn=mfa")',
    ),
    (
        ("store",),
        {"mysql": "x"},
        'apppass.yaml: store: must set exactly one of sqlite, postgresql (got {"mysql": "x"})',
    ),
    (("store",), DELETE, "apppass.yaml: store: is required"),
    (
        ("directory",),
        {"static": "users.yaml", "ldap": {}},
        "apppass.yaml: directory: must set exactly one of static, ldap "
        '(got {"static": "users.yaml", "ldap": {}})',
    ),
    (
        ("listeners", 0, "bind"),
        "localhost",
        'apppass.yaml: listeners[0].bind: must be "HOST:PORT", e.g. "127.0.0.1:1143" or "[::]:993" '
        '(got "localhost")',
    ),
    (
        ("listeners", 0, "bind"),
        "127.0.0.1:70000",
        'apppass.yaml: listeners[0].bind: port must be between 1 and 65535 (got "127.0.0.1:70000")',
    ),
    (
        ("listeners", 0, "protocol"),
        "http",
        'apppass.yaml: listeners[0].protocol: must be one of imap, pop3, smtp (got "http")',
    ),
    (
        ("listeners", 0, "tls"),
        "implicit",
        "apppass.yaml: listeners[0].cert_file: is required when tls is implicit",
    ),
    (
        ("listeners", 0, "min_tls"),
        "1.4",
        'apppass.yaml: listeners[0].min_tls: must be one of 1.0, 1.1, 1.2, 1.3 (got "1.4")',
    ),
    (
        ("listeners", 0, "plaintext_auth_from"),
        ["10.0.0.0/8", "everyone"],
        "apppass.yaml: listeners[0].plaintext_auth_from: must be a list of IP networks like "
        '10.0.0.0/8; "everyone" is not one (got ["10.0.0.0/8", "everyone"])',
    ),
    (
        ("listeners", 0, "protocol"),
        "smtp",
        "apppass.yaml: listeners[0].protocol: needs upstream.smtp to be configured",
    ),
    (
        ("upstream", "imap", "master_password_file"),
        "missing-file",
        "apppass.yaml: upstream.imap.master_password_file: file not found: {tmp}/missing-file "
        '(got "missing-file")',
    ),
    (
        ("upstream", "imap", "master_password_file"),
        "empty",
        "apppass.yaml: upstream.imap.master_password_file: file is empty: {tmp}/empty "
        '(got "empty")',
    ),
    (
        ("upstream", "imap", "login"),
        "xclient",
        "apppass.yaml: upstream.imap.login: must be one of authzid, xoauth2, oauthbearer"
        ' (got "xclient")',
    ),
    (
        ("upstream", "imap", "master_user"),
        DELETE,
        "apppass.yaml: upstream.imap.master_user: is required when login is authzid",
    ),
    (("upstream", "imap", "host"), DELETE, "apppass.yaml: upstream.imap.host: is required"),
    (
        ("listeners", 0, "plaintext_auth_from"),
        DELETE,
        "apppass.yaml: listeners[0].plaintext_auth_from: is required when tls is none "
        "(without it nobody can log in on this listener)",
    ),
    (
        ("upstream", "imap", "verify"),
        "no",
        'apppass.yaml: upstream.imap.verify: must be true or false (got "no")',
    ),
    (("listners",), [], "apppass.yaml: listners: unknown key; did you mean 'listeners'?"),
]


@pytest.mark.parametrize(
    "path,value,message",
    CASES,
    ids=[".".join(map(str, c[0])) + "=" + repr(c[1])[:20] for c in CASES],
)
def test_bad_config_is_reported_with_key_path_rule_and_value(base, tmp_path, path, value, message):
    problems = errors(with_change(base, path, value), tmp_path)
    assert message.replace("{tmp}", str(tmp_path)) in problems, problems


def test_valid_base_config_loads(base, tmp_path):
    settings = parse(base, source="apppass.yaml", base_dir=tmp_path)
    assert settings.store.target == tmp_path / "var/apppass.db"
    assert settings.upstreams["imap"].master_password == "s3cret-master"
    assert "s3cret" not in repr(settings)


def test_every_mistake_is_reported_at_once(base, tmp_path):
    data = with_change(base, ("codes", "argon2", "memory_kib"), "big")
    data = with_change(data, ("auth", "failure_delay"), "slow")
    data = with_change(data, ("colour",), "blue")
    problems = errors(data, tmp_path)
    assert len(problems) == 3
    assert "apppass.yaml: colour: unknown key" in problems[2]


def test_secret_file_content_never_appears_in_errors(base, tmp_path):
    (tmp_path / "master").write_bytes(b"\xff\xfesecret")
    problems = errors(base, tmp_path)
    assert problems == [
        f"apppass.yaml: upstream.imap.master_password_file: cannot read {tmp_path}/master: "
        'not UTF-8 text (got "master")'
    ]


def test_duplicate_listener_addresses_are_refused(base, tmp_path):
    data = copy.deepcopy(base)
    data["listeners"].append(dict(data["listeners"][0], name="again"))
    assert (
        'apppass.yaml: listeners[1].bind: is used by another listener ("127.0.0.1:1143")'
        in errors(data, tmp_path)
    )


def test_an_imap_listeners_capabilities_are_capability_names_apppass_does_not_decide(
    base, tmp_path
):
    good = with_change(base, ("listeners", 0, "capabilities"), ["IMAP4rev1", "IDLE", "X-GM-EXT-1"])
    listener = parse(good, base_dir=tmp_path).listeners[0]
    assert listener.capabilities == ("IMAP4rev1", "IDLE", "X-GM-EXT-1")
    assert parse(base, base_dir=tmp_path).listeners[0].capabilities is None  # the upstream's
    data = with_change(base, ("listeners", 0, "capabilities"), ["IDLE", "AUTH=PLAIN", "a b", 7])
    assert errors(data, tmp_path) == [
        "apppass.yaml: listeners[0].capabilities[1]: is listed by apppass itself where it "
        'applies (from tls and plaintext_auth_from) (got "AUTH=PLAIN")',
        "apppass.yaml: listeners[0].capabilities[2]: must be an IMAP capability name: printable "
        'ASCII without spaces or ( ) { % * " \\ ] (got "a b")',
        "apppass.yaml: listeners[0].capabilities[3]: must be an IMAP capability name: printable "
        'ASCII without spaces or ( ) { % * " \\ ] (got 7)',
    ]
    data = with_change(base, ("listeners", 0, "capabilities"), "IDLE")
    assert errors(data, tmp_path) == [
        'apppass.yaml: listeners[0].capabilities: must be a list of names (got "IDLE")'
    ]
    data = with_change(base, ("listeners", 0, "protocol"), "pop3")
    data["upstream"]["pop3"] = data["upstream"]["imap"]
    data["listeners"][0]["capabilities"] = ["IDLE"]
    assert errors(data, tmp_path) == [
        "apppass.yaml: listeners[0].capabilities: is for IMAP listeners only"
    ]


def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "apppass.yaml"
    f.write_text("store:\n  sqlite: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load(f)
    assert info.value.problems[0].startswith("apppass.yaml: not valid YAML at line")


def test_missing_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.yaml")
    assert info.value.problems == [f"{tmp_path}/nope.yaml: file not found"]


def test_top_level_must_be_a_mapping(tmp_path):
    assert errors(["store"], tmp_path) == [
        'apppass.yaml: must be a mapping of settings (got ["store"])'
    ]


def test_example_config_is_valid():
    from pathlib import Path

    settings = load(Path(__file__).parents[2] / "config" / "apppass.example.yaml")
    assert settings.policy.legacy_group == "legacy-mail"
