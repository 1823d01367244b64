"""The router's forwarding core: sessions, leases and batch routing (pure).

Theory of operation
-------------------
The core owns every piece of router state and does no I/O.  The shell
(:mod:`routers.router`) feeds it each received message with
:meth:`RouterCore.handle`, then calls :meth:`RouterCore.flush` once per loop
turn with a ``send`` function; periodic work happens in :meth:`RouterCore.tick`.

* A *session* (:class:`Conn`) starts with HELLO; the router learns the
  client's instance name and fixes its principal: the CURVE-authenticated name
  when CURVE is on, else the service name the client declared (the embedded
  local mode has no authentication to offer).  Every event the session sends
  is stamped with that principal and instance: a client cannot forge them.
* SEND carries a batch laid out column-wise (see :mod:`psepr.wire`).  The
  core checks the whole message with a few C-level builtins before it queues
  anything, then works per *group* (a run of events to one destination), never
  per event: one look-up in a (channel, type) -> connections cache valid for
  one lease-table generation, else channel validation (cached), the ACL
  (cached per connection) and one dict look-up per prefix of the channel in
  the lease table.  Payloads are never parsed.
* Output is grouped per connection for the whole turn and flushed as DELIVER
  messages of about ``deliver_bytes``, each carrying whole *segments*: the
  sender's header and body byte for byte when the connection gets every group
  of the message, else a rebuilt subset.  If ZeroMQ's per-connection queue is
  full the shell reports a drop; the core counts it and piggybacks the count
  ("d") on the next DELIVER or PONG to that client.  Control replies that do
  not fit are kept (bounded) and retried.
* Inbox channels are private: only leases at or below
  ``/<authority>/_inbox/<principal>/`` receive them.
* Bad input is answered with ERROR (code, message, the offending id/channel)
  and never raises out of :meth:`handle`.
"""

from __future__ import annotations

import logging
import os
import time as _time
from typing import Callable

import orjson

from psepr.channel import element_ok, parse, parse_destination
from psepr.errors import ChannelError
from psepr import wire
from psepr.wire import Kind
from registry.acl import ACL, INBOX
from registry.leases import LeaseTable
from .config import RouterConfig
from .overlay import SEG_SENDER, OverlayCore, PeerOut

log = logging.getLogger("psepr.router")

STATS_TYPE = wire.STATS_TYPE
ROUTER_SERVICE = wire.ROUTER_SERVICE
_K = wire.KIND_BYTES
_MAX_CACHE = 100_000
#: Control messages (PONG, LEASED, ERROR...) kept per connection while its ZeroMQ
#: queue is full, retried on later turns; beyond this they are dropped and counted.
_MAX_CONTROL_BACKLOG = 1000
#: Events kept for a session whose connection vanished (see RouterCore.detach) until
#: its client says HELLO again on a new connection; beyond this the oldest are dropped.
_DETACHED_EVENTS = 10_000
_JSON_NUM = (int, float)
#: Most (header, body) segments in one DELIVER message.
_MAX_SEGMENTS = 256
_INT = {int}
_STR = {str}
_NUM = {int, float}
_FMTS = {0, 1}


def _name_ok(s: object) -> bool:
    return type(s) is str and 0 < len(s) <= 1024 and s.isprintable() and " " not in s


def _clean(raw: bytes) -> bool:
    """True if every JSON string in ``raw`` is printable ASCII without spaces.

    orjson writes no whitespace between tokens and escapes every control
    character, so a header with no byte outside ASCII, no space, no backslash,
    no DEL (0x7f, ASCII but not printable) and no empty string (``""``) cannot
    hold a string that breaks the name rules, except by length (checked apart).
    """
    # Byte values as ints: `32 in raw` is a memchr, ten times faster than `b" " in raw`.
    return (raw.isascii() and 32 not in raw and 92 not in raw      # space, backslash
            and 127 not in raw and raw.find(b'""') < 0)


def _resumes(hello: dict, prev: "Conn") -> bool:
    """True if ``hello`` names ``prev``'s session and is newer than its HELLO."""
    req, was = hello.get("req"), prev.hello_req
    return (hello.get("resume") == prev.token and type(req) is int and type(was) is int
            and req > was)


def _starts(groups: list, plens: list) -> list:
    """``[(first_event, first_byte), ...]`` per group, plus the end, for slicing."""
    out = []
    k = off = 0
    for g in groups:
        out.append((k, off))
        cnt = g[3]
        off += sum(plens[k:k + cnt])
        k += cnt
    out.append((k, off))
    return out


def _subset(header: dict, body: bytes, gis: list, starts: list, fsvc: str, finst: str) -> tuple:
    """A segment holding only the groups ``gis`` of a SEND message."""
    groups = header["g"]
    ids, times, fmts, plens = header["i"], header["t"], header["f"], header["l"]
    sg, si, st, sf, sl, chunks = [], [], [], [], [], []
    for gi in gis:
        (k0, b0), (k1, b1) = starts[gi], starts[gi + 1]
        sg.append(groups[gi])
        si += ids[k0:k1]
        st += times[k0:k1]
        sf += fmts[k0:k1]
        sl += plens[k0:k1]
        chunks.append(body[b0:b1])
    hdr = orjson.dumps({"g": sg, "i": si, "t": st, "f": sf, "l": sl})
    return (fsvc, finst, hdr, b"".join(chunks), len(si))


class Conn:
    """One client session, keyed by its ZeroMQ routing id."""

    __slots__ = ("ident", "principal", "instance", "last_seen", "out_segs",
                 "out_bytes", "out_events", "control", "dirty", "pending_drops", "events_in", "events_out",
                 "dropped", "errors", "may_send_cache", "created", "detached", "token",
                 "hello_req")

    def __init__(self, ident: bytes, principal: str, instance: str, now: float) -> None:
        self.ident = ident
        self.principal = principal
        self.instance = instance
        self.last_seen = now
        self.created = now
        self.out_segs: list = []     # (from_service, from_instance, header, body, n) to deliver
        self.out_bytes = 0
        self.out_events = 0
        self.control: list = []      # framed control messages waiting for flush
        self.dirty = False
        self.pending_drops = 0       # drops not yet reported to the client
        self.events_in = 0
        self.events_out = 0
        self.dropped = 0
        self.errors = 0
        self.may_send_cache: dict[str, bool] = {}
        self.detached: float | None = None   # when its connection vanished
        self.token = ""                      # WELCOME's "session": lets the client resume it
        self.hello_req = None                # "req" of the HELLO that made or took it

    def __repr__(self) -> str:
        return f"Conn({self.principal}/{self.instance})"


class RouterCore:
    """All router state and decisions.

    Args:
        config: the router configuration.
        acl: access-control list (None: everyone may do everything).
        now: the start time (monotonic, like every ``now`` passed in later).
        wall: the wall clock, for the times stamped on stats events (injected so
            that the core reads no clock itself).
        epoch: this run's overlay epoch, larger than any earlier run's (default:
            wall-clock nanoseconds).  Used only with peers.
        peer_allowed: ``peer_allowed(name, principal) -> bool`` for peer routers.
        tokens: makes each session's resume token (default: 8 random bytes, hex).
    """

    def __init__(self, config: RouterConfig, acl: ACL | None = None, now: float = 0.0,
                 wall: Callable[[], float] = _time.time, epoch: int | None = None,
                 peer_allowed: Callable | None = None,
                 tokens: Callable[[], str] | None = None) -> None:
        self.config = config
        self._wall = wall
        self._tokens = tokens or (lambda: os.urandom(8).hex())
        self.acl = acl
        self.leases = LeaseTable(config.max_lease, config.max_leases_per_conn)
        self.conns: dict[bytes, Conn] = {}
        #: (principal, instance) -> session, for a client that says HELLO again on a
        #: new connection (see _on_hello): instances the client named itself only.
        self._instances: dict[tuple[str, str], Conn] = {}
        self._dirty: list[Conn] = []
        self._channels: dict[str, tuple[str, ...]] = {}   # validated channel -> prefixes
        self._types: set[str] = set()                      # validated type names
        # channel (untyped events: no key tuple to build) or (channel, type) ->
        # connections matching, valid for one lease-table generation;
        # equal tuples are one object (_canon), so that `is` tells groups apart
        self._targets: dict = {}
        self._canon: dict = {}
        self._targets_gen = -1
        self.started = now
        self.next_stats = now + config.stats_interval
        self.stats_channel = parse(f"/{config.authority}/_sys/routers/{config.name}/stats/")
        self._stats_seq = 0
        self._last_rates = (now, 0, 0)
        # counters
        self.events_in = 0
        self.events_out = 0
        self.dropped = 0
        self.errors = 0
        self.control_dropped = 0
        self.undelivered = 0          # events kept for detached sessions that were forgotten
        self.messages_in = 0
        self._ltargets: dict = {}     # like _targets, local connections only
        #: The overlay (peer links, remote interest, forwarding); None on a lone router.
        self.overlay: OverlayCore | None = None
        if config.peer_listen or config.peers:
            self.overlay = OverlayCore(config, self, int(wall() * 1e9) if epoch is None
                                       else epoch, now, peer_allowed)
            self.leases.on_add = self.overlay.lease_added
            self.leases.on_remove = self.overlay.lease_removed

    # -- input ---------------------------------------------------------------
    def handle(self, ident: bytes, frames: list, now: float, principal: str | None = None) -> None:
        """Process one message from a client.  Never raises on bad input.

        Args:
            ident: the ZeroMQ routing id of the sender.
            frames: the frames after the routing id.
            now: current time.
            principal: the CURVE-authenticated principal, when CURVE is on.
        """
        self.messages_in += 1
        try:
            kind, header, rest = wire.decode(frames)
        except wire.ProtocolError as exc:
            self._error(ident, wire.E_PROTOCOL, str(exc))
            return
        conn = self.conns.get(ident)
        try:
            if kind == Kind.SEND:
                if conn is None:
                    self._error(ident, wire.E_NO_SESSION, "send before hello: say HELLO first")
                    return
                conn.last_seen = now
                if len(rest) > 1:
                    self._error(ident, wire.E_PROTOCOL,
                                f"SEND has one body frame after the header, got {len(rest)}")
                    return
                self.route(header, frames[1], rest[0] if rest else b"", conn.principal,
                           conn.instance, conn)
            elif kind == Kind.HELLO:
                self._on_hello(ident, header, now, principal)
            elif kind in _SESSION_KINDS:
                if conn is None:
                    self._error(ident, wire.E_NO_SESSION, "unknown session: say HELLO first",
                                req=header.get("req"))
                    return
                conn.last_seen = now
                _SESSION_KINDS[kind](self, conn, header, now)
            elif kind in wire.PEER_KINDS:
                # A router whose --peer names this client endpoint: say where to dial.
                self._error(ident, wire.E_PROTOCOL, f"{Kind(kind).name} on a client endpoint: "
                            f"peer routers dial a router's --peer-listen endpoint, not its "
                            f"--listen endpoint")
            else:
                self._error(ident, wire.E_PROTOCOL, f"unknown message kind {kind}",
                            req=header.get("req"))
        except Exception:  # a bug must not kill the router; log loudly, tell the client
            log.exception("internal error handling kind %s from %r", kind, conn or ident)
            self._error(ident, wire.E_PROTOCOL, "internal router error while handling message")

    def _error(self, ident: bytes, code: str, message: str, req=None, ref=None,
               channel=None) -> None:
        self.errors += 1
        header = {"code": code, "message": message}
        if req is not None:
            header["req"] = req
        if ref is not None:
            header["ref"] = ref
        if channel is not None:
            header["channel"] = channel
        conn = self.conns.get(ident)
        if conn is not None:
            conn.errors += 1
            self._queue_control(conn, Kind.ERROR, header)
        else:
            # No session: remember the reply on a throw-away record flushed this turn.
            tmp = Conn(ident, "", "", 0.0)
            tmp.control.append(wire.encode(Kind.ERROR, header))
            tmp.dirty = True
            self._dirty.append(tmp)

    def _queue_control(self, conn: Conn, kind: Kind, header: dict) -> None:
        conn.control.append(wire.encode(kind, header))
        if not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _on_hello(self, ident: bytes, h: dict, now: float, principal: str | None) -> None:
        v = h.get("v")
        if v != wire.PROTOCOL_VERSION:
            self._error(ident, wire.E_VERSION,
                        f"protocol version {v!r} not supported; this router speaks "
                        f"{wire.PROTOCOL_VERSION}")
            return
        service = h.get("service")
        instance = h.get("instance")
        for name, val in (("service", service), ("instance", instance)):
            # Names end up as channel elements (inboxes): the element rules apply.
            if val is not None and not element_ok(val):
                self._error(ident, wire.E_PROTOCOL, f"hello: {name} {val!r} must be printable "
                            f"text without whitespace, '/' or '*'")
                return
        if principal is None:
            if service == ROUTER_SERVICE:
                self._error(ident, wire.E_DENIED, f"hello: service {service!r} is reserved for "
                            f"the routers' own events")
                return
            principal = service or "anonymous"
        prev = self._instances.get((principal, instance)) if instance is not None else None
        if prev is not None and prev.ident != ident and (
                prev.detached is not None or _resumes(h, prev)):
            # The same client on a new connection: the session moves over with its
            # leases and the events kept for it, so nothing is lost in between.
            # Either the old connection is known to be gone, or the client names
            # the session (its token) from a HELLO newer than the one the session
            # has: a stale HELLO (from a socket the client already gave up) never
            # pulls a live session away.
            self._takeover(prev, ident, now)
            prev.hello_req = h.get("req")
            self._welcome(prev, h, resumed=True)
            return
        old = self.conns.pop(ident, None)
        if old is not None:
            self._drop_conn(old)
        conn = Conn(ident, principal, instance or ident.hex(), now)
        conn.token = self._tokens()
        conn.hello_req = h.get("req")
        self.conns[ident] = conn
        if instance is not None:
            self._instances[(principal, instance)] = conn
        self._welcome(conn, h, resumed=False)

    def _welcome(self, conn: Conn, h: dict, resumed: bool) -> None:
        c = self.config
        self._queue_control(conn, Kind.WELCOME, {
            "v": wire.PROTOCOL_VERSION, "router": c.name, "authority": c.authority,
            "principal": conn.principal, "instance": conn.instance, "max_lease": c.max_lease,
            "max_event": c.max_event_bytes, "max_message": c.max_message_bytes,
            "resumed": resumed, "session": conn.token, "req": h.get("req")})

    def _takeover(self, conn: Conn, ident: bytes, now: float) -> None:
        log.info("session %r moves to a new connection (%s -> %s)", conn, conn.ident.hex(),
                 ident.hex())
        other = self.conns.pop(ident, None)
        if other is not None and other is not conn:
            self._drop_conn(other)
        self.conns.pop(conn.ident, None)
        conn.ident = ident
        conn.detached = None
        conn.last_seen = now
        conn.control = []            # answers meant for the old connection
        self.conns[ident] = conn
        if conn.out_segs and not conn.dirty:
            conn.dirty = True
            self._dirty.append(conn)

    def _on_lease(self, conn: Conn, h: dict, now: float) -> None:
        req = h.get("req")
        lid = h.get("id")
        if not _name_ok(lid):
            self._error(conn.ident, wire.E_PROTOCOL, f"lease id {lid!r} must be printable text "
                        f"without whitespace", req=req)
            return
        try:
            channel = parse(h.get("channel"))
        except ChannelError as exc:
            self._error(conn.ident, wire.E_BAD_CHANNEL, str(exc), req=req, ref=lid,
                        channel=str(h.get("channel")))
            return
        typ = h.get("type")
        if typ is not None and not _name_ok(typ):
            self._error(conn.ident, wire.E_PROTOCOL, f"lease type {typ!r} must be printable text "
                        f"without whitespace", req=req, ref=lid)
            return
        duration = h.get("duration", self.config.max_lease)
        if type(duration) not in _JSON_NUM or not duration > 0:
            self._error(conn.ident, wire.E_PROTOCOL, f"lease duration must be a positive number, "
                        f"got {duration!r}", req=req, ref=lid)
            return
        if self.acl is not None and not self.acl.may_lease(conn.principal, channel):
            self._error(conn.ident, wire.E_DENIED, f"principal {conn.principal!r} may not lease "
                        f"{channel.text}", req=req, ref=lid, channel=channel.text)
            return
        try:
            lease = self.leases.grant(conn, lid, channel, typ, duration, now)
        except OverflowError as exc:
            self._error(conn.ident, wire.E_LIMIT, str(exc), req=req, ref=lid)
            return
        reply = {"id": lid, "channel": channel.text, "type": typ, "granted": lease.granted,
                 "req": req}
        if h.get("p") and self.overlay is not None:
            self.overlay.barrier(conn, reply, now)   # answered once every router has it
        else:
            self._queue_control(conn, Kind.LEASED, reply)

    def lease_answer(self, conn: Conn, reply: dict) -> None:
        """Send a delayed LEASED (a lease barrier completed) if the session still exists."""
        if self.conns.get(conn.ident) is conn:
            self._queue_control(conn, Kind.LEASED, reply)

    def _on_unlease(self, conn: Conn, h: dict, now: float) -> None:
        lid = h.get("id")
        req = h.get("req")
        if type(lid) is not str or self.leases.release(conn, lid) is None:
            self._error(conn.ident, wire.E_UNKNOWN_LEASE, f"no lease with id {lid!r}", req=req,
                        ref=lid if type(lid) is str else None)
            return
        self._queue_control(conn, Kind.UNLEASED, {"id": lid, "req": req})

    def _on_ping(self, conn: Conn, h: dict, now: float) -> None:
        out = {"req": h.get("req")}
        if conn.pending_drops:
            out["d"] = conn.pending_drops
            conn.pending_drops = 0
        self._queue_control(conn, Kind.PONG, out)

    def _on_bye(self, conn: Conn, h: dict, now: float) -> None:
        self.forget(conn.ident)

    def _on_stats(self, conn: Conn, h: dict, now: float) -> None:
        self._queue_control(conn, Kind.STATS_REPLY, {"req": h.get("req"), "stats": self.stats(now)})

    def _on_status(self, conn: Conn, h: dict, now: float) -> None:
        if self.overlay is not None:
            status = self.overlay.status(now)
        else:
            status = {"router": self.config.name, "epoch": None, "links": [], "counters": {},
                      "routers": [{"router": self.config.name, "self": True, "reachable": True,
                                   "next_hop": None, "links": {}, "age": 0.0,
                                   "load": self.load()}]}
        status["stats"] = self.stats(now)
        self._queue_control(conn, Kind.STATUS_REPLY, {"req": h.get("req"), "status": status})

    # -- the hot path --------------------------------------------------------
    def _channel_prefixes(self, ch: str) -> tuple[str, ...]:
        channel = parse_destination(ch)
        prefs = channel.prefixes()
        if len(channel.parts) >= 3 and channel.parts[1] == INBOX:
            # Inboxes are private: only leases on /<auth>/_inbox/<principal>/ or
            # below receive them, never a broad lease such as /<auth>/ or /.
            prefs = prefs[3:]
        if len(self._channels) >= _MAX_CACHE:
            self._channels.clear()
        self._channels[ch] = prefs
        return prefs

    def route(self, header: dict, raw_header: bytes | None, body: bytes, fsvc: str, finst: str,
              sender: Conn | None, remote: bool = True) -> None:
        """Validate one SEND message and queue it for every connection that wants it.

        The columns are checked once per message with C-level builtins
        (``set(map(type, ...))``, ``min``, ``max``, ``sum``); a structural error
        refuses the whole message before anything is queued.  Then per group: the
        channel is looked up in the validated-channel cache, the ACL consulted
        (cached per channel) and the leases matched (reused while consecutive
        groups share a destination).  A group with a bad or forbidden channel is
        refused alone.  A connection that gets every group receives the sender's
        header and body byte for byte; one that gets some receives a rebuilt
        header and the matching payload bytes.

        Args:
            header: the parsed SEND header (see :mod:`psepr.wire`).
            raw_header: its bytes as received (forwarded as is), or None.
            body: the payloads, concatenated.
            fsvc, finst: the sender's principal and instance (stamped on delivery).
            sender: the sending connection (for errors and counters), or None for
                events the router originates or a peer forwarded.
            remote: also queue the events for the other routers whose interest
                covers them (False for events a peer forwarded: the overlay
                forwards those along their destination list).
        """
        groups = header.get("g")
        ids = header.get("i")
        times = header.get("t")
        fmts = header.get("f")
        plens = header.get("l")
        if (type(groups) is not list or type(ids) is not list or type(times) is not list
                or type(fmts) is not list or type(plens) is not list):
            self._bad(sender, "a SEND header needs lists g, i, t, f and l", None,
                      code=wire.E_PROTOCOL)
            return
        n = len(ids)
        if len(times) != n or len(fmts) != n or len(plens) != n:
            self._bad(sender, f"SEND columns differ in length: i {n}, t {len(times)}, "
                      f"f {len(fmts)}, l {len(plens)}", None, code=wire.E_PROTOCOL)
            return
        if n:
            if set(map(type, plens)) != _INT or min(plens) < 0:
                self._bad(sender, "payload lengths must be non-negative integers", None,
                          code=wire.E_PROTOCOL)
                return
            if sum(plens) != len(body):
                self._bad(sender, f"SEND body has {len(body)} bytes but the payload lengths add "
                          f"up to {sum(plens)}", None, code=wire.E_PROTOCOL)
                return
            clean = raw_header is not None and _clean(raw_header)
            if set(map(type, ids)) != _STR or not (clean or all(map(_name_ok, ids))) \
                    or (clean and max(map(len, ids)) > 1024):
                bad = next((i for i in ids if not _name_ok(i)), None)
                self._bad(sender, f"event id {bad!r} must be printable text without whitespace "
                          f"(at most 1024 characters)", None)
                return
            if (not set(map(type, times)) <= _NUM or set(map(type, fmts)) != _INT
                    or not set(fmts) <= _FMTS):
                self._bad(sender, f"event {ids[0]}...: times must be numbers and formats 0 "
                          f"(JSON) or 1 (XML)", ids[0])
                return
            big = max(plens)
            if big > self.config.max_event_bytes:
                eid = ids[plens.index(big)]
                self._bad(sender, f"event {eid}: payload of {big} bytes exceeds the limit of "
                          f"{self.config.max_event_bytes} bytes", eid, code=wire.E_TOO_BIG)
                return
        elif body:
            self._bad(sender, "SEND with no events has a body", None, code=wire.E_PROTOCOL)
            return
        by_channel = self.leases.by_channel
        channels = self._channels
        types = self._types
        acl = self.acl
        overlay = self.overlay
        gen = self.leases.generation
        if overlay is not None:
            gen += overlay.generation
            if not remote:
                overlay = None
        if self._targets_gen != gen or len(self._targets) > _MAX_CACHE \
                or len(self._ltargets) > _MAX_CACHE or len(self._canon) > _MAX_CACHE:
            self._targets = {}
            self._ltargets = {}
            self._canon = {}
            self._targets_gen = gen
        tcache = self._targets if remote else self._ltargets
        ng = len(groups)
        per_group = [()] * ng  # the targets of each group (none for a refused one)
        same = None            # the targets of every group so far, if all share them
        refused = 0
        total = 0
        last_ch = last_typ = None
        targets: tuple = ()
        for gi, g in enumerate(groups):
            if type(g) is not list or len(g) != 4:
                self._bad(sender, f"group {gi} must be [channel, type, opts, n]", None,
                          code=wire.E_PROTOCOL)
                return
            ch, typ, opts, cnt = g
            if type(cnt) is not int or cnt <= 0:
                self._bad(sender, f"group {gi}: n must be a positive integer, got {cnt!r}", None,
                          code=wire.E_PROTOCOL)
                return
            first = total
            total += cnt
            if total > n:
                break
            if opts is None and ch == last_ch and typ == last_typ and type(ch) is str:
                pass  # same destination as the previous group: reuse `targets`
            elif (opts is None and type(ch) is str and (typ is None or type(typ) is str)
                  and (targets := tcache.get(ch if typ is None else (ch, typ))) is not None
                  and (acl is None or sender is None or sender.may_send_cache.get(ch))):
                last_ch, last_typ = ch, typ   # a destination validated and matched before
            else:
                last_ch = None
                eid = ids[first]
                if typ is not None and (type(typ) is not str or typ not in types):
                    if not _name_ok(typ) or "}" in typ:
                        self._bad(sender, f"event {eid}: type {typ!r} must be printable text "
                                  f"without whitespace or '}}'", eid)
                        refused += cnt
                        continue
                    if len(types) >= _MAX_CACHE:
                        types.clear()
                    types.add(typ)
                prefs = channels.get(ch) if type(ch) is str else None
                if prefs is None:
                    try:
                        prefs = self._channel_prefixes(ch)
                    except ChannelError as exc:
                        self._bad(sender, f"event {eid}: {exc}", eid, code=wire.E_BAD_CHANNEL,
                                  channel=str(ch))
                        refused += cnt
                        continue
                to_svc = to_inst = None
                if opts is not None:
                    if not self._opts_ok(opts):
                        self._bad(sender, f"event {eid}: opts must be an object with keys among "
                                  f"ts, ti, rt, re holding names/channels", eid)
                        refused += cnt
                        continue
                    to_svc = opts.get("ts")
                    to_inst = opts.get("ti")
                if acl is not None and sender is not None:
                    allowed = sender.may_send_cache.get(ch)
                    if allowed is None:
                        allowed = acl.may_send(sender.principal, parse(ch))
                        if len(sender.may_send_cache) < _MAX_CACHE:
                            sender.may_send_cache[ch] = allowed
                    if not allowed:
                        self._bad(sender, f"principal {sender.principal!r} may not send to {ch}",
                                  eid, code=wire.E_DENIED, channel=ch)
                        refused += cnt
                        continue
                targets = self._match(prefs, by_channel, typ, to_svc, to_inst)
                if overlay is not None:
                    targets += overlay.remote_targets(prefs, typ)
                targets = self._canon.setdefault(targets, targets)
                if opts is None:
                    last_ch, last_typ = ch, typ
                    tcache[ch if typ is None else (ch, typ)] = targets
            per_group[gi] = targets
            if targets is not same:
                same = targets if gi == 0 else False
        if total != n:
            self._bad(sender, f"the groups count {total} events but the columns hold {n}", None,
                      code=wire.E_PROTOCOL)
            return
        # -- commit: nothing was queued before the whole message was checked --
        if same is not False and refused == 0:
            # Every group goes to the same connections (one receiver of many
            # channels, say): no per-connection group lists to build.
            all_groups = list(range(ng))
            wanted = dict.fromkeys(same or (), all_groups)
        else:
            wanted = {}    # conn -> indices of the groups it gets
            for gi, targets in enumerate(per_group):
                for c in targets:
                    lst = wanted.get(c)
                    if lst is None:
                        wanted[c] = [gi]
                    else:
                        lst.append(gi)
        n_in = n - refused
        n_out = 0
        dirty = self._dirty
        starts = None
        for c, gis in wanted.items():
            if len(gis) == ng and refused == 0:
                if raw_header is None:
                    raw_header = orjson.dumps(header)
                seg = (fsvc, finst, raw_header, body, n)
                cnt = n
            else:
                if starts is None:
                    starts = _starts(groups, plens)
                seg = _subset(header, body, gis, starts, fsvc, finst)
                cnt = seg[4]
            c.out_segs.append(seg)
            c.out_events += cnt
            c.out_bytes += len(seg[3])
            n_out += cnt
            if not c.dirty:
                c.dirty = True
                dirty.append(c)
        self.events_in += n_in
        self.events_out += n_out
        if sender is not None:
            sender.events_in += n_in

    @staticmethod
    def _match(prefs: tuple, by_channel: dict, typ, to_svc, to_inst) -> tuple:
        """The connections holding at least one lease that covers the channel and type."""
        found: dict = {}
        for p in prefs:
            ls = by_channel.get(p)
            if ls is None:
                continue
            for lease in ls:
                lt = lease.type
                if lt is not None and lt != typ:
                    continue
                c = lease.holder
                if to_svc is not None and c.principal != to_svc:
                    continue
                if to_inst is not None and c.instance != to_inst:
                    continue
                found[c] = True
        return tuple(found)

    @staticmethod
    def _opts_ok(opts) -> bool:
        if type(opts) is not dict or not opts.keys() <= wire.OPT_KEYS:
            return False
        for k, v in opts.items():
            if v is None:
                continue
            if k == "rt":
                try:
                    parse(v)
                except ChannelError:
                    return False
            elif not _name_ok(v):
                return False
        return True

    def _bad(self, sender: Conn | None, message: str, ref, code: str = wire.E_BAD_EVENT,
             channel: str | None = None) -> None:
        if sender is None:
            # The router's own events or ones a peer forwarded: nobody to answer.
            log.warning("router-originated or forwarded event refused: %s", message)
            return
        self._error(sender.ident, code, message, ref=ref, channel=channel)

    # -- output --------------------------------------------------------------
    def flush(self, send: Callable[[Conn, list], bool]) -> None:
        """Hand every pending message to ``send``, one DELIVER per connection per cut.

        Args:
            send: ``send(conn, frames) -> bool``; False means the connection's
                queue was full and the message was dropped.
        """
        dirty = self._dirty
        if not dirty:
            return
        self._dirty = []
        cut = self.config.deliver_bytes
        retry = []
        overlay = self.overlay
        for conn in dirty:
            conn.dirty = False
            if conn.__class__ is PeerOut:
                segs = conn.out_segs
                conn.out_segs = []
                conn.out_bytes = conn.out_events = 0
                for chunk in (segs,) if len(segs) == 1 else \
                        wire.cuts(segs, 3, _MAX_SEGMENTS, cut):   # bounded, like DELIVERs
                    overlay.send_segments(conn, chunk)
                continue
            if conn.detached is not None:
                self._bound_detached(conn)
                continue
            control = conn.control
            if control:
                sent = 0
                for frames in control:
                    if not send(conn, frames):
                        break
                    sent += 1
                conn.control = []
                if sent < len(control) and self.conns.get(conn.ident) is conn:
                    # Queue full: keep the rest (in order) for a later turn, so that a
                    # slow reader still gets its PONG (and the drop count on it).
                    kept = control[sent:sent + _MAX_CONTROL_BACKLOG]
                    self.control_dropped += len(control) - sent - len(kept)
                    conn.control = kept
                    retry.append(conn)
            segs = conn.out_segs
            if not segs:
                continue
            conn.out_segs = []
            conn.out_bytes = 0
            conn.out_events = 0
            # One segment (a lone event's turn) is one DELIVER: no cutting to do.
            for chunk in (segs,) if len(segs) == 1 else wire.cuts(segs, 3, _MAX_SEGMENTS, cut):
                if conn.detached is not None:      # it vanished during this flush
                    conn.out_segs.extend(chunk)
                    conn.out_events += sum(seg[4] for seg in chunk)
                else:
                    self._send_deliver(conn, chunk, send)
        for conn in retry:
            if not conn.dirty:
                conn.dirty = True
                self._dirty.append(conn)

    def _send_deliver(self, conn: Conn, segs: list, send) -> None:
        meta = {"s": list(map(SEG_SENDER, segs))}     # tuples: orjson writes arrays
        if conn.pending_drops:
            meta["d"] = conn.pending_drops
        frames = [_K[Kind.DELIVER], orjson.dumps(meta)]
        n = 0
        for s in segs:
            frames.append(s[2])
            frames.append(s[3])
            n += s[4]
        if send(conn, frames):
            conn.pending_drops = 0
            conn.events_out += n
        elif conn.detached is not None:    # kept for the client's next connection
            conn.out_segs.extend(segs)
            conn.out_events += n
        else:
            conn.pending_drops += n
            conn.dropped += n
            self.dropped += n

    def _bound_detached(self, conn: Conn) -> None:
        """Drop the oldest events kept for a detached session beyond ``_DETACHED_EVENTS``."""
        segs = conn.out_segs
        while conn.out_events > _DETACHED_EVENTS and segs:
            seg = segs.pop(0)
            conn.out_events -= seg[4]
            conn.pending_drops += seg[4]
            conn.dropped += seg[4]
            self.dropped += seg[4]

    def forget(self, ident: bytes) -> None:
        """Drop a session and its leases (BYE, or silent for ``conn_timeout``)."""
        conn = self.conns.pop(ident, None)
        if conn is not None:
            self._drop_conn(conn)

    def _drop_conn(self, conn: Conn) -> None:
        self.leases.release_holder(conn)
        conn.out_segs = []
        key = (conn.principal, conn.instance)
        if self._instances.get(key) is conn:
            del self._instances[key]

    def detach(self, ident: bytes, now: float) -> None:
        """The connection of a session vanished (ZeroMQ: host unreachable).

        The session keeps its leases and up to ``_DETACHED_EVENTS`` undelivered
        events for ``detach_grace`` seconds: a client whose connection ZeroMQ
        re-made underneath it says HELLO again from a new routing id and takes
        the session over (see :meth:`_on_hello`).  Otherwise it is forgotten.
        """
        conn = self.conns.get(ident)
        if conn is not None and conn.detached is None:
            log.info("connection of session %r vanished; keeping it for a new HELLO", conn)
            conn.detached = now

    # -- time ----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Periodic work: expire leases (and tell holders), drop silent sessions, stats."""
        for lease in self.leases.expire(now):
            conn = lease.holder
            if conn.ident in self.conns:
                self._queue_control(conn, Kind.EXPIRED, {"id": lease.id,
                                                         "channel": lease.channel.text})
        limit = now - self.config.conn_timeout
        gone = now - self.config.detach_grace
        for ident in [i for i, c in self.conns.items()
                      if c.last_seen < limit or (c.detached is not None and c.detached < gone)]:
            conn = self.conns[ident]
            log.info("forgetting %s session %r", "silent" if conn.detached is None
                     else "detached", conn)
            # Events kept for a client that never came back: not a slow reader's
            # drops (nobody is told of them), but gone all the same; counted apart.
            self.undelivered += conn.out_events
            self.forget(ident)
        if now >= self.next_stats:
            self.next_stats = now + self.config.stats_interval
            self.publish_stats(now)
        if self.overlay is not None:
            self.overlay.tick(now)

    def next_deadline(self, now: float) -> float:
        """When :meth:`tick` next has work to do."""
        nxt = self.next_stats
        e = self.leases.next_expiry()
        if e is not None and e < nxt:
            nxt = e
        if self.overlay is not None:
            nxt = min(nxt, self.overlay.next_deadline(now))
        return max(nxt, now)

    def load(self) -> dict:
        """The few counters a router advertises to its peers (and ``psepr status`` shows)."""
        return {"connections": len(self.conns), "leases": len(self.leases),
                "events_in": self.events_in, "events_out": self.events_out,
                "dropped": self.dropped}

    def stats(self, now: float) -> dict:
        """The router's counters as a JSON-able dict."""
        t0, in0, out0 = self._last_rates
        dt = max(now - t0, 1e-9)
        slow = sorted((c for c in self.conns.values() if c.dropped),
                      key=lambda c: -c.dropped)[:10]
        return {
            "router": self.config.name, "authority": self.config.authority,
            "time": self._wall(), "uptime": now - self.started,
            "connections": len(self.conns), "leases": len(self.leases),
            "channels_leased": len(self.leases.by_channel),
            "messages_in": self.messages_in, "events_in": self.events_in,
            "events_out": self.events_out, "dropped": self.dropped, "errors": self.errors,
            "control_dropped": self.control_dropped, "undelivered": self.undelivered,
            "in_rate": (self.events_in - in0) / dt, "out_rate": (self.events_out - out0) / dt,
            "queued_events": sum(c.out_events for c in self.conns.values()),
            "slow_connections": [{"principal": c.principal, "instance": c.instance,
                                  "dropped": c.dropped} for c in slow],
            "overlay": self.overlay.counters() if self.overlay is not None else None,
        }

    def publish_stats(self, now: float) -> None:
        """Route a stats event on ``/<authority>/_sys/routers/<name>/stats/``."""
        st = self.stats(now)
        self._last_rates = (now, self.events_in, self.events_out)
        self.publish(self.stats_channel.text, STATS_TYPE, st, tag="stats")

    def publish(self, channel: str, typ: str, payload, remote: bool = True,
                tag: str = "topology") -> None:
        """Route an event the router itself originates (stats, topology).

        Args:
            channel: destination channel text.
            typ: the event type.
            payload: a JSON-able value.
            remote: also to other routers with interest (False: local leases only).
            tag: names the event id (``<router>.<tag>.<seq>``).
        """
        body = orjson.dumps(payload)
        self._stats_seq += 1
        header, _ = wire.pack_events([(f"{self.config.name}.{tag}.{self._stats_seq}", channel, typ,
                                       self._wall(), wire.FMT_JSON, None, body)])
        self.route(header, None, body, ROUTER_SERVICE, self.config.name, None, remote)


_SESSION_KINDS = {
    Kind.LEASE: RouterCore._on_lease,
    Kind.UNLEASE: RouterCore._on_unlease,
    Kind.PING: RouterCore._on_ping,
    Kind.BYE: RouterCore._on_bye,
    Kind.STATS: RouterCore._on_stats,
    Kind.STATUS: RouterCore._on_status,
}
