"""The client's protocol core: one session with a router, without I/O (pure).

Theory of operation
-------------------
:class:`Session` holds everything a client connection knows: which router it
talks to, whether HELLO was answered, the leases it holds (and when to renew
them), the events waiting to be sent, and outstanding control requests.  The
shells (:mod:`psepr.client` with a thread, :mod:`psepr.aio` with asyncio) move
bytes: they call :meth:`Session.on_message` with each received message,
:meth:`Session.tick` when :meth:`Session.next_deadline` passes, and send what
:meth:`Session.take_out` returns.  The core reports back through a *sink*
object (deliveries, grants, replies, errors) and asks for a new socket by
setting :attr:`Session.switch_to`.

Life cycle: ``start`` queues HELLO; WELCOME makes the session READY, which
re-registers every lease (same ids, so a router sees renewals) and releases
the buffered events.  An ERROR ``no-session`` (the router restarted) re-sends
HELLO on the same socket.  Silence longer than ``dead_after``, or no WELCOME
within ``connect_timeout`` (of the connection completing, or of the socket's
creation while it does not), or a refused HELLO, moves to the next router in
the list (with a jittered back-off after a full round).  Leases are renewed at
``renew_fraction`` of the grant and retried every ``renew_retry`` seconds.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import socket
import time as _time
from typing import Any, Protocol

import orjson

from . import wire
from ._version import VERSION
from .channel import Channel, parse, parse_destination
from .config import ClientConfig, positive_number
from .errors import EventError, TimeoutError, UsageError, remote_error
from .event import (_UNSET, JSON, JSON_DEPTH_CHECK_BYTES, ORJSON_TOO_DEEP, XML, Event,
                    _check_name, _check_type, check_json_depth, new_id, xml_payload_and_type)
from .wire import Kind

log = logging.getLogger("psepr.client")

CONNECTING = "connecting"
READY = "ready"
CLOSED = "closed"

_K = wire.KIND_BYTES
#: Control messages a new socket sends afresh (HELLO, and every LEASE on WELCOME).
_REASKED = (_K[Kind.HELLO], _K[Kind.LEASE])
#: Most forgotten requests remembered (see Session.forget).
_MAX_FORGOTTEN = 10_000

_instance_seq = itertools.count(1)


def default_instance() -> str:
    """``host-pid-n``: unique per connection on a host, readable in stats."""
    return f"{socket.gethostname()}-{os.getpid()}-{next(_instance_seq)}"


_type_ok: set[str] = set()


_dest_cache: dict[str, str] = {}


def make_entry(channel: "str | Channel | Event", payload: Any = None, type: str | None = None,
               format: str | None = None, to_service: str | None = None,
               to_instance: str | None = None, reply_to: "str | Channel | None" = None,
               re: str | None = None, id: str | None = None,
               max_bytes: int = 1 << 20) -> tuple:
    """Encode one event for a SEND batch.

    Args:
        channel: destination channel, or a whole :class:`Event` (then the other
            arguments are ignored; its ``from`` fields are not sent).
        payload: JSON value, or XML text with ``format="xml"``.
        type: the payload type (namespace).
        format: ``"json"`` (default) or ``"xml"``.
        to_service, to_instance: directed delivery inside the channel.
        reply_to, re: request/reply fields.
        id: event id (fresh by default).
        max_bytes: payload size bound.

    Returns:
        ``(id, channel_text, type, time, fmt, opts, payload_bytes)``, the item
        :func:`psepr.wire.pack_events` groups into SEND messages.

    Raises:
        ChannelError, EventError, XMLRefused: invalid input, named precisely.
    """
    # Fast path: a channel text seen before is known to be a valid destination.
    ch = _dest_cache.get(channel) if channel.__class__ is str else None
    if ch is None:
        if isinstance(channel, Event):
            ev = channel
            return make_entry(ev.channel, ev.payload, ev.type, ev.format, ev.to_service,
                              ev.to_instance, ev.reply_to, ev.re, ev.id, max_bytes)
        ch = parse_destination(channel).text
        if len(_dest_cache) < 50_000:
            _dest_cache[ch] = ch
    if format is None or format == JSON:
        try:
            raw = orjson.dumps(payload)
        except TypeError as exc:
            if str(exc) != ORJSON_TOO_DEEP:
                raise EventError(f"payload is not JSON-serialisable: {exc}", "payload") from None
            raw = b""      # nested too deep: the check below says so
        if not raw or len(raw) >= JSON_DEPTH_CHECK_BYTES:
            check_json_depth(payload, "send")
        fmt = wire.FMT_JSON
    elif format == XML:
        text, type = xml_payload_and_type(payload, type, max_bytes)
        raw = text.encode("utf-8")
        fmt = wire.FMT_XML
    else:
        raise EventError(f"event format must be 'json' or 'xml', got {format!r}", "format")
    if len(raw) > max_bytes:
        raise EventError(f"payload of {len(raw)} bytes exceeds the limit of {max_bytes} bytes",
                         "payload")
    if type is not None and type not in _type_ok:
        _check_type(type)
        if len(_type_ok) < 10_000:
            _type_ok.add(type)
    opts = None
    if to_service is not None or to_instance is not None or reply_to is not None or re is not None:
        opts = {}
        if to_service is not None:
            opts["ts"] = _check_name(to_service, "to_service")
        if to_instance is not None:
            opts["ti"] = _check_name(to_instance, "to_instance")
        if reply_to is not None:
            opts["rt"] = parse(reply_to).text
        if re is not None:
            opts["re"] = _check_name(re, "re")
    if id is None:
        id = new_id()
    else:
        _check_name(id, "id")
    return (id, ch, type, _time.time(), fmt, opts, raw)


class Sink(Protocol):
    """What a shell implements to hear from the core."""

    def deliver(self, batches: list[tuple[tuple | None, list[Event]]]) -> None:
        """Delivered events, in arrival order: ``(lease ids, events)`` batches, where
        ``None`` for the ids means each event goes to its own ``event.leases``."""
    def overflow(self, lids: tuple, n: int) -> None: ...
    def ready(self, welcome: dict) -> None: ...
    def lease_granted(self, lease_id: str, granted: float) -> None: ...
    def lease_failed(self, lease_id: str, exc: Exception) -> None: ...
    def lease_expired(self, lease_id: str) -> None: ...
    def completed(self, req: int, result: Any, exc: Exception | None) -> None: ...
    def async_error(self, exc: Exception) -> None: ...
    def dropped(self, n: int) -> None: ...


class LeaseState:
    """What the core remembers of one lease."""

    __slots__ = ("id", "channel", "type", "duration", "granted", "renew_at", "expires_at",
                 "active", "renew", "propagate")

    def __init__(self, id: str, channel: Channel, type: str | None, duration: float,
                 renew: bool) -> None:
        self.id = id
        self.channel = channel
        self.type = type
        self.duration = duration
        self.granted = 0.0
        self.renew_at = float("inf")
        self.expires_at = float("inf")
        self.active = False
        self.renew = renew
        self.propagate = False   # ask the router for the overlay-wide barrier (once)


class _Barrier:
    """A control message queued among the events, sent after those before it."""

    __slots__ = ("frames",)

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames


class Session:
    """The protocol state of one client connection (see module docs).

    Args:
        config: client configuration.
        routers: endpoints to try, in order.
        sink: receives the core's reports.
        now: current monotonic time.
        rng: random generator (jitter); a new one by default.
    """

    def __init__(self, config: ClientConfig, routers: list[str], sink: Sink, now: float,
                 rng: random.Random | None = None) -> None:
        self.config = config
        self.routers = list(routers)
        self.sink = sink
        self.rng = rng or random.Random()
        self.instance = config.instance or default_instance()
        self.state = CONNECTING
        self.index = 0
        self.switch_to: str | None = self.routers[0]
        self.welcome: dict | None = None
        #: The last refusal of a HELLO ("<router> answered: <message>"), for the
        #: error a connection that never got a WELCOME raises; None if none came.
        self.refusal: str | None = None
        self.leases: dict[str, LeaseState] = {}
        self._control: list[list[bytes]] = []
        self._pend: list = []                # encoded events (make_entry items) to send
        self._barriers = 0                   # _Barrier markers in _pend (flush pings)
        self._req = itertools.count(1)
        self._hello_req: int | None = None   # the req of the latest HELLO
        self._waiting: dict[int, str] = {}   # req -> kind, for control requests
        self._renewals: list = []            # heap of (renew_at, lease_id), lazily invalidated
        # The window of LEASE requests (config.lease_window): ids asked and not yet
        # answered, and ids waiting for room, in order.
        self._asked: set[str] = set()
        self._to_ask: dict[str, None] = {}
        # Leases given up before their answer came (abandon): released at the router
        # on this socket; an ERROR for one (refused, or unknown) is nobody's to hear.
        self._abandoned: set[str] = set()
        # Requests whose caller stopped waiting (forget): their answers are dropped.
        self._forgotten: set[int] = set()
        self._index: dict | None = None      # channel text -> leases on it (None: rebuild)
        # channel (untyped events) or (channel, type) -> (lease ids, Channel)
        self._routes: dict = {}
        self.last_rx = now
        self.next_ping = now
        self.hello_at = now
        self.round_failures = 0
        self.retry_at = 0.0
        self.dropped_by_router = 0
        self.reconnects = 0
        self._need_switch = False   # a new socket is wanted once retry_at passes
        self._hello_index = 0       # the router the current socket (and HELLO) went to
        #: (router index, token) of the last session a router welcomed (HELLO "resume")
        self._session_token: tuple[int, str] | None = None
        self.was_ready = False      # True once any router welcomed this session

    # -- connection life cycle ------------------------------------------------
    @property
    def router(self) -> str:
        """The endpoint currently in use."""
        return self.routers[self.index]

    def take_switch(self) -> str | None:
        """The endpoint the shell must (re)connect a fresh socket to, once."""
        url, self.switch_to = self.switch_to, None
        return url

    def start(self, now: float) -> None:
        """The shell connected a fresh socket: say HELLO."""
        self.state = CONNECTING
        self.welcome = None
        self.hello_at = now
        self.last_rx = now
        self._hello_index = self.index
        # Every lease is asked again on WELCOME: LEASEs still queued for the old
        # socket would go twice, and the window starts empty.
        self._control = [m for m in self._control if m[0] not in _REASKED]
        self._asked.clear()
        self._to_ask.clear()
        self._abandoned.clear()
        # Numbered: a WELCOME answering an earlier HELLO (one that left just before
        # we gave up on it) is ignored, so leases are registered on the session
        # that stays, not on one the router is about to replace.
        self._hello_req = next(self._req)
        hello = {"v": wire.PROTOCOL_VERSION, "service": self.config.service,
                 "instance": self.instance, "client": f"psepr-py/{VERSION}",
                 "req": self._hello_req}
        if self._session_token is not None and self._session_token[0] == self.index:
            # Back to the router that welcomed us last: name that session, so that
            # it moves to this socket with its leases and queued events even if
            # the router has not noticed the old socket is gone.
            hello["resume"] = self._session_token[1]
        self._control.insert(0, wire.encode(Kind.HELLO, hello))

    def _next_router(self, now: float, why: str) -> None:
        # Before the first WELCOME the caller hears of failure from connect() itself
        # (ConnectionLost); a warning here too would make a second line of the error.
        log.log(logging.WARNING if self.was_ready else logging.INFO,
                "router %s: %s; trying the next router", self.router, why)
        self.index = (self.index + 1) % len(self.routers)
        if self.index == 0:
            self.round_failures += 1
            backoff = min(0.25 * (2 ** min(self.round_failures, 4)), 5.0)
            self.retry_at = now + backoff * (0.5 + self.rng.random())
        else:
            self.retry_at = now
        self.state = CONNECTING
        self.welcome = None
        self.reconnects += 1
        for ls in self.leases.values():
            ls.active = False
        self.switch_to = None  # decided in tick once retry_at passes
        self._need_switch = True

    def connected(self, now: float) -> None:
        """The shell saw the socket's connection to the router complete (handshake).

        The WELCOME clock starts here, not when the socket was made: a router
        that comes up just before ``connect_timeout`` would otherwise see the
        client give up on a connection whose HELLO it is answering, and the
        events it then delivers to that connection would be lost.
        """
        if self.state == CONNECTING:
            self.hello_at = now

    def handshake_failed(self, now: float, why: str) -> None:
        """The shell saw ZeroMQ's handshake with the router fail (CURVE keys, say).

        That router will not welcome us: remember why, for the error of a
        connection that never gets a WELCOME, and try the next router at once.
        """
        self.refusal = f"{self.router}: {why}"
        if self.state in (READY, CONNECTING) and not self._need_switch:
            self._next_router(now, why)

    def disconnected(self, now: float) -> None:
        """The shell saw the TCP connection to the router drop: fail over at once.

        A router that died or was killed closes its connections; waiting
        ``dead_after`` for silence would add seconds to every fail-over.
        """
        if self.state in (READY, CONNECTING) and not self._need_switch:
            self._next_router(now, "connection closed")

    def close(self) -> list[list[bytes]]:
        """Mark closed and return the farewell messages to send (BYE)."""
        self.state = CLOSED
        return [wire.encode(Kind.BYE, {})]

    # -- user requests -----------------------------------------------------------
    def add_events(self, items: list) -> None:
        """Queue encoded events (:func:`make_entry` items) for sending, in order."""
        self._pend.extend(items)

    def take_out_with(self, item: tuple, now: float) -> list[list[bytes]]:
        """:meth:`add_events` of one item, then :meth:`take_out`; with nothing else
        waiting (the common lone send) the item's SEND message is built directly."""
        if self.state == READY and not self._pend and not self._control:
            return [wire.encode_send([item])]
        self._pend.append(item)
        return self.take_out(now)

    @property
    def queued(self) -> int:
        """Events waiting to be handed to the socket."""
        return len(self._pend)

    def lease(self, lease_id: str, channel: Channel, type: str | None, duration: float,
              now: float, renew: bool = True, propagated: bool = False) -> None:
        """Ask for (or re-ask for) a lease at time ``now``; the sink hears the grant or failure.

        With ``propagated`` the grant is reported only once every reachable
        router of the overlay has the lease's interest (else the sink hears a
        :class:`TimeoutError` naming the routers that did not confirm).
        """
        if not positive_number(duration):
            # inf and NaN too: JSON cannot carry them (orjson writes null), and the
            # router would answer with a puzzle about a missing duration.
            raise UsageError(f"lease duration must be a positive, finite number of seconds "
                             f"(the router caps it at its maximum), got {duration!r}")
        ls = self.leases.get(lease_id)
        if ls is None:
            ls = LeaseState(lease_id, channel, type, float(duration), renew)
            self.leases[lease_id] = ls
        else:  # re-registration: renew, possibly with a new channel, type or duration
            ls.channel, ls.type, ls.duration, ls.renew = channel, type, float(duration), renew
        ls.propagate = propagated
        self._index = None
        if self.state == READY:
            self._ask_lease(ls, now)

    def _drop_lease(self, lease_id, default=None):
        self._index = None
        self._answered(lease_id)
        return self.leases.pop(lease_id, default)

    def lease_ids(self, channel: str, typ: str | None) -> tuple:
        """Ids of this session's leases that cover ``channel`` and accept ``typ``."""
        return self._route(channel, typ)[0]

    def _route(self, channel: str, typ: str | None) -> tuple:
        """``(lease_ids, Channel)`` for a delivered group, cached until leases change."""
        key = channel if typ is None else (channel, typ)
        if self._index is None:
            index: dict = {}
            for ls in self.leases.values():
                index.setdefault(ls.channel.text, []).append(ls)
            self._index = index
            self._routes = {}
        else:
            r = self._routes.get(key)
            if r is not None:
                return r
        c = parse(channel)
        lids = tuple(ls.id for p in c.prefixes() for ls in self._index.get(p, ())
                     if ls.type is None or ls.type == typ)
        if len(self._routes) > 50_000:
            self._routes.clear()
        r = self._routes[key] = (lids, c)
        return r

    def _set_renew(self, ls: LeaseState, at: float) -> None:
        ls.renew_at = at
        if at != float("inf"):
            heapq.heappush(self._renewals, (at, ls.id))

    def _ask_lease(self, ls: LeaseState, now: float) -> None:
        """Queue a LEASE for ``ls`` now, or once the window has room (asked again
        after ``renew_retry`` without an answer either way)."""
        self._set_renew(ls, now + self.config.renew_retry)
        if ls.id in self._to_ask:
            return
        if ls.id not in self._asked and len(self._asked) >= self.config.lease_window:
            self._to_ask[ls.id] = None
            return
        self._asked.add(ls.id)      # a retry of an unanswered one keeps its place
        h = {"id": ls.id, "channel": ls.channel.text, "type": ls.type, "duration": ls.duration}
        if ls.propagate:
            h["p"] = True
        self._control.append(wire.encode(Kind.LEASE, h))

    def _answered(self, lease_id) -> None:
        """``lease_id``'s LEASE was answered, or the lease is gone: its place in the
        window is free (:meth:`take_out` lets the next one in)."""
        self._asked.discard(lease_id)
        self._to_ask.pop(lease_id, None)

    def _ask_waiting(self, now: float) -> None:
        """Queue the LEASEs that waited for room in the window, while it has room."""
        to_ask = self._to_ask
        while to_ask and len(self._asked) < self.config.lease_window:
            lid = next(iter(to_ask))
            del to_ask[lid]
            ls = self.leases.get(lid)
            if ls is not None:
                self._ask_lease(ls, now)

    def abandon(self, lease_id: str) -> None:
        """The caller gave up on a new lease before its grant (a timeout, a cancelled
        task): forget it, and release it at the router if its LEASE went out on
        this socket or was granted, so that no lease the caller was told failed
        stays held, renewed and filled with events.

        A LEASE still waiting for room in the window (or for a socket) just goes.
        """
        ls = self.leases.get(lease_id)
        if ls is None:
            return
        out = lease_id in self._asked or ls.active
        self._drop_lease(lease_id)
        if out and self.state == READY:
            self._abandoned.add(lease_id)
            self._control.append(wire.encode(Kind.UNLEASE, {"id": lease_id}))

    def unlease(self, lease_id: str) -> int | None:
        """Release a lease; returns the request id to wait for, or None if not connected."""
        self._drop_lease(lease_id, None)
        if self.state != READY:
            return None
        return self._request(Kind.UNLEASE, {"id": lease_id})

    def ping(self) -> int:
        """Queue a PING behind every event queued so far; returns its request id.

        ``flush`` waits for the PONG, so the PING must not overtake events still
        waiting here: the router answers it only after handling them.
        """
        if not self._pend:
            return self._request(Kind.PING, {})
        req = next(self._req)
        self._waiting[req] = Kind.PING.name
        self._pend.append(_Barrier(wire.encode(Kind.PING, {"req": req})))
        self._barriers += 1
        return req

    def stats(self) -> int:
        """Ask the router for its counters; returns the request id."""
        return self._request(Kind.STATS, {})

    def status(self) -> int:
        """Ask the router for the overlay as it sees it; returns the request id."""
        return self._request(Kind.STATUS, {})

    def forget(self, req: int) -> None:
        """The caller stopped waiting for request ``req`` (a timeout, a cancelled task):
        its answer, should one come, is heard by nobody - neither as a result kept
        for a waiter that is gone nor as an error of the connection."""
        if self._waiting.pop(req, None) is not None:
            if len(self._forgotten) >= _MAX_FORGOTTEN:
                # Answers that never came (sent on a socket that died): start afresh;
                # a late answer to one of them is still dropped by _complete.
                self._forgotten.clear()
            self._forgotten.add(req)

    def _request(self, kind: Kind, header: dict) -> int:
        req = next(self._req)
        header["req"] = req
        self._waiting[req] = kind.name
        self._control.append(wire.encode(kind, header))
        return req

    # -- output --------------------------------------------------------------------
    def take_out(self, now: float) -> list[list[bytes]]:
        """Messages to send now: control first, then event batches (only when READY).

        A flush PING queued while events were waiting goes out right after them.
        """
        if self._to_ask and self.state == READY:
            self._ask_waiting(now)
        out = self._control
        self._control = []
        if self.state == CONNECTING:
            # Only HELLO may go before WELCOME; keep the rest for later.
            hello = [m for m in out if m[0] == _K[Kind.HELLO]]
            self._control = [m for m in out if m[0] != _K[Kind.HELLO]]
            return hello
        if self.state != READY or not self._pend:
            return out
        items, self._pend = self._pend, []
        if self._barriers:
            self._barriers = 0
            run: list = []
            for it in items:
                if type(it) is _Barrier:
                    self._pack(run, out)
                    out.append(it.frames)
                    run = []
                else:
                    run.append(it)
            self._pack(run, out)
        else:
            self._pack(items, out)
        return out

    def _pack(self, items: list, out: list) -> None:
        """Append SEND messages carrying ``items`` to ``out``, cut at the batch limits."""
        for chunk in wire.cuts(items, 6, self.config.batch_events, self.config.batch_bytes):
            out.append(wire.encode_send(chunk))

    def requeue(self, frames: list[bytes]) -> None:
        """The socket could not take a message: put it back at the front."""
        if frames[0] == _K[Kind.SEND]:
            self._pend[:0] = wire.unpack_events(orjson.loads(frames[1]), frames[2])
        elif frames[0] == _K[Kind.PING]:     # may be a flush barrier: keep it behind events
            self._pend.insert(0, _Barrier(frames))
            self._barriers += 1
        else:
            self._control.insert(0, frames)

    # -- input ---------------------------------------------------------------------
    def on_message(self, frames: list, now: float) -> None:
        """Handle one message from the router.  Bad messages are logged and dropped."""
        self.last_rx = now
        try:
            kind, h, rest = wire.decode(frames)
        except wire.ProtocolError as exc:
            log.warning("router %s sent a malformed message: %s", self.router, exc)
            return
        try:
            if kind == Kind.DELIVER:
                self._on_deliver(h, rest)
            elif kind == Kind.WELCOME:
                self._on_welcome(h, now)
            elif kind == Kind.LEASED:
                self._answered(h.get("id"))
                ls = self.leases.get(h.get("id"))
                if ls is not None and ls.propagate and h.get("propagated") is False:
                    # Granted, but not every reachable router confirmed in time: undo
                    # it rather than leave a lease the caller was told failed.
                    self._drop_lease(ls.id)
                    self._control.append(wire.encode(Kind.UNLEASE, {"id": ls.id}))
                    missing = ", ".join(map(str, h.get("missing") or [])) or "?"
                    self.sink.lease_failed(ls.id, TimeoutError(
                        f"lease on {ls.channel.text}: router(s) {missing} did not confirm "
                        f"its interest in time (the overlay may be partitioned)"))
                elif ls is not None:
                    ls.propagate = False
                    ls.granted = float(h["granted"])
                    ls.active = True
                    ls.expires_at = now + ls.granted
                    self._set_renew(ls, now + ls.granted * self.config.renew_fraction
                                    if ls.renew else float("inf"))
                    self.sink.lease_granted(ls.id, ls.granted)
            elif kind == Kind.PONG:
                self._complete(h, None)
                if h.get("d"):
                    self._drops(h["d"])
            elif kind == Kind.UNLEASED and h.get("id") in self._abandoned:
                self._abandoned.discard(h["id"])
            elif kind in (Kind.UNLEASED, Kind.STATS_REPLY):
                self._complete(h, h.get("stats") if kind == Kind.STATS_REPLY else h.get("id"))
            elif kind == Kind.STATUS_REPLY:
                self._complete(h, h.get("status"))
            elif kind == Kind.EXPIRED:
                ls = self._drop_lease(h.get("id"), None)
                if ls is not None:
                    self.sink.lease_expired(ls.id)
            elif kind == Kind.ERROR:
                self._on_error(h, now)
            else:
                log.warning("router %s sent unknown message kind %s", self.router, kind)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.warning("router %s sent a malformed %s: %r", self.router, kind, exc)

    def _on_welcome(self, h: dict, now: float) -> None:
        if h.get("req") != self._hello_req:
            log.debug("router %s: ignoring a WELCOME to an earlier HELLO", self.router)
            return
        if self._need_switch or self.switch_to is not None:
            # We gave up on this socket (no WELCOME in time) but it stays open
            # through the back-off, and its router answered after all: stay.
            # Moving on would close a socket that events are already flowing to.
            log.info("router %s answered after all; staying with it",
                     self.routers[self._hello_index])
            self._need_switch = False
            self.switch_to = None
            self.index = self._hello_index
        self.welcome = h
        token = h.get("session")
        self._session_token = (self.index, token) if type(token) is str else None
        self.state = READY
        self.was_ready = True
        self.round_failures = 0
        for ls in self.leases.values():
            self._ask_lease(ls, now)
        self.sink.ready(h)

    def _complete(self, h: dict, result: Any) -> None:
        req = h.get("req")
        if self._waiting.pop(req, None) is not None:
            self.sink.completed(req, result, None)
        else:
            self._forgotten.discard(req)

    def _drops(self, n: int) -> None:
        self.dropped_by_router += n
        self.sink.dropped(n)

    def _on_error(self, h: dict, now: float) -> None:
        code = h.get("code", "remote")
        msg = h.get("message", "")
        if code == wire.E_NO_SESSION:
            if self.state != CONNECTING:
                log.info("router %s lost our session (restarted?); saying HELLO again",
                         self.router)
                for ls in self.leases.values():
                    ls.active = False
                self.start(now)
            return
        if self.state == CONNECTING and h.get("ref") is None \
                and h.get("req") in (None, self._hello_req):
            # Our HELLO was refused (a peer endpoint, another protocol version, the
            # ACL, ...): that router will not welcome it, so try the next one now
            # rather than after connect_timeout (the same one again, after the
            # back-off, when it is the only one).  Remember why, for the error of
            # a connection that never gets a WELCOME.
            self.refusal = f"{self.router} answered: {msg}"
            log.warning("router %s refused our HELLO: %s", self.router, msg)
            if not self._need_switch:
                self._next_router(now, f"refused our HELLO: {msg}")
            return
        ref = h.get("ref")
        if ref in self._abandoned:
            # The LEASE we gave up on was refused, or (unknown-lease) our UNLEASE
            # found nothing to release, which ends it: the lease is gone either way,
            # as its caller was told.
            if code == wire.E_UNKNOWN_LEASE:
                self._abandoned.discard(ref)
            return
        req = h.get("req")
        if req in self._forgotten:       # its caller stopped waiting (forget)
            self._forgotten.discard(req)
            return
        exc = remote_error(code, msg, h.get("channel"), ref)
        if ref in self._asked:          # a LEASE refused: its place is free
            self._answered(ref)
        if req is not None and self._waiting.pop(req, None) is not None:
            self.sink.completed(req, None, exc)
            return
        if ref is not None and ref in self.leases and not self.leases[ref].active:
            self._drop_lease(ref)
            self.sink.lease_failed(ref, exc)
            return
        self.sink.async_error(exc)

    def _on_deliver(self, meta: dict, rest: list) -> None:
        if meta.get("d"):
            self._drops(meta["d"])
        senders = meta["s"]
        if len(rest) != 2 * len(senders):
            raise ValueError(f"DELIVER names {len(senders)} senders but has {len(rest)} frames")
        batches: list = []
        route = self._route
        new = Event.__new__
        unset = _UNSET
        fmt_names = wire.FMT_NAMES
        rcache = self._routes if self._index is not None else {}
        sink = self.sink
        full = getattr(sink, "full_ids", None)
        last_lids = events = add = None
        mixed = False
        ts = ti = rt = re = None
        for k, (fsvc, finst) in enumerate(senders):
            h = orjson.loads(rest[2 * k])
            body = rest[2 * k + 1]
            ids, times, fmts, plens = h["i"], h["t"], h["f"], h["l"]
            off = 0
            j = 0
            for ch, typ, opts, cnt in h["g"]:
                # Untyped groups, the common case, are keyed by the channel alone:
                # no key tuple to build, and one object fewer to compare.
                r = rcache.get(ch) if typ is None else rcache.get((ch, typ))
                if r is None:
                    r = route(ch, typ)
                    rcache = self._routes
                lids, c = r
                if not lids or (full and full.issuperset(lids)):
                    # Released meanwhile, or every lease's queue is full: do not build
                    # events only to drop them (the sink counts the overflow).
                    if lids:
                        sink.overflow(lids, cnt)
                    off += sum(plens[j:j + cnt])
                    j += cnt
                    continue
                if opts:
                    rt = opts.get("rt")
                    ts, ti, rt, re = (opts.get("ts"), opts.get("ti"),
                                      parse(rt) if rt else None, opts.get("re"))
                elif ts is not None or ti is not None or rt is not None or re is not None:
                    ts = ti = rt = re = None
                if lids is not last_lids:
                    # Consecutive groups for the same leases share one batch (a
                    # subtree lease receiving many channels files them together);
                    # consecutive one-event groups for differing leases share one
                    # mixed batch, filed event by event by their own `leases`.
                    last_lids = lids
                    if cnt > 1 or not mixed:
                        events = []
                        add = events.append
                        mixed = cnt == 1
                        batches.append((None if mixed else lids, events))
                # Inlined Event construction: this loop is the receiving client's
                # per-event cost, so it avoids even a function call.
                for i in range(j, j + cnt):
                    end = off + plens[i]
                    ev = new(Event)
                    ev.id = ids[i]
                    ev.channel = c
                    ev.type = typ
                    ev.time = times[i]
                    ev.format = fmt_names[fmts[i]]
                    ev._payload = unset
                    ev._raw = body
                    ev._off = off
                    ev._end = end
                    ev.from_service = fsvc
                    ev.from_instance = finst
                    ev.to_service = ts
                    ev.to_instance = ti
                    ev.reply_to = rt
                    ev.re = re
                    ev.leases = lids
                    add(ev)
                    off = end
                j += cnt
        self.sink.deliver(batches)

    # -- time --------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Liveness, fail-over, renewals.  Call when :meth:`next_deadline` passes."""
        if self.state == CLOSED:
            return
        if self._need_switch:
            if now >= self.retry_at:
                self._need_switch = False
                self.switch_to = self.router
            return
        if self.state == CONNECTING:
            if now - self.hello_at > self.config.connect_timeout:
                self._next_router(now, f"no WELCOME within {self.config.connect_timeout} s")
            return
        if now - self.last_rx > self.config.dead_after:
            self._next_router(now, f"silent for {now - self.last_rx:.1f} s")
            return
        if now >= self.next_ping:
            self.next_ping = now + self.config.ping_interval
            self._control.append(wire.encode(Kind.PING, {}))
        heap = self._renewals
        while heap and heap[0][0] <= now:
            at, lid = heapq.heappop(heap)
            ls = self.leases.get(lid)
            if ls is not None and ls.renew_at == at:
                self._ask_lease(ls, now)

    def next_deadline(self, now: float) -> float:
        """The monotonic time at which :meth:`tick` next has something to do."""
        if self._need_switch:
            return self.retry_at
        if self.state == CONNECTING:
            return self.hello_at + self.config.connect_timeout
        nxt = min(self.next_ping, self.last_rx + self.config.dead_after)
        heap = self._renewals
        while heap and (heap[0][1] not in self.leases
                        or self.leases[heap[0][1]].renew_at != heap[0][0]):
            heapq.heappop(heap)   # stale entry
        if heap and heap[0][0] < nxt:
            nxt = heap[0][0]
        return nxt
