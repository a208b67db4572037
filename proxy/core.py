"""What the IMAP, POP3 and SMTP pre-auth cores share: the not-authenticated life of a connection
(input held while a login is decided, TLS discarding what came before it, the hand-over to the
relay). Each core adds its commands and words its replies through the hooks below."""

from __future__ import annotations

import enum

from proxy.auth.decision import Refusal
from proxy.events import Event


class State(enum.Enum):
    """The states of a core with no literals (POP3, SMTP); IMAP's own enum adds its literal states."""

    COMMAND = "command"  # reading command lines
    SASL = "sasl"  # inside AUTH: lines are base64 responses
    AUTHENTICATING = "authenticating"  # Authenticate event out; input is held, not parsed
    STARTING_TLS = "starting-tls"  # StartTLS event out; plaintext input is discarded
    LOGGED_IN = "logged-in"  # done; input goes to take_pending()
    CLOSED = "closed"  # Close event out; input is ignored


def reply_text(text: str) -> str:
    """Reply text from elsewhere (a refusal's wording): printable ASCII only, so it cannot split a
    reply line, and at most 200 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:200]


class PreAuthCore:
    # Each core's state enum; it has at least COMMAND, STARTING_TLS, AUTHENTICATING, LOGGED_IN
    # and CLOSED.
    _State: type[enum.Enum]

    # -- what the frontend calls ------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    @property
    def closed(self) -> bool:
        return self._state is self._State.CLOSED

    @property
    def plaintext_allowed(self) -> bool:
        return self.plaintext_auth or self.tls_active

    @property
    def buffered(self) -> int:
        """Octets of client input the core holds now."""
        return self._lines.buffered

    def receive_data(self, data: bytes) -> list[Event]:
        """Client bytes in; replies and requests out."""
        states = self._State
        if self._state in (states.CLOSED, states.STARTING_TLS):
            # After STARTTLS only the TLS layer's output may follow, and it arrives after
            # tls_started(): anything else is plaintext injected before the handshake.
            return []
        self._lines.feed(data)
        waiting = (states.AUTHENTICATING, states.LOGGED_IN)
        events = [] if self._state in waiting else self._run()
        if self._state in waiting and self._lines.buffered > self.limits.max_pending:
            self._overflow(events)
        return events

    def tls_started(self) -> None:
        """The transport now speaks TLS (call it right after startTLS): what the client said in
        the clear is forgotten, capabilities drop STARTTLS and offer authentication."""
        self.tls_active = True
        self._forget_before_tls()
        if self._state is self._State.STARTING_TLS:
            self._lines.clear()
            self._state = self._State.COMMAND

    def auth_failed(self, refusal: Refusal, text: str | None = None) -> list[Event]:
        """The Authenticator (or the upstream login) refused: reply, then go on parsing."""
        if self._state is self._State.CLOSED:
            return []
        if self._state is not self._State.AUTHENTICATING:
            raise RuntimeError("auth_failed() without an outstanding Authenticate")
        events: list[Event] = []
        self._state = self._State.COMMAND
        self._refused(Refusal(refusal), text, events)
        if self._state is not self._State.CLOSED:
            events += self._run()
        return events

    def auth_succeeded(self, *details) -> list[Event]:
        """The login succeeded (upstream too): the success reply, and the relay takes over."""
        if self._state is self._State.CLOSED:
            return []
        if self._state is not self._State.AUTHENTICATING:
            raise RuntimeError("auth_succeeded() without an outstanding Authenticate")
        self._state = self._State.LOGGED_IN
        return [self._success(*details)]

    def take_pending(self) -> bytes:
        """After auth_succeeded: the raw bytes the client sent after its login command, for the
        upstream. Nothing once the connection is closed."""
        if self._state is self._State.CLOSED:
            return b""
        if self._state is not self._State.LOGGED_IN:
            raise RuntimeError("take_pending() before auth_succeeded()")
        return self._lines.clear()

    # -- hooks ---------------------------------------------------------------------------------------

    def _run(self) -> list[Event]:
        raise NotImplementedError

    def _overflow(self, events: list[Event]) -> None:
        """Too much input arrived while a login was decided: say so and close."""
        raise NotImplementedError

    def _forget_before_tls(self) -> None:
        """Drop state the client set up in the clear (RFC 3207 §4.2, RFC 2595 §4)."""

    def _refused(self, refusal: Refusal, text: str | None, events: list[Event]) -> None:
        raise NotImplementedError

    def _success(self, *details) -> Event:
        raise NotImplementedError
