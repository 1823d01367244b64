"""The wire format between clients and routers: its one home (docs/protocol.md).

Theory of operation
-------------------
Clients use a ZeroMQ DEALER socket connected to the router's ROUTER socket.
After the routing-id frame that ZeroMQ's ROUTER adds and removes, a message is:

1. *kind*: one byte, a code from :class:`Kind` (append-only; never renumber);
2. *header*: a UTF-8 JSON object (orjson);
3. for SEND, the *body*: the events' payloads, concatenated, opaque.
   DELIVER carries pairs of (header, body) frames instead (see below).

SEND is a batch.  Its header holds the per-event fields column-wise, once for
the whole message, and a list of *groups*: runs of consecutive events with the
same destination::

    {"g": [[channel, type, opts, n], ...],
     "i": [id, ...], "t": [time, ...], "f": [fmt, ...], "l": [length, ...]}

``channel`` is the destination text, ``type`` a name or null, ``opts`` null or
``{"ts": to_service, "ti": to_instance, "rt": reply_to, "re": in_reply_to}``
(keys optional), ``n`` the number of events in the group.  The columns have
one element per event, in order: id (string), sender time (number), payload
format (0 JSON, 1 XML) and payload length; the body is the payloads in order.
A router checks the columns with a few C-level operations per message and does
per-group work only (one channel look-up and one lease match per group).

DELIVER is ``[kind, meta, header1, body1, header2, body2, ...]``: one *segment*
per SEND message that had something for this connection, the segment being
that message's header and body - forwarded byte for byte when the connection
gets every group of it, else rebuilt with just the groups it gets.  ``meta``
is ``{"s": [[from_service, from_instance], ...], "d": dropped}``: the
authenticated sender of each segment (stamped by the router; a client cannot
forge it) and, when non-zero, how many events were dropped for this
connection since the last report.  The receiving client decides which of its
leases each group matches (the router has already checked that one does).
"""

from __future__ import annotations

import enum

import orjson

from .errors import ProtocolError

#: Protocol version carried in HELLO/WELCOME; bumped on incompatible change.
PROTOCOL_VERSION = 1
#: The service name stamped on events a router originates (its stats); reserved:
#: a client may not declare it, nor an ACL name a principal so.
ROUTER_SERVICE = "psepr-router"
#: The type of a router's stats events.
STATS_TYPE = "http://psepr.org/xs/payload/router-stats"


class Kind(enum.IntEnum):
    """Message kinds (the first frame, one byte).  Append-only."""

    HELLO = 1        # c->r {"v", "service", "instance", "client"}
    WELCOME = 2      # r->c {"v", "router", "authority", "principal", "instance", "max_lease", ...}
    SEND = 3         # c->r {"g": [[ch, type, opts, n]...], "i", "t", "f", "l"} + body
    DELIVER = 4      # r->c {"s": [[from_service, from_instance]...], "d"?} + (header, body)*
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
    # Router to router, on peer links (docs/protocol.md, "Peer links").
    PEER_HELLO = 16    # dialer->listener {"v", "router", "epoch", "authority"}
    PEER_WELCOME = 17  # listener->dialer {"v", "router", "epoch", "authority"}
    PEER_PING = 18     # {"t"}
    PEER_PONG = 19     # {"t"} (echoed)
    LINKSTATE = 20     # flooded {"r", "e", "q", "n", "iq", "s", "a"}
    INTEREST = 21      # flooded {"r", "e", "q", "full", "add", "del", "ack"?}
    INTEREST_ACK = 22  # routed to "r" {"r", "e", "q", "by", "h"}
    FORWARD = 23       # {"o", "e", "h", "d", "s", "q"} + (header, body)*
    SYNC = 24          # {"r"}: send me router r's full interest
    # Client to router.
    STATUS = 25        # c->r {"req"}
    STATUS_REPLY = 26  # r->c {"req", "status"}
    # Router to router, on peer links (later).
    PEER_BYE = 27      # {"router", "epoch"}: the sender is stopping; take the link down now


#: The kinds only routers send each other, on peer links.
PEER_KINDS = frozenset(range(Kind.PEER_HELLO, Kind.SYNC + 1)) | {Kind.PEER_BYE}


#: One-byte kind frames, prebuilt (sending bytes is cheaper than encoding ints).
KIND_BYTES = {k: bytes([k]) for k in Kind}
FMT_JSON = 0
FMT_XML = 1
FMT_NAMES = ("json", "xml")
#: Keys allowed in a group's options object.
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


def decode(frames: list) -> tuple[int, dict, list]:
    """Split and check one message's frames (routing id already removed).

    Args:
        frames: at least two byte strings.

    Returns:
        ``(kind, header, rest)``: ``rest`` is the list of frames after the
        header (the body of a SEND; the segments of a DELIVER).

    Raises:
        ProtocolError: too few frames, kind not one byte, header not a JSON
            object.  The kind is *not* checked against :class:`Kind` so that
            callers can answer unknown kinds with a precise error.
    """
    if len(frames) < 2:
        raise ProtocolError(f"a message has at least 2 frames, got {len(frames)}",
                            code=E_PROTOCOL)
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
    return k[0], header, frames[2:]


def cuts(items: list, field: int, max_items: int, max_bytes: int):
    """Slices of ``items`` for one message each, in order.

    A slice takes items while it holds at most ``max_items`` and their
    ``item[field]`` byte strings add up to at most ``max_bytes``; it always takes
    at least one item (a bigger one travels alone).

    Yields:
        Consecutive slices of ``items``.
    """
    i, n = 0, len(items)
    while i < n:
        j, size = i, 0
        while j < n and j - i < max_items and (j == i or size + len(items[j][field]) <= max_bytes):
            size += len(items[j][field])
            j += 1
        yield items[i:j]
        i = j


def pack_events(items: list) -> tuple[dict, list]:
    """Lay events out as a SEND header (groups + columns) and payload chunks.

    Args:
        items: ``(id, channel, type, time, fmt, opts, payload_bytes)`` tuples, in
            send order; ``opts`` is None or a dict.

    Returns:
        ``(header, chunks)``: the SEND header and the payloads to join into the body.
    """
    groups: list = []
    ids, times, fmts, plens, chunks = [], [], [], [], []
    last = None
    group = None
    for eid, ch, typ, t, fmt, opts, raw in items:
        if group is not None and ch == last[0] and typ == last[1] and opts == last[2]:
            group[3] += 1
        else:
            group = [ch, typ, opts, 1]
            groups.append(group)
            last = (ch, typ, opts)
        ids.append(eid)
        times.append(t)
        fmts.append(fmt)
        plens.append(len(raw))
        chunks.append(raw)
    return {"g": groups, "i": ids, "t": times, "f": fmts, "l": plens}, chunks


def encode_send(items: list) -> list[bytes]:
    """Frames of one SEND message carrying ``items`` (see :func:`pack_events`)."""
    header, chunks = pack_events(items)
    return [KIND_BYTES[Kind.SEND], orjson.dumps(header), b"".join(chunks)]


def unpack_events(header: dict, body) -> list:
    """The inverse of :func:`pack_events` (trusted input): items with memoryview payloads."""
    mv = memoryview(body)
    items, off, k = [], 0, 0
    ids, times, fmts, plens = header["i"], header["t"], header["f"], header["l"]
    for ch, typ, opts, n in header["g"]:
        for j in range(k, k + n):
            end = off + plens[j]
            items.append((ids[j], ch, typ, times[j], fmts[j], opts, mv[off:end]))
            off = end
        k += n
    return items
