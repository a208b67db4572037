"""apppass: app-password authentication proxy for legacy IMAP, POP3 and SMTP clients."""

__version__ = "0.1.0"
