"""App passwords: format (generate.py), hashing (hashing.py), storage (store.py, sqlite.py, open.py)
and issuing (issue.py)."""
