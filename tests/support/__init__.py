"""Helpers the tests share; nothing here is a test (ca.py: the one test certificate authority)."""
