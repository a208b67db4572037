"""LDAP directory: settings, filters, values, cache, pool, search, accounts, directory, check."""
