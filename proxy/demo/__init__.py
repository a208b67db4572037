"""`apppass demo` (run.py) and its in-memory sandbox upstream (sandbox.py): never in production."""
