"""One error tree for the whole product, split by whose fault it is.

Every exception PsEPR raises derives from :class:`PseprError`.  The second
level says who is to blame, which is what a caller needs to decide what to do:

* :class:`UsageError`      - the local caller misused an API (bad channel, bad
  argument).  Fix the code; retrying will not help.
* :class:`RemoteError`     - a peer sent garbage or refused us (protocol error,
  access denied).  Carries the peer's error ``code``.
* :class:`ClosedError`     - the object was closed locally.
* :class:`ConnectionLost`  - the transport broke; the SDK reconnects by itself.
* :class:`TimeoutError`    - a deadline passed (also a builtin TimeoutError, so
  ``except TimeoutError`` works as users expect).
* :class:`NoRoute`         - nobody is there to answer (no lease holder);
  :class:`NoMonitor` when that is a PLDB query.
* :class:`SlowConsumer`    - events were dropped because a reader fell behind.
* :class:`StorageError`    - local storage broke (disk full, read-only database).

Errors carry their facts as attributes (``channel``, ``code``, ``field``...)
so that callers never parse messages.
"""

from __future__ import annotations

import builtins


class PseprError(Exception):
    """Base of every PsEPR error."""


class UsageError(PseprError, ValueError):
    """The caller misused an API; the message says which argument and why."""


class ChannelError(UsageError):
    """A channel name breaks the PsEPR grammar.

    Attributes:
        text: the offending input, as given.
        rule: a short name of the rule that was broken.
    """

    def __init__(self, text: object, rule: str, detail: str) -> None:
        self.text = text
        self.rule = rule
        shown = repr(text)
        if isinstance(text, str) and len(text) > 100:
            # A runaway channel (a pasted file, say) must not make a 5,000-character line.
            shown = f"{text[:80]!r}... ({len(text)} characters)"
        super().__init__(f"invalid channel {shown}: {detail} [{rule}]")


class EventError(UsageError):
    """An event (or its payload, or its encoding) is malformed.

    Attributes:
        field: the event field that was wrong, when known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class XMLRefused(EventError):
    """XML input was refused by the hardened parser (DTD, entity, size, syntax)."""


class ConfigError(UsageError):
    """A configuration file or option is invalid."""


class AddressInUse(ConfigError):
    """An endpoint to listen on is taken by another process."""


class RemoteError(PseprError):
    """A peer answered with an error, or sent something we could not use.

    Attributes:
        code: machine-readable error code from the wire (see docs/protocol.md).
        channel: the channel concerned, when the peer named one.
        ref: the id of the request, lease or event the error is about.
    """

    def __init__(self, message: str, code: str = "remote", channel: str | None = None,
                 ref: str | None = None) -> None:
        self.code = code
        self.channel = channel
        self.ref = ref
        super().__init__(message)


class AccessDenied(RemoteError):
    """The router's ACL does not grant this principal the operation on the channel."""


class ProtocolError(RemoteError):
    """A peer sent bytes that do not follow docs/protocol.md."""


class LeaseExpired(RemoteError):
    """A lease expired at the router (renewal failed or was disabled)."""


class ClosedError(PseprError):
    """The connection or lease was closed locally."""


class ConnectionLost(PseprError):
    """The transport to the router broke; the SDK is reconnecting."""


class TimeoutError(PseprError, builtins.TimeoutError):  # noqa: A001 - deliberate
    """A deadline passed.  Also a builtin ``TimeoutError``."""


class NoRoute(PseprError):
    """No one answered a request: no lease holder on the channel."""


class NoMonitor(NoRoute):
    """No PLDB monitor answered a query for the channel before the deadline.

    Attributes:
        channel: the channel the query was for.
    """

    def __init__(self, message: str, channel: str | None = None) -> None:
        self.channel = channel
        super().__init__(message)


class StorageError(PseprError):
    """Local storage failed (disk full, read-only database, corrupt file).

    Attributes:
        path: the database file concerned.
    """

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class SlowConsumer(PseprError):
    """Events were dropped because a reader fell behind its queue limit.

    Attributes:
        dropped: how many events were dropped.
    """

    def __init__(self, message: str, dropped: int = 0) -> None:
        self.dropped = dropped
        super().__init__(message)


# Wire error codes -> exception classes (the router sends codes, the SDK raises).
CODE_CLASSES: dict[str, type[RemoteError]] = {
    "denied": AccessDenied,
    "protocol": ProtocolError,
    "bad-channel": ProtocolError,
    "bad-event": ProtocolError,
    "too-big": ProtocolError,
    "expired": LeaseExpired,
}


def remote_error(code: str, message: str, channel: str | None = None,
                 ref: str | None = None) -> RemoteError:
    """Build the exception that matches a wire error code.

    Args:
        code: the wire code (``denied``, ``bad-channel``...).
        message: the human-readable text from the peer.
        channel: channel named by the peer, if any.
        ref: request/lease/event id the error refers to, if any.

    Returns:
        A :class:`RemoteError` subclass instance (not raised).
    """
    cls = CODE_CLASSES.get(code, RemoteError)
    return cls(message, code=code, channel=channel, ref=ref)
