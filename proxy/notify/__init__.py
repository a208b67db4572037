"""`apppass notify`: disables codes left unused (codes.disable_after_unused) and mails the notices
of expiring and idle codes, once each."""
