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
* SEND carries a batch.  For each entry the core validates the fields, looks
  the channel up in a cache of validated channels (one dict hit for a known
  channel), checks the ACL, then looks up each prefix of the channel in the
  lease table (O(depth)) and appends the entry to the output of every
  connection holding a matching lease, once per connection with the list of
  its matching lease ids.  The payload is sliced out of the body, never parsed.
* Output is grouped per connection for the whole turn and flushed as one
  DELIVER message per connection (cut at ``deliver_bytes``).  If ZeroMQ's
  per-connection queue is full the shell reports a drop; the core counts it
  and piggybacks the count ("d") on the next DELIVER or PONG to that client.
* Bad input is answered with ERROR (code, message, the offending id/channel)
  and never raises out of :meth:`handle`.
"""

from __future__ import annotations

import logging
import time as _time
from typing import Callable

import orjson

from psepr.channel import Channel, parse, parse_destination
from psepr.errors import ChannelError
from psepr import wire
from psepr.wire import Kind
from registry.acl import ACL
from registry.leases import LeaseTable
from .config import RouterConfig

log = logging.getLogger("psepr.router")

STATS_TYPE = "http://psepr.org/xs/payload/router-stats"
ROUTER_SERVICE = "psepr-router"
_K = wire.KIND_BYTES
_MAX_CACHE = 100_000
_JSON_NUM = (int, float)


def _name_ok(s: object) -> bool:
    return type(s) is str and 0 < len(s) <= 1024 and s.isprintable() and " " not in s


class Conn:
    """One client session, keyed by its ZeroMQ routing id."""

    __slots__ = ("ident", "principal", "instance", "last_seen", "out_entries", "out_chunks",
                 "out_bytes", "control", "dirty", "pending_drops", "events_in", "events_out",
                 "dropped", "errors", "may_send_cache", "created")

    def __init__(self, ident: bytes, principal: str, instance: str, now: float) -> None:
        self.ident = ident
        self.principal = principal
        self.instance = instance
        self.last_seen = now
        self.created = now
        self.out_entries: list = []
        self.out_chunks: list = []
        self.out_bytes = 0
        self.control: list = []      # framed control messages waiting for flush
        self.dirty = False
        self.pending_drops = 0       # drops not yet reported to the client
        self.events_in = 0
        self.events_out = 0
        self.dropped = 0
        self.errors = 0
        self.may_send_cache: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"Conn({self.principal}/{self.instance})"


class RouterCore:
    """All router state and decisions.

    Args:
        config: the router configuration.
        acl: access-control list (None: everyone may do everything).
        now: the start time.
    """

    def __init__(self, config: RouterConfig, acl: ACL | None = None, now: float = 0.0) -> None:
        self.config = config
        self.acl = acl
        self.leases = LeaseTable(config.max_lease, config.max_leases_per_conn)
        self.conns: dict[bytes, Conn] = {}
        self._dirty: list[Conn] = []
        self._channels: dict[str, tuple[str, ...]] = {}   # validated channel -> prefixes
        self._types: set[str] = set()                      # validated type names
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
        self.messages_in = 0

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
            kind, header, body = wire.decode(frames)
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
                self._on_send(conn, header, body)
            elif kind == Kind.HELLO:
                self._on_hello(ident, header, now, principal)
            elif kind in _SESSION_KINDS:
                if conn is None:
                    self._error(ident, wire.E_NO_SESSION, "unknown session: say HELLO first",
                                req=header.get("req"))
                    return
                conn.last_seen = now
                _SESSION_KINDS[kind](self, conn, header, now)
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
            if val is not None and not _name_ok(val):
                self._error(ident, wire.E_PROTOCOL, f"hello: {name} {val!r} must be printable "
                            f"text without whitespace")
                return
        if principal is None:
            principal = service or "anonymous"
        old = self.conns.pop(ident, None)
        if old is not None:
            self.leases.release_holder(old)
        conn = Conn(ident, principal, instance or ident.hex(), now)
        self.conns[ident] = conn
        c = self.config
        self._queue_control(conn, Kind.WELCOME, {
            "v": wire.PROTOCOL_VERSION, "router": c.name, "authority": c.authority,
            "principal": conn.principal, "instance": conn.instance, "max_lease": c.max_lease,
            "max_event": c.max_event_bytes, "max_message": c.max_message_bytes,
            "req": h.get("req")})

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
        self._queue_control(conn, Kind.LEASED, {"id": lid, "channel": channel.text, "type": typ,
                                                "granted": lease.granted, "req": req})

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

    # -- the hot path --------------------------------------------------------
    def _channel_prefixes(self, ch: str) -> tuple[str, ...]:
        channel = parse_destination(ch)
        prefs = channel.prefixes()
        if len(self._channels) >= _MAX_CACHE:
            self._channels.clear()
        self._channels[ch] = prefs
        return prefs

    def _on_send(self, conn: Conn, header: dict, body) -> None:
        entries = header.get("e")
        if type(entries) is not list:
            self._error(conn.ident, wire.E_PROTOCOL, "SEND header needs a list 'e' of entries")
            return
        mv = memoryview(body) if body is not None else memoryview(b"")
        total = len(mv)
        used, ok = self.route(entries, mv, conn.principal, conn.instance, conn)
        if ok and used != total:
            self._error(conn.ident, wire.E_PROTOCOL,
                        f"SEND body has {total} bytes but the entries' lengths add up to {used}")

    def route(self, entries: list, mv: memoryview, fsvc: str, finst: str,
              sender: Conn | None) -> tuple[int, bool]:
        """Route a batch of validated-on-the-fly entries to matching leases.

        Args:
            entries: SEND entries (see :mod:`psepr.wire`).
            mv: the body, payloads concatenated.
            fsvc, finst: the sender's principal and instance (stamped on delivery).
            sender: the sending connection (for errors and counters), or None for
                events the router originates.

        Returns:
            ``(bytes_used, ok)``: body bytes consumed, and False if a structural
            error stopped the batch (the events before it were routed).
        """
        by_channel = self.leases.by_channel
        channels = self._channels
        types = self._types
        acl = self.acl
        max_event = self.config.max_event_bytes
        total = len(mv)
        off = 0
        n_in = 0
        n_out = 0
        ok = True
        for e in entries:
            # -- validate (cheap checks first; names cached) ---------------
            if type(e) is not list:
                self._bad(sender, "each SEND entry must be a list", None)
                ok = False
                break
            ln = len(e)
            if ln == 6:
                eid, ch, typ, t, fmt, plen = e
                opts = None
            elif ln == 7:
                eid, ch, typ, t, fmt, plen, opts = e
            else:
                self._bad(sender, f"a SEND entry has 6 or 7 elements, got {ln}", None)
                ok = False
                break
            if type(plen) is not int or plen < 0 or off + plen > total:
                self._bad(sender, f"entry payload length {plen!r} is not a valid length within "
                          f"the {total}-byte body", eid if type(eid) is str else None)
                ok = False
                break
            start = off
            off += plen
            if not _name_ok(eid):
                self._bad(sender, f"event id {eid!r} must be printable text without whitespace",
                          None)
                continue
            if type(t) not in _JSON_NUM or (fmt != 0 and fmt != 1) or type(fmt) is not int:
                self._bad(sender, f"event {eid}: time must be a number and fmt 0 or 1", eid)
                continue
            if typ is not None and typ not in types:
                if not _name_ok(typ):
                    self._bad(sender, f"event {eid}: type {typ!r} must be printable text "
                              f"without whitespace", eid)
                    continue
                if len(types) >= _MAX_CACHE:
                    types.clear()
                types.add(typ)
            if plen > max_event:
                self._bad(sender, f"event {eid}: payload of {plen} bytes exceeds the limit of "
                          f"{max_event} bytes", eid, code=wire.E_TOO_BIG)
                continue
            prefs = channels.get(ch) if type(ch) is str else None
            if prefs is None:
                try:
                    prefs = self._channel_prefixes(ch)
                except ChannelError as exc:
                    self._bad(sender, f"event {eid}: {exc}", eid, code=wire.E_BAD_CHANNEL,
                              channel=str(ch))
                    continue
            to_svc = to_inst = None
            if opts is not None:
                if not self._opts_ok(opts):
                    self._bad(sender, f"event {eid}: opts must be an object with keys among "
                              f"ts, ti, rt, re holding names/channels", eid)
                    continue
                to_svc = opts.get("ts")
                to_inst = opts.get("ti")
            if acl is not None and sender is not None:
                ok = sender.may_send_cache.get(ch)
                if ok is None:
                    ok = acl.may_send(sender.principal, parse(ch))
                    sender.may_send_cache[ch] = ok
                if not ok:
                    self._bad(sender, f"principal {sender.principal!r} may not send to {ch}",
                              eid, code=wire.E_DENIED, channel=ch)
                    continue
            n_in += 1
            # -- match --------------------------------------------------------
            first = None
            ids = None
            others = None
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
                    if first is None:
                        first = c
                        ids = [lease.id]
                    elif c is first:
                        ids.append(lease.id)
                    else:
                        if others is None:
                            others = {}
                        lst = others.get(c)
                        if lst is None:
                            others[c] = [lease.id]
                        else:
                            lst.append(lease.id)
            if first is None:
                continue
            payload = mv[start:off]
            item = [ids, fsvc, finst, e]
            first.out_entries.append(item)
            first.out_chunks.append(payload)
            first.out_bytes += plen
            if not first.dirty:
                first.dirty = True
                self._dirty.append(first)
            n_out += 1
            if others is not None:
                for c, cids in others.items():
                    c.out_entries.append([cids, fsvc, finst, e])
                    c.out_chunks.append(payload)
                    c.out_bytes += plen
                    if not c.dirty:
                        c.dirty = True
                        self._dirty.append(c)
                    n_out += 1
        self.events_in += n_in
        self.events_out += n_out
        if sender is not None:
            sender.events_in += n_in
        return off, ok

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
            log.error("router-originated event refused: %s", message)
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
        for conn in dirty:
            conn.dirty = False
            for frames in conn.control:
                send(conn, frames)
            conn.control = []
            entries = conn.out_entries
            if not entries:
                continue
            chunks = conn.out_chunks
            conn.out_entries = []
            conn.out_chunks = []
            nbytes = conn.out_bytes
            conn.out_bytes = 0
            if nbytes <= cut:
                self._send_deliver(conn, entries, chunks, send)
            else:
                i = 0
                n = len(entries)
                while i < n:
                    j = i
                    size = 0
                    while j < n and (j == i or size + len(chunks[j]) <= cut):
                        size += len(chunks[j])
                        j += 1
                    self._send_deliver(conn, entries[i:j], chunks[i:j], send)
                    i = j

    def _send_deliver(self, conn: Conn, entries: list, chunks: list, send) -> None:
        header = {"e": entries}
        if conn.pending_drops:
            header["d"] = conn.pending_drops
        frames = [_K[Kind.DELIVER], orjson.dumps(header), b"".join(chunks)]
        if send(conn, frames):
            conn.pending_drops = 0
            conn.events_out += len(entries)
        else:
            n = len(entries)
            conn.pending_drops += n
            conn.dropped += n
            self.dropped += n

    def forget(self, ident: bytes) -> None:
        """Drop a session and its leases (BYE, timeout, or the peer vanished)."""
        conn = self.conns.pop(ident, None)
        if conn is not None:
            self.leases.release_holder(conn)
            conn.out_entries = []
            conn.out_chunks = []

    # -- time ----------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Periodic work: expire leases (and tell holders), drop silent sessions, stats."""
        for lease in self.leases.expire(now):
            conn = lease.holder
            if conn.ident in self.conns:
                self._queue_control(conn, Kind.EXPIRED, {"id": lease.id,
                                                         "channel": lease.channel.text})
        limit = now - self.config.conn_timeout
        for ident in [i for i, c in self.conns.items() if c.last_seen < limit]:
            log.info("forgetting silent session %r", self.conns[ident])
            self.forget(ident)
        if now >= self.next_stats:
            self.next_stats = now + self.config.stats_interval
            self.publish_stats(now)

    def next_deadline(self, now: float) -> float:
        """When :meth:`tick` next has work to do."""
        nxt = self.next_stats
        e = self.leases.next_expiry()
        if e is not None and e < nxt:
            nxt = e
        return max(nxt, now)

    def stats(self, now: float) -> dict:
        """The router's counters as a JSON-able dict."""
        t0, in0, out0 = self._last_rates
        dt = max(now - t0, 1e-9)
        slow = sorted((c for c in self.conns.values() if c.dropped),
                      key=lambda c: -c.dropped)[:10]
        return {
            "router": self.config.name, "authority": self.config.authority,
            "time": _time.time(), "uptime": now - self.started,
            "connections": len(self.conns), "leases": len(self.leases),
            "channels_leased": len(self.leases.by_channel),
            "messages_in": self.messages_in, "events_in": self.events_in,
            "events_out": self.events_out, "dropped": self.dropped, "errors": self.errors,
            "in_rate": (self.events_in - in0) / dt, "out_rate": (self.events_out - out0) / dt,
            "queued_events": sum(len(c.out_entries) for c in self.conns.values()),
            "slow_connections": [{"principal": c.principal, "instance": c.instance,
                                  "dropped": c.dropped} for c in slow],
        }

    def publish_stats(self, now: float) -> None:
        """Route a stats event on ``/<authority>/_sys/routers/<name>/stats/``."""
        st = self.stats(now)
        self._last_rates = (now, self.events_in, self.events_out)
        payload = orjson.dumps(st)
        self._stats_seq += 1
        entry = [f"{self.config.name}.stats.{self._stats_seq}", self.stats_channel.text,
                 STATS_TYPE, _time.time(), wire.FMT_JSON, len(payload)]
        self.route([entry], memoryview(payload), ROUTER_SERVICE, self.config.name, None)


_SESSION_KINDS = {
    Kind.LEASE: RouterCore._on_lease,
    Kind.UNLEASE: RouterCore._on_unlease,
    Kind.PING: RouterCore._on_ping,
    Kind.BYE: RouterCore._on_bye,
    Kind.STATS: RouterCore._on_stats,
}
