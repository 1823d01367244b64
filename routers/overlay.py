"""The overlay core: peer links, flooding, and forwarding between routers (pure).

Theory of operation
-------------------
Routers link to each other over *peer links*: a DEALER dialing another
router's peer ROUTER socket.  Either side may configure a link; once the
dialer's PEER_HELLO is answered by PEER_WELCOME the link carries traffic both
ways.  Both ends ping an idle link every ``peer_ping`` seconds and declare it
down after ``peer_dead_after`` seconds of silence; a dialed link then says
hello again until its peer answers.  A router that stops says PEER_BYE on
every up link first: its peers take their links down at once (and log a stop,
not a failure) instead of after ``peer_dead_after`` of silence.  A dialer told that its peer lost the
session (it restarted, or noticed a partition first) says hello again on the
link it keeps up, and both ends send everything again on the welcome: the
rest of the overlay sees no flap.  If two routers dial each other, both
links are used for liveness and the one dialed by the router with the smaller
name carries the traffic (both ends agree without talking).

The control plane is two kinds of flooded advertisements (docs/protocol.md):

* LINKSTATE (:mod:`registry.linkstate`): a router's up neighbours, its
  interest sequence and load counters; originated when a neighbour comes or
  goes and refreshed every ``lsa_refresh`` seconds as soft state.
* INTEREST (:mod:`registry.interest`): the aggregated (prefix, type) pairs of
  a router's local leases, as deltas numbered by a sequence (one per loop
  turn that changed something), or whole when a neighbour asks (SYNC) or a
  link comes up (every advert known is sent over a new link).

A router accepts an advertisement newer than the one it holds and passes it
to every other up neighbour: flooding over reliable links reaches every
router once per advert.  A delta that does not follow the held sequence is a
gap: the router asks the neighbour that sent it for the whole summary.  An
advert not refreshed within ``lsa_max_age`` disappears with its router's
interest; a router that restarted (a larger epoch) replaces its former self at
once.  Each accepted advert is also published to local lease holders on
``/<authority>/_sys/topology/<router>/``.

Forwarding (explicit replication): for an event from a local client the
router looks up the routers whose interest covers the event's channel and
type, keeps the reachable ones, groups them by next hop on the shortest-path
tree and sends each next hop one FORWARD carrying the sender's segment byte
for byte and that group's destination list.  A router in the list delivers
to its own leases; the rest of the list is split again by next hop.  Events
therefore reach exactly the routers with interest, once each while routes
agree; a bounded cache of (origin, epoch, segment) ids refuses a duplicate
delivery and a hop limit ends any loop while routes converge.

Lease barrier: a lease asked with ``propagated=True`` is answered once every
reachable router acknowledged (INTEREST_ACK, routed back hop by hop) the
interest sequence that contains it, or after ``barrier_timeout`` with the
routers that did not.
"""

from __future__ import annotations

import logging
from itertools import chain
from operator import itemgetter
from typing import Callable

import orjson

from psepr import wire
from psepr.channel import parse
from psepr.errors import ChannelError
from psepr.wire import Kind
from registry.interest import APPLIED, GAP, InterestTable, LocalInterest
from registry.linkstate import Advert, LinkState, advert_from_wire

log = logging.getLogger("psepr.overlay")

LINKSTATE_TYPE = "http://psepr.org/xs/payload/linkstate"
INTEREST_TYPE = "http://psepr.org/xs/payload/interest"
_K = wire.KIND_BYTES
#: Pairs per INTEREST message; bigger changes are split (each part its own seq).
_MAX_PAIRS = 4000
#: Seconds a dialed peer may stay silent (no welcome, no refusal) before the
#: router logs that nothing answers there (then once a minute).
_SILENT_WARN = 10.0
#: A segment's ``(from_service, from_instance)``; segments are
#: ``(fsvc, finst, header, body, n)`` tuples (see RouterCore.route).
SEG_SENDER = itemgetter(0, 1)
_LIST = {list}
_PAIR = {2}
_STR = {str}
_INT = {int}


class SeenCache:
    """The keys of recently seen segments, bounded, at O(1) per key.

    Two generations of sets: a key is new if neither holds it; when the current
    generation reaches half the limit it becomes the old one (the older is
    forgotten), so the cache remembers at least the last ``limit // 2`` keys and
    never holds more than ``limit``.  (A dict used as a FIFO, deleting its first
    key, costs CPython a scan over every key deleted before it: 32 us per key at
    100,000 keys.)

    Args:
        limit: the most keys held (at least 2).
    """

    __slots__ = ("_cur", "_old", "_half")

    def __init__(self, limit: int) -> None:
        self._cur: set = set()
        self._old: set = set()
        self._half = max(1, limit // 2)

    def add(self, key) -> bool:
        """Note ``key``.

        Returns:
            True if it was not seen before (within the bound).
        """
        cur = self._cur
        if key in cur or key in self._old:
            return False
        cur.add(key)
        if len(cur) >= self._half:
            self._old, self._cur = cur, set()
        return True

    def __len__(self) -> int:
        return len(self._cur) + len(self._old)


class Link:
    """One transport connection to a peer router.

    Attributes:
        id: the shell's handle: ``("d", url)`` for a link this router dialed,
            ``("l", routing_id)`` for one it accepted.
        peer: the peer's router name once known.
        epoch: the peer's epoch (from its hello).
        up: hello exchanged and not silent for ``peer_dead_after``.
    """

    __slots__ = ("id", "dialed", "peer", "epoch", "up", "last_heard", "last_ping", "rtt",
                 "since", "synced", "rejoin")

    def __init__(self, id: tuple, dialed: bool) -> None:
        self.id = id
        self.dialed = dialed
        self.peer: str | None = None
        self.epoch = 0
        self.up = False
        self.last_heard = 0.0
        self.last_ping = 0.0
        self.rtt: float | None = None
        self.since = 0.0
        self.synced = float("-inf")    # when this side last sent it everything it knew
        self.rejoin: float | None = None   # when we said hello again on this up link


class PeerOut:
    """Events queued for one next hop and one destination list, in one loop turn.

    It stands beside the client connections in the router core's routing
    tables (same ``out_*`` and ``dirty`` fields), so forwarding costs the hot
    path nothing extra.
    """

    __slots__ = ("next_hop", "dests", "out_segs", "out_bytes", "out_events", "dirty")

    def __init__(self, next_hop: str, dests: tuple) -> None:
        self.next_hop = next_hop
        self.dests = dests
        self.out_segs: list = []
        self.out_bytes = 0
        self.out_events = 0
        self.dirty = False

    def __repr__(self) -> str:
        return f"PeerOut(via {self.next_hop} to {','.join(self.dests)})"


class _Barrier:
    __slots__ = ("conn", "reply", "seq", "waiting", "deadline")

    def __init__(self, conn, reply: dict, deadline: float) -> None:
        self.conn = conn
        self.reply = reply
        self.seq: int | None = None
        self.waiting: set = set()
        self.deadline = deadline


def _pairs(v, what: str) -> list:
    """Validate a list of [channel, type] pairs from a peer."""
    if type(v) is not list:
        raise ValueError(f"{what} must be a list of [channel, type] pairs")
    out = []
    for p in v:
        if type(p) is not list or len(p) != 2 or type(p[0]) is not str \
                or (p[1] is not None and type(p[1]) is not str):
            raise ValueError(f"{what}: {p!r} is not a [channel, type] pair")
        try:
            text = parse(p[0]).text
        except ChannelError as exc:
            raise ValueError(f"{what}: {exc}") from None
        out.append((text, p[1]))
    return out


class OverlayCore:
    """Peer links, advertisements, routes and forwarding for one router.

    Args:
        config: the router's :class:`~routers.config.RouterConfig`.
        core: the :class:`~routers.core.RouterCore` (local delivery, stats).
        epoch: this run's epoch: larger than any earlier run's (the shell
            passes wall-clock nanoseconds at start).
        now: the start time (monotonic).
        peer_allowed: ``peer_allowed(name, principal) -> bool``; None allows any.
    """

    def __init__(self, config, core, epoch: int, now: float,
                 peer_allowed: Callable[[str, str | None], bool] | None = None) -> None:
        self.config = config
        self.core = core
        self.me = config.name
        self.epoch = epoch
        self.peer_allowed = peer_allowed
        self.links: dict[tuple, Link] = {}
        self.linkstate = LinkState(self.me)
        self.interest = InterestTable()
        self.local = LocalInterest()
        self._out: list = []                  # (link id, frames) for the shell
        self._via: dict[str, Link] | None = None
        self._lsa_seq = 0
        self._iseq = 0
        self._pend_add: dict = {}             # interest delta of this turn (ordered sets)
        self._pend_del: dict = {}
        self._barriers: list[_Barrier] = []
        self._ack_owed: dict[str, int] = {}   # origin -> flagged seq we must acknowledge
        self._seen = SeenCache(config.seen_cache)
        self._seg_seq = 0
        self._outs: dict = {}
        self._outs_gen = -1
        self._next_refresh = now
        self._next_tick = now
        self._topology_prefix = f"/{config.authority}/_sys/topology/"
        self._warned: dict = {}              # rate limit for repeated warnings
        # counters
        self.forwarded_out = 0
        self.forwarded_in = 0
        self.duplicates = 0
        self.no_route = 0
        self.hop_dropped = 0
        self.peer_errors = 0
        self.dropped = 0
        self._originate(now)

    # -- shell interface ------------------------------------------------------------
    def dialed(self, link_id: tuple, now: float) -> None:
        """The shell dialed a configured peer endpoint; say hello on it."""
        link = Link(link_id, dialed=True)
        link.last_heard = now       # the silence that tick() reports counts from here
        self.links[link_id] = link
        self._hello(link, now)

    def take_out(self) -> list:
        """``[(link id, frames), ...]`` to send now (the interest delta included)."""
        if self._pend_add or self._pend_del or self._barriers:
            self._flush_interest()
        out = self._out
        if out:
            self._out = []
        return out

    def goodbye(self) -> list:
        """Queue PEER_BYE on every up link: this router is stopping (see the module
        docstring).  The shell sends it with :meth:`take_out` before closing.

        Returns:
            The ids of the accepted links among them: their peers dialed us, and
            answer the goodbye with a hello (the link is down; they dial again).
        """
        msg = wire.encode(Kind.PEER_BYE, {"router": self.me, "epoch": self.epoch})
        told = []
        for link in self.links.values():
            if link.up:
                self._send(link.id, msg)
                if not link.dialed:
                    told.append(link.id)
        return told

    def link_gone(self, link_id: tuple, now: float) -> None:
        """The shell found the link's peer gone (e.g. EHOSTUNREACH)."""
        link = self.links.get(link_id)
        if link is not None and link.up:
            self._link_down(link, now, "peer disconnected")

    @property
    def generation(self) -> int:
        """Changes whenever routes or remote interest change (for match caches)."""
        return self.linkstate.generation + self.interest.generation

    # -- leases (called by the router core) ---------------------------------------------
    def lease_added(self, text: str, typ: str | None) -> None:
        self._pend(*self.local.add(text, typ))

    def lease_removed(self, text: str, typ: str | None) -> None:
        self._pend(*self.local.remove(text, typ))

    def _pend(self, added: list, removed: list) -> None:
        # Changes within one turn cancel out (added then removed: nothing to say).
        for p in added:
            if p in self._pend_del:
                del self._pend_del[p]
            else:
                self._pend_add[p] = True
        for p in removed:
            if p in self._pend_add:
                del self._pend_add[p]
            else:
                self._pend_del[p] = True

    def barrier(self, conn, reply: dict, now: float) -> None:
        """Answer ``reply`` (a LEASED header) to ``conn`` once every router has the interest."""
        self._barriers.append(_Barrier(conn, reply, now + self.config.barrier_timeout))

    def _flush_interest(self) -> None:
        fresh = [b for b in self._barriers if b.seq is None]
        if not (self._pend_add or self._pend_del or fresh):
            return
        ops = [(True, p) for p in self._pend_add] + [(False, p) for p in self._pend_del]
        self._pend_add, self._pend_del = {}, {}
        chunks = [ops[i:i + _MAX_PAIRS] for i in range(0, len(ops), _MAX_PAIRS)] or [[]]
        for i, chunk in enumerate(chunks):
            self._iseq += 1
            h = {"r": self.me, "e": self.epoch, "q": self._iseq, "full": False,
                 "add": [p for a, p in chunk if a], "del": [p for a, p in chunk if not a]}
            if fresh and i == len(chunks) - 1:
                h["ack"] = True
            self._flood(wire.encode(Kind.INTEREST, h), None)
        if fresh:
            reach = self.linkstate.reachable()
            for b in fresh:
                b.seq = self._iseq
                b.waiting = set(reach)
            self._check_barriers()

    # -- input from peers ------------------------------------------------------------------
    def on_message(self, link_id: tuple, frames: list, now: float,
                   principal: str | None = None) -> None:
        """Handle one message from a peer link.  Never raises on bad input."""
        try:
            kind, h, rest = wire.decode(frames)
        except wire.ProtocolError as exc:
            self._peer_error(link_id, str(exc))
            return
        try:
            if kind == Kind.PEER_HELLO:
                self._on_hello(link_id, h, now, principal)
                return
            link = self.links.get(link_id)
            if kind == Kind.PEER_WELCOME and link is not None and link.dialed:
                self._on_welcome(link, h, now)
                return
            if link is None or not link.up:
                if kind == Kind.PEER_BYE:
                    return            # a link that is down already: nothing to say to it
                if link is not None:
                    link.last_heard = now     # answered, if only to refuse: not silent
                if kind == Kind.HELLO:
                    # A client given this peer endpoint: say where clients connect.
                    self._send(link_id, wire.encode(Kind.ERROR, {
                        "code": wire.E_PROTOCOL, "message": "this is a router's peer endpoint "
                        "(--peer-listen): clients connect to its --listen endpoint"}))
                elif link is not None and link.dialed and kind != Kind.ERROR:
                    # The peer still holds the link up (a stale message queued during a
                    # partition, say).  Asking it to say hello would only make it take
                    # the link down (a listener cannot dial): say hello ourselves.
                    self._hello_soon(link, now)
                elif kind == Kind.ERROR and link is not None and link.dialed:
                    if h.get("code") == wire.E_NO_SESSION:
                        self._hello_soon(link, now)    # the peer lost us: hello again
                    else:
                        # Refused (ACL, authority, version...): say why, and let tick()
                        # retry at the ping pace - the peer's config may change.
                        message = str(h.get("message"))   # any JSON value: keys hash
                        self._warn(now, ("refused", link.id, message),
                                   "peer %s refused the link: %s", link.id[1], message)
                elif kind != Kind.ERROR:
                    # A peer that restarted under us, or a stray: ask for a hello.
                    self._send(link_id, wire.encode(Kind.ERROR, {
                        "code": wire.E_NO_SESSION, "message": "peer link: say PEER_HELLO"}))
                return
            link.last_heard = now
            handler = _HANDLERS.get(kind)
            if handler is None:
                self._peer_error(link_id, f"unknown peer message kind {kind}")
                return
            handler(self, link, h, rest, now)
        except ValueError as exc:
            self._peer_error(link_id, str(exc))
        except Exception:   # a bug must not kill the router
            log.exception("internal error on peer message kind %s", kind)

    def _warn(self, now: float, key: tuple, fmt: str, *args) -> None:
        """Log a warning at most once a minute per ``key`` (a retrying peer repeats)."""
        last = self._warned.get(key)
        if last is None or now - last >= 60.0:
            if len(self._warned) > 1000:
                self._warned.clear()
            self._warned[key] = now
            log.warning(fmt, *args)

    def _peer_error(self, link_id: tuple, message: str) -> None:
        self.peer_errors += 1
        link = self.links.get(link_id)
        log.warning("bad message from peer %s: %s", link.peer if link else link_id, message)
        self._send(link_id, wire.encode(Kind.ERROR, {"code": wire.E_PROTOCOL,
                                                     "message": message}))

    def _check_hello(self, h: dict, principal: str | None, link: Link | None) -> str:
        """The name of the peer saying hello (or welcome) on ``link``.

        Raises:
            ValueError: the hello is malformed, or the peer may not link: another
                authority, this router's own name, refused by the ACL, or a name
                that a newer run holds on another live link (see ``_twin``).
        """
        v, name, epoch, auth = h.get("v"), h.get("router"), h.get("epoch"), h.get("authority")
        if v != wire.PROTOCOL_VERSION:
            raise ValueError(f"peer protocol version {v!r} not supported; this router speaks "
                             f"{wire.PROTOCOL_VERSION}")
        if type(name) is not str or not name or "/" in name or not name.isprintable() \
                or " " in name:
            raise ValueError(f"peer router name {name!r} must be printable text without "
                             f"whitespace or '/'")
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"peer {name}: epoch must be a non-negative integer")
        if auth != self.config.authority:
            raise ValueError(f"peer {name} serves authority {auth!r}, this router "
                             f"{self.config.authority!r}")
        if name == self.me:
            raise ValueError(f"peer calls itself {name!r}, the name of this router")
        if self.peer_allowed is not None and not self.peer_allowed(name, principal):
            raise ValueError(f"peer {name!r} is not allowed by this router's ACL")
        twin = self._twin(link, name, epoch)
        if twin is not None:
            raise ValueError(f"router name {name!r} is taken by another live router (its "
                             f"epoch {twin.epoch}, this one's {epoch}): router names must be "
                             f"unique in an overlay")
        return name

    def _twin(self, link: Link | None, name: str, epoch: int) -> Link | None:
        """Another up link to a router called ``name`` whose run is newer than ``epoch``.

        A restarted router's former run never says hello again, so a hello from an
        older run while a newer one is linked comes from a second live router with
        the same name (a copied configuration).  Taking it would put two routers
        behind one name, and the overlay's routes and interest would mix them up;
        it is refused, and both sides log why.  (A newer run's hello is a restart:
        ``_link_up`` takes the former run's link down.)
        """
        for other in self.links.values():
            if other is not link and other.up and other.peer == name and other.epoch > epoch:
                return other
        return None

    def _hello_header(self) -> dict:
        return {"v": wire.PROTOCOL_VERSION, "router": self.me, "epoch": self.epoch,
                "authority": self.config.authority}

    def _on_hello(self, link_id: tuple, h: dict, now: float, principal: str | None) -> None:
        try:
            name = self._check_hello(h, principal, self.links.get(link_id))
        except ValueError as exc:
            self._refuse(link_id, str(exc), now)
            return
        link = self.links.get(link_id)
        if link is None:
            link = self.links[link_id] = Link(link_id, dialed=False)
        again = link.up
        self._send(link_id, wire.encode(Kind.PEER_WELCOME, self._hello_header()))
        self._link_up(link, name, h["epoch"], now)
        if again and now - link.synced >= self.config.peer_ping:
            # A hello on a link this side holds up: the dialer had taken it down and
            # dropped what came meanwhile (the floods of a partition's last moments),
            # so it gets everything again.  Hellos queued during a partition arrive
            # in a burst at the heal: one sync answers them all.
            self._sync_all(link, now)

    def _on_welcome(self, link: Link, h: dict, now: float) -> None:
        try:
            name = self._check_hello(h, None, link)
        except ValueError as exc:
            self._refuse(link.id, str(exc), now)
            return
        self._link_up(link, name, h["epoch"], now)

    def _refuse(self, link_id: tuple, message: str, now: float) -> None:
        """Refuse a peer's hello or welcome: count it, log it (once a minute), tell it."""
        self.peer_errors += 1
        self._warn(now, ("hello", message), "refused peer link: %s", message)
        self._send(link_id, wire.encode(Kind.ERROR, {"code": wire.E_DENIED, "message": message}))

    def _on_bye(self, link: Link, h: dict, rest: list, now: float) -> None:
        # Only from the run this link is up with: a late goodbye of a former run must
        # not take its successor's link down.
        if h.get("router") == link.peer and h.get("epoch") == link.epoch:
            self._link_down(link, now, "it is stopping (it said goodbye)", graceful=True)

    def _on_ping(self, link: Link, h: dict, rest: list, now: float) -> None:
        self._send(link.id, wire.encode(Kind.PEER_PONG, {"t": h.get("t")}))

    def _on_pong(self, link: Link, h: dict, rest: list, now: float) -> None:
        t = h.get("t")
        if type(t) in (int, float) and 0 <= now - t < 3600:
            link.rtt = now - t

    def _on_error(self, link: Link, h: dict, rest: list, now: float) -> None:
        code = h.get("code")
        if link.rejoin is not None:
            if code != wire.E_NO_SESSION:    # the answer to our hello: refused
                self._link_down(link, now, f"peer refused us: {h.get('message')}")
            return     # a burst of "say PEER_HELLO" answers one hello
        message = str(h.get("message"))     # any JSON value: the key must be hashable
        self._warn(now, ("reports", link.peer, message), "peer %s reports: %s", link.peer, message)
        if code != wire.E_NO_SESSION:
            return
        if not link.dialed:
            self._link_down(link, now, "peer lost our session")
            return
        # The peer lost our session (it restarted, or declared the link down before
        # we did): say hello again and keep the link up meanwhile, so that the rest
        # of the overlay sees no flap; its welcome re-sends everything (_link_up),
        # and tick() takes the link down if no welcome comes.
        link.rejoin = now
        self._hello(link, now)

    def _on_linkstate(self, link: Link, h: dict, rest: list, now: float) -> None:
        adv = advert_from_wire(h)
        if adv.router == self.me:
            if adv.epoch > self.epoch:
                log.error("router %s with a newer epoch exists elsewhere: two routers share "
                          "the name %r", adv.router, self.me)
            return
        self.interest.drop_before(adv.router, adv.epoch)   # a restart: old interest is gone
        if not self.linkstate.accept(adv, now):
            return
        self._flood(wire.encode(Kind.LINKSTATE, h), link.peer)
        held = self.interest.seq(adv.router)
        if adv.interest_seq and (held is None or held < (adv.epoch, adv.interest_seq)):
            # We missed an interest delta (or never had the summary): ask the sender.
            self._send(link.id, wire.encode(Kind.SYNC, {"r": adv.router}))
        self._routes_changed()
        self._publish(adv.router, LINKSTATE_TYPE, h)

    def _on_interest(self, link: Link, h: dict, rest: list, now: float) -> None:
        r, e, q, full = h.get("r"), h.get("e"), h.get("q"), h.get("full")
        if type(r) is not str or type(e) is not int or type(q) is not int or type(full) \
                is not bool:
            raise ValueError("interest: r must be a string, e and q integers, full a boolean")
        if r == self.me:
            return
        add = _pairs(h.get("add", []), f"interest from {r}: add")
        rm = [] if full else _pairs(h.get("del", []), f"interest from {r}: del")
        if h.get("ack"):
            self._ack_owed[r] = max(self._ack_owed.get(r, 0), q)
        cur_adv = self.linkstate.adverts.get(r)
        if cur_adv is not None and e < cur_adv.epoch:
            return                      # from a former run of that router
        status = self.interest.apply(r, e, q, full, add, rm)
        if status == APPLIED:
            self._flood(wire.encode(Kind.INTEREST, h), link.peer)
            owed = self._ack_owed.get(r)
            if owed is not None and q >= owed:
                del self._ack_owed[r]
                self._route_ack(r, e, q, self.me, self.config.hop_limit)
            self._publish(r, INTEREST_TYPE, {"r": r, "e": e, "q": q, "full": full,
                                             "add": h.get("add", []), "del": h.get("del", [])})
        elif status == GAP:
            self._send(link.id, wire.encode(Kind.SYNC, {"r": r}))

    def _on_sync(self, link: Link, h: dict, rest: list, now: float) -> None:
        r = h.get("r")
        if type(r) is not str:
            raise ValueError("sync: r must be a router name")
        msg = self._full_interest(r)
        if msg is not None:
            self._send(link.id, msg)

    def _on_ack(self, link: Link, h: dict, rest: list, now: float) -> None:
        r, e, q, by, hops = h.get("r"), h.get("e"), h.get("q"), h.get("by"), h.get("h")
        if type(r) is not str or type(e) is not int or type(q) is not int \
                or type(by) is not str or type(hops) is not int:
            raise ValueError("interest ack: r, by must be names, e, q, h integers")
        if r == self.me:
            if e == self.epoch:
                for b in self._barriers:
                    if b.seq is not None and b.seq <= q:
                        b.waiting.discard(by)
                self._check_barriers()
        elif hops > 1:
            self._route_ack(r, e, q, by, hops - 1)

    def _on_forward(self, link: Link, h: dict, rest: list, now: float) -> None:
        o, e, hops, d, s, q = h.get("o"), h.get("e"), h.get("h"), h.get("d"), h.get("s"), \
            h.get("q")
        if type(o) is not str or type(e) is not int or type(hops) is not int \
                or type(d) is not list or type(s) is not list or type(q) is not list:
            raise ValueError("forward: o must be a name, e and h integers, d, s and q lists")
        nseg = len(s)
        # C-level checks (no generator frames): they run for every FORWARD.
        if len(q) != nseg or len(rest) != 2 * nseg or not set(map(type, s)) <= _LIST \
                or not set(map(len, s)) <= _PAIR \
                or not set(map(type, chain.from_iterable(s))) <= _STR \
                or not set(map(type, q)) <= _INT or not set(map(type, d)) <= _STR:
            raise ValueError(f"forward from {o}: s and q need one entry per (header, body) "
                             f"pair ({len(rest) // 2} pairs): s [from_service, from_instance] "
                             f"names, q integers, d router names")
        self.forwarded_in += 1
        me = self.me
        if me in d:
            seen = self._seen
            for k in range(nseg):
                if not seen.add((o, e, q[k])):
                    self.duplicates += 1
                    continue
                raw = rest[2 * k]
                try:
                    header = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    self.peer_errors += 1
                    continue
                if type(header) is dict:
                    self.core.route(header, raw, rest[2 * k + 1], s[k][0], s[k][1], None,
                                    remote=False)
            d = [x for x in d if x != me] if len(d) > 1 else []
        if d:
            if hops <= 1:
                self.hop_dropped += 1
                return
            self._forward(o, e, hops - 1, d, s, q, rest)

    # -- forwarding ------------------------------------------------------------------------
    def remote_targets(self, prefixes: tuple, typ: str | None) -> tuple:
        """The :class:`PeerOut` queues an event on these channel prefixes goes to."""
        dests = self.interest.match(prefixes, typ)
        if not dests:
            return ()
        routes = self.linkstate.routes()
        by: dict[str, list] = {}
        for d in dests:
            nh = routes.get(d)
            if nh is not None:
                by.setdefault(nh, []).append(d)
        if self._outs_gen != self.generation:
            self._outs = {}
            self._outs_gen = self.generation
        out = []
        for nh, ds in by.items():
            key = (nh, tuple(sorted(ds)))
            po = self._outs.get(key)
            if po is None:
                po = self._outs[key] = PeerOut(nh, key[1])
            out.append(po)
        return tuple(out)

    def send_segments(self, po: PeerOut, segs: list) -> None:
        """Queue a FORWARD of segments ``(fsvc, finst, header, body, n)`` for ``po``."""
        q = []
        for _ in segs:
            self._seg_seq += 1
            q.append(self._seg_seq)
        link = (self._via or self._peers()).get(po.next_hop)    # _link_for, inlined
        if link is None:
            self.no_route += sum(s[4] for s in segs)
            return
        meta = {"o": self.me, "e": self.epoch, "h": self.config.hop_limit, "d": list(po.dests),
                "s": list(map(SEG_SENDER, segs)), "q": q}
        frames = [_K[Kind.FORWARD], orjson.dumps(meta)]
        for s in segs:
            frames.append(s[2])
            frames.append(s[3])
        self.forwarded_out += 1
        self._out.append((link.id, frames))

    def _forward(self, o: str, e: int, hops: int, dests: list, s: list, q: list,
                 segframes: list) -> None:
        routes = self.linkstate.routes()
        by: dict[str, list] = {}
        for d in dests:
            nh = routes.get(d)
            if nh is None:
                self.no_route += 1
                continue
            by.setdefault(nh, []).append(d)
        peers = self._via or self._peers()
        for nh, ds in by.items():
            link = peers.get(nh)
            if link is None:
                self.no_route += 1
                continue
            meta = {"o": o, "e": e, "h": hops, "d": ds, "s": s, "q": q}
            self.forwarded_out += 1
            self._out.append((link.id, [_K[Kind.FORWARD], orjson.dumps(meta), *segframes]))

    def _route_ack(self, r: str, e: int, q: int, by: str, hops: int) -> None:
        nh = self.linkstate.routes().get(r)
        link = self._link_for(nh) if nh is not None else None
        if link is not None:
            self._send(link.id, wire.encode(Kind.INTEREST_ACK, {"r": r, "e": e, "q": q,
                                                                "by": by, "h": hops}))

    # -- links -----------------------------------------------------------------------------
    def _hello(self, link: Link, now: float) -> None:
        link.last_ping = now
        self._send(link.id, wire.encode(Kind.PEER_HELLO, self._hello_header()))

    def _hello_soon(self, link: Link, now: float) -> None:
        """Say hello on dialed ``link`` now, unless one left in the last quarter ping:
        each of a burst of stale messages at a partition's heal asks for one."""
        if now - link.last_ping >= self.config.peer_ping / 4:
            self._hello(link, now)

    def _link_up(self, link: Link, name: str, epoch: int, now: float) -> None:
        was_up = self._link_for(name) is not None
        for other in list(self.links.values()):
            if other is not link and other.peer == name and other.up and other.epoch < epoch:
                self._link_down(other, now, "peer restarted")     # its former run
                was_up = self._link_for(name) is not None
        self.interest.drop_before(name, epoch)
        fresh = not link.up
        rejoined = link.rejoin is not None
        link.peer, link.epoch, link.up, link.rejoin = name, epoch, True, None
        link.last_heard = now
        if fresh:
            link.since = now
        self._via = None
        if fresh:
            log.info("peer link to %s up (%s)", name, "dialed" if link.dialed else "accepted")
        elif rejoined:
            log.info("peer link to %s: session restored", name)
        if fresh or rejoined:
            self._sync_all(link, now)
        if not was_up:
            self._originate(now)

    def _link_down(self, link: Link, now: float, why: str, graceful: bool = False) -> None:
        if not link.up:
            return
        log.log(logging.INFO if graceful else logging.WARNING, "peer link to %s down: %s",
                link.peer, why)
        link.up = False
        link.rtt = None
        link.rejoin = None
        self._via = None
        if not link.dialed:
            self.links.pop(link.id, None)
        else:
            self._hello(link, now)
        if link.peer is not None and self._link_for(link.peer) is None:
            self._originate(now)

    def _link_for(self, peer: str) -> Link | None:
        """The up link that carries traffic to ``peer``, or None."""
        return self._peers().get(peer)

    def _peers(self) -> dict[str, Link]:
        """``{peer name: the up link carrying its traffic}``, rebuilt after link changes."""
        via = self._via
        if via is None:
            via = {}
            for link in self.links.values():
                if not link.up:
                    continue
                cur = via.get(link.peer)
                # Prefer the link dialed by the smaller name; both ends agree.
                if cur is None or link.dialed == (self.me < link.peer):
                    via[link.peer] = link
            self._via = via
        return via

    def _sync_all(self, link: Link, now: float) -> None:
        """Send a new neighbour everything known: adverts, then every interest summary."""
        link.synced = now
        for adv in list(self.linkstate.adverts.values()):
            self._send(link.id, wire.encode(Kind.LINKSTATE, adv.to_wire()))
        for r in [self.me, *self.interest.routers]:
            msg = self._full_interest(r)
            if msg is not None:
                self._send(link.id, msg)

    def _full_interest(self, r: str) -> list | None:
        if r == self.me:
            self._flush_interest()
            pairs = sorted(self.local.advertised, key=lambda p: (p[0], p[1] or ""))
            e, q = self.epoch, self._iseq
        else:
            f = self.interest.full(r)
            if f is None:
                return None
            e, q, pairs = f
        return wire.encode(Kind.INTEREST, {"r": r, "e": e, "q": q, "full": True,
                                           "add": [list(p) for p in pairs]})

    def _send(self, link_id: tuple, frames: list) -> None:
        self._out.append((link_id, frames))

    def _flood(self, frames: list, except_peer: str | None) -> None:
        for peer, link in self._peers().items():
            if peer != except_peer:
                self._out.append((link.id, frames))

    # -- own advertisement -------------------------------------------------------------------
    def _originate(self, now: float) -> None:
        self._lsa_seq += 1
        links = {p: round((l.rtt or 0.0) * 1000.0, 3) for p, l in self._peers().items()}
        adv = Advert(self.me, self.epoch, self._lsa_seq, links, self._iseq, self.core.load(),
                     self.config.lsa_max_age)
        self.linkstate.accept(adv, now)
        h = adv.to_wire()
        self._flood(wire.encode(Kind.LINKSTATE, h), None)
        self._next_refresh = now + self.config.lsa_refresh
        self._routes_changed()
        self._publish(self.me, LINKSTATE_TYPE, h)

    def _routes_changed(self) -> None:
        if self._barriers:
            reach = self.linkstate.reachable()
            for b in self._barriers:
                if b.seq is not None:
                    b.waiting &= reach
            self._check_barriers()

    def _check_barriers(self, now: float | None = None) -> None:
        keep = []
        for b in self._barriers:
            if b.seq is not None and not b.waiting:
                self._answer(b, True)
            elif now is not None and now >= b.deadline:
                self._answer(b, False)
            else:
                keep.append(b)
        self._barriers = keep

    def _answer(self, b: _Barrier, ok: bool) -> None:
        reply = dict(b.reply)
        reply["propagated"] = ok
        if not ok:
            reply["missing"] = sorted(b.waiting) if b.seq is not None else ["(not sent)"]
        self.core.lease_answer(b.conn, reply)

    def _publish(self, router: str, typ: str, payload: dict) -> None:
        self.core.publish(f"{self._topology_prefix}{router}/", typ, payload, remote=False)

    # -- time ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Hellos, pings, dead links, advert refresh and expiry, barrier timeouts."""
        cfg = self.config
        self._next_tick = now + cfg.peer_ping / 2
        for link in list(self.links.values()):
            if link.up:
                if now - link.last_heard > cfg.peer_dead_after:
                    self._link_down(link, now, f"silent for {cfg.peer_dead_after:g} s")
                elif link.rejoin is not None and now - link.rejoin > cfg.peer_dead_after:
                    self._link_down(link, now, f"no welcome back within "
                                               f"{cfg.peer_dead_after:g} s")
                elif now - link.last_ping >= cfg.peer_ping:
                    if link.rejoin is not None:
                        self._hello(link, now)     # still no welcome back: ask again
                    else:
                        link.last_ping = now
                        self._send(link.id, wire.encode(Kind.PEER_PING, {"t": now}))
            elif link.dialed and now - link.last_ping >= cfg.peer_ping:
                silent = now - link.last_heard
                if silent >= _SILENT_WARN:
                    # Nothing at all comes back: no router there, a firewall, or
                    # CURVE on one end only (ZeroMQ's handshake fails without a word).
                    self._warn(now, ("silent", link.id), "peer %s: no answer for %.0f s; is "
                               "a router's --peer-listen endpoint there, and do both ends "
                               "agree on --curve?", link.id[1], silent)
                self._hello(link, now)
        if now >= self._next_refresh:
            self._originate(now)
        gone = self.linkstate.expire(now)
        for r in gone:
            log.info("router %s: advertisement expired; dropping its interest", r)
            self.interest.drop(r)
        if gone:
            self._routes_changed()
        if self._barriers:
            self._check_barriers(now)

    def next_deadline(self, now: float) -> float:
        """When :meth:`tick` next has work (pings keep it at least every ``peer_ping``/2)."""
        nxt = min(self._next_refresh, self._next_tick)
        for b in self._barriers:
            nxt = min(nxt, b.deadline)
        return nxt

    # -- observability ---------------------------------------------------------------------------
    def status(self, now: float) -> dict:
        """The overlay as this router sees it (``psepr status``)."""
        routes = self.linkstate.routes()
        routers = []
        for name, adv in sorted(self.linkstate.adverts.items()):
            routers.append({"router": name, "epoch": adv.epoch, "self": name == self.me,
                            "reachable": name == self.me or name in routes,
                            "next_hop": routes.get(name), "links": adv.links,
                            "load": self.core.load() if name == self.me else adv.load,
                            "age": round(now - (adv.expires - adv.max_age), 3),
                            "interest": len(self.interest.routers[name].pairs)
                            if name in self.interest.routers else len(self.local)})
        links = [{"peer": l.peer, "up": l.up, "dialed": l.dialed,
                  "endpoint": l.id[1] if l.dialed else None,
                  "rtt_ms": None if l.rtt is None else round(l.rtt * 1000.0, 3),
                  "since": round(now - l.since, 3) if l.up else None}
                 for l in self.links.values()]
        return {"router": self.me, "epoch": self.epoch, "routers": routers, "links": links,
                "counters": self.counters()}

    def counters(self) -> dict:
        return {"forwarded_out": self.forwarded_out, "forwarded_in": self.forwarded_in,
                "duplicates": self.duplicates, "no_route": self.no_route,
                "hop_dropped": self.hop_dropped, "peer_errors": self.peer_errors,
                "peer_dropped": self.dropped,
                "peers_up": len({l.peer for l in self.links.values() if l.up}),
                "routers_known": len(self.linkstate.adverts)}


_HANDLERS = {
    Kind.PEER_PING: OverlayCore._on_ping,
    Kind.PEER_PONG: OverlayCore._on_pong,
    Kind.ERROR: OverlayCore._on_error,
    Kind.LINKSTATE: OverlayCore._on_linkstate,
    Kind.INTEREST: OverlayCore._on_interest,
    Kind.INTEREST_ACK: OverlayCore._on_ack,
    Kind.FORWARD: OverlayCore._on_forward,
    Kind.SYNC: OverlayCore._on_sync,
    Kind.PEER_BYE: OverlayCore._on_bye,
    Kind.PEER_WELCOME: lambda self, link, h, rest, now: None,   # a repeated welcome
}
