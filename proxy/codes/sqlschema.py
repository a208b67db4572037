"""The SQLite store's schema: versioned migrations (PRAGMA user_version), mirrored step for step
by the PostgreSQL store's (proxy/codes/pgschema.py); tests/integration/test_store_postgres.py
checks the two have the same tables and columns."""

from __future__ import annotations

# Versioned migrations: step i (a list of statements) brings the schema from version i to i + 1.
# Never edit a shipped step; append a new one.
MIGRATIONS = [
    [
        """
    CREATE TABLE codes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        account_key TEXT NOT NULL,
        account_login TEXT NOT NULL,
        label TEXT NOT NULL,
        selector TEXT NOT NULL,
        hash TEXT NOT NULL,
        scopes TEXT NOT NULL,              -- ",imap,smtp," so that instr() can test a scope
        networks TEXT NOT NULL DEFAULT '', -- space-separated CIDRs; empty = anywhere
        created_at INTEGER NOT NULL,       -- unix seconds, UTC
        expires_at INTEGER,
        max_uses INTEGER,
        use_count INTEGER NOT NULL DEFAULT 0,
        last_used_at INTEGER,
        last_used_ip TEXT,
        last_used_protocol TEXT,
        failed_count INTEGER NOT NULL DEFAULT 0,
        last_failed_at INTEGER,
        last_failed_ip TEXT,
        disabled INTEGER NOT NULL DEFAULT 0,
        revoked_at INTEGER,
        created_by TEXT NOT NULL
    )""",
        "CREATE UNIQUE INDEX codes_account_selector ON codes (account_key, selector)",
    ],
    [
        # Places held under max_uses by logins whose upstream login is still running.
        """
    CREATE TABLE reservations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        code_id INTEGER NOT NULL,
        until INTEGER NOT NULL             -- unix seconds: the hold lapses after this
    )""",
        "CREATE INDEX reservations_code ON reservations (code_id)",
    ],
    [
        # The portal and the admin API (proxy/web/records.py).
        """
    CREATE TABLE api_tokens (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        label TEXT NOT NULL,
        selector TEXT NOT NULL UNIQUE,     -- the token's public part, to find it
        hash TEXT NOT NULL,                -- SHA-256 of the secret part (high entropy)
        read_only INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        last_used_at INTEGER,
        last_used_ip TEXT,
        revoked_at INTEGER,
        created_by TEXT NOT NULL
    )""",
        """
    CREATE TABLE web_sessions (
        id TEXT PRIMARY KEY,               -- SHA-256 of the cookie's value
        account_key TEXT NOT NULL,
        login TEXT NOT NULL,
        admin INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        seen_at INTEGER NOT NULL,
        signed_in_at INTEGER NOT NULL,     -- the last password (or SSO) sign-in
        second_factor_at INTEGER,          -- the last TOTP or recovery code, if any
        client_ip TEXT NOT NULL,
        csrf TEXT NOT NULL
    )""",
        """
    CREATE TABLE totp (
        account_key TEXT PRIMARY KEY,
        secret TEXT NOT NULL,              -- base32; enrolment is done once enrolled_at is set
        enrolled_at INTEGER,
        last_step INTEGER NOT NULL DEFAULT 0,  -- the last time step used: no replay
        recovery TEXT NOT NULL DEFAULT ''  -- space-separated SHA-256 of unused recovery codes
    )""",
    ],
    [
        # Codes revoked, disabled, enabled or deleted, by any process: the proxies read this to
        # end live sessions within a second or two (proxy/sessions.py).
        """
    CREATE TABLE code_changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        code_id INTEGER NOT NULL,
        at INTEGER NOT NULL
    )""",
        """
    CREATE TRIGGER codes_changed AFTER UPDATE OF revoked_at, disabled ON codes
    WHEN NEW.revoked_at IS NOT OLD.revoked_at OR NEW.disabled != OLD.disabled
    BEGIN
        INSERT INTO code_changes (code_id, at) VALUES (NEW.id, CAST(strftime('%s') AS INTEGER));
    END""",
        """
    CREATE TRIGGER codes_deleted AFTER DELETE ON codes
    BEGIN
        INSERT INTO code_changes (code_id, at) VALUES (OLD.id, CAST(strftime('%s') AS INTEGER));
    END""",
    ],
    [
        # Failed logins of the last minutes, from every node (proxy/auth/shared.py).
        """
    CREATE TABLE login_failures (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        bucket TEXT NOT NULL,
        target TEXT NOT NULL,
        at INTEGER NOT NULL
    )""",
        "CREATE INDEX login_failures_at ON login_failures (at)",
    ],
    [
        # Devices still trying a code that stopped working (revoked, expired, used up, disabled,
        # superseded): how many tries since, from where (proxy/auth/authenticator.py).
        "ALTER TABLE codes ADD COLUMN stale_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE codes ADD COLUMN stale_since INTEGER",
        "ALTER TABLE codes ADD COLUMN stale_last_at INTEGER",
        "ALTER TABLE codes ADD COLUMN stale_last_ip TEXT",
        # The sending policy (proxy/codes/sending.py): space-separated lists, '' for none.
        "ALTER TABLE codes ADD COLUMN mail_from TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE codes ADD COLUMN rcpt_domains TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE codes ADD COLUMN max_messages_per_day INTEGER",
        "ALTER TABLE codes ADD COLUMN send_refused_count INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE codes ADD COLUMN last_send_refused_at INTEGER",
        # Who else hears about the code's expiry (apppass notify), and the idle clock.
        "ALTER TABLE codes ADD COLUMN custodian TEXT",
        "ALTER TABLE codes ADD COLUMN idle_disabled_at INTEGER",
        "ALTER TABLE codes ADD COLUMN enabled_at INTEGER",
        # Messages sent (accepted upstream) per code per UTC day, and places held under the
        # daily cap by messages on their way (proxy/codes/activity.py).
        """
    CREATE TABLE message_counts (
        code_id INTEGER NOT NULL,
        day INTEGER NOT NULL,              -- days since 1970-01-01, UTC
        sent INTEGER NOT NULL DEFAULT 0,
        held INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (code_id, day)
    )""",
        # Notices mailed by apppass notify: one row per code, kind and occasion, so that a
        # notice is sent once however often (and on however many nodes) it runs.
        """
    CREATE TABLE notices (
        code_id INTEGER NOT NULL,
        kind TEXT NOT NULL,
        ref INTEGER NOT NULL,              -- the occasion: the expiry, or when it was disabled
        claimed_at INTEGER NOT NULL,
        sent_at INTEGER,
        PRIMARY KEY (code_id, kind, ref)
    )""",
    ],
    [
        # A changed sending policy is a change the proxies follow too: a live SMTP session of
        # that code ends, on every node, and logs in again under the new policy.
        "DROP TRIGGER codes_changed",
        """
    CREATE TRIGGER codes_changed
    AFTER UPDATE OF revoked_at, disabled, mail_from, rcpt_domains, max_messages_per_day ON codes
    WHEN NEW.revoked_at IS NOT OLD.revoked_at OR NEW.disabled != OLD.disabled
        OR NEW.mail_from != OLD.mail_from OR NEW.rcpt_domains != OLD.rcpt_domains
        OR NEW.max_messages_per_day IS NOT OLD.max_messages_per_day
    BEGIN
        INSERT INTO code_changes (code_id, at) VALUES (NEW.id, CAST(strftime('%s') AS INTEGER));
    END""",
    ],
]
