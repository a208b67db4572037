"""Directories: where login names resolve to accounts (static YAML file or LDAP)."""
