"""The wire format between clients and routers: its one home (docs/protocol.md).

Theory of operation
-------------------
Clients use a ZeroMQ DEALER socket connected to the router's ROUTER socket.
Every message is two or three frames (after the routing-id frame that ZeroMQ's
ROUTER adds and removes):

1. *kind*: one byte, a code from :class:`Kind` (append-only; never renumber);
2. *header*: a UTF-8 JSON object (orjson);
3. *body*: optional opaque bytes; only SEND and DELIVER carry one.

SEND and DELIVER are batches: ``header["e"]`` is a list of event entries and
the body is the concatenation of their payloads, in order, each entry giving
its payload length.  A router routes on the entry fields and slices the body;
it never parses a payload.

SEND entry:    ``[id, channel, type, time, fmt, plen]`` or the same with a 7th
element ``opts``: ``{"ts": to_service, "ti": to_instance, "rt": reply_to,
"re": in_reply_to}`` (keys optional).  ``fmt`` is 0 for JSON, 1 for XML.
DELIVER entry: ``[lease_ids, from_service, from_instance, send_entry]``, the
sender's entry forwarded unchanged after validation.
"""

from __future__ import annotations

import enum

import orjson

from .errors import ProtocolError

#: Protocol version carried in HELLO/WELCOME; bumped on incompatible change.
PROTOCOL_VERSION = 1


class Kind(enum.IntEnum):
    """Message kinds (the first frame, one byte).  Append-only."""

    HELLO = 1        # c->r {"v", "service", "instance", "client"}
    WELCOME = 2      # r->c {"v", "router", "authority", "principal", "instance", "max_lease", ...}
    SEND = 3         # c->r {"e": [entry...]} + body
    DELIVER = 4      # r->c {"e": [deliver-entry...], "d"?: dropped} + body
    LEASE = 5        # c->r {"id", "channel", "type", "duration", "req"}
    LEASED = 6       # r->c {"id", "channel", "type", "granted", "req"}
    UNLEASE = 7      # c->r {"id", "req"}
    UNLEASED = 8     # r->c {"id", "req"}
    EXPIRED = 9      # r->c {"id", "channel"}
    PING = 10        # c->r {"req"}
    PONG = 11        # r->c {"req", "d"?: dropped}
    ERROR = 12       # r->c {"code", "message", "req"?, "ref"?, "channel"?}
    BYE = 13         # c->r {}
    STATS = 14       # c->r {"req"}
    STATS_REPLY = 15  # r->c {"req", "stats"}


#: One-byte kind frames, prebuilt (sending bytes is cheaper than encoding ints).
KIND_BYTES = {k: bytes([k]) for k in Kind}
FMT_JSON = 0
FMT_XML = 1
FMT_CODES = {"json": FMT_JSON, "xml": FMT_XML}
FMT_NAMES = ("json", "xml")
#: Keys allowed in a SEND entry's options object.
OPT_KEYS = frozenset(("ts", "ti", "rt", "re"))

# Error codes sent in ERROR messages (docs/protocol.md lists their meaning).
E_PROTOCOL = "protocol"
E_VERSION = "version"
E_NO_SESSION = "no-session"
E_BAD_CHANNEL = "bad-channel"
E_BAD_EVENT = "bad-event"
E_TOO_BIG = "too-big"
E_DENIED = "denied"
E_UNKNOWN_LEASE = "unknown-lease"
E_LIMIT = "limit"


def encode(kind: Kind, header: dict, body: bytes | None = None) -> list[bytes]:
    """Frames for one message (without the routing id).

    Args:
        kind: message kind.
        header: JSON-serialisable header object.
        body: payload bytes, for SEND and DELIVER.

    Returns:
        The list of frames to pass to ``send_multipart``.
    """
    frames = [KIND_BYTES[kind], orjson.dumps(header)]
    if body is not None:
        frames.append(body)
    return frames


def decode(frames: list) -> tuple[int, dict, bytes | None]:
    """Split and check one message's frames (routing id already removed).

    Args:
        frames: two or three byte strings.

    Returns:
        ``(kind, header, body)``; body is None when absent.

    Raises:
        ProtocolError: wrong frame count, kind not one byte, header not a JSON
            object.  The kind is *not* checked against :class:`Kind` so that
            callers can answer unknown kinds with a precise error.
    """
    n = len(frames)
    if n < 2 or n > 3:
        raise ProtocolError(f"a message has 2 or 3 frames, got {n}", code=E_PROTOCOL)
    k = frames[0]
    if len(k) != 1:
        raise ProtocolError(f"the kind frame must be exactly 1 byte, got {len(k)}",
                            code=E_PROTOCOL)
    try:
        header = orjson.loads(frames[1])
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the header frame is not valid JSON: {exc}", code=E_PROTOCOL) from None
    if type(header) is not dict:
        raise ProtocolError("the header frame must be a JSON object", code=E_PROTOCOL)
    return k[0], header, (frames[2] if n == 3 else None)
