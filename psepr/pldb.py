"""PLDB from the client's side: tuples, the query vocabulary, and ``query()``.

Theory of operation
-------------------
PLDB remembers the attribute events that fly over channels.  A *tuple* is one
attribute value seen on a channel: ``(channel, field, value, time, expire,
source, id)``, where ``time`` is the sending event's time, ``expire`` the
attribute's validity in seconds, ``source`` the sender (``service/instance``,
as the router stamped it) and ``id`` the event id.  ``(time, id)`` is the
tuple's *version* (ties between equal times broken by the id, see
:attr:`Tuple.version`): every monitor that saw the same event holds the same
version, so "newest version wins" needs no coordination.

Monitors (``pldb/monitor.py``) lease a channel subtree and answer *query
events* sent on that channel or below it (type :data:`QUERY`).  A query is a
request: its replies (type :data:`REPLY`) go to the asker's private inbox.
Several monitors answer the same query, each in one or more *parts* (a big
subtree does not fit one event), and each names the other ready monitors it
knows for the channel (``peers``).  :class:`Replies` collects the parts until
every monitor it has heard of has answered in full, then merges them: one
answer per ``(channel, field)`` (the newest version), or with ``history`` every
version once.  Monitors announce themselves on ``/<authority>/_sys/pldb/
monitors/`` (type :data:`ANNOUNCE`); supervisors count them there.

This module is pure vocabulary plus :func:`query`/:func:`aquery`, which only
use the connection's public ``request_all``.  Payload shapes are specified in
docs/protocol.md ("PLDB").
"""

from __future__ import annotations

import functools
import math
import re
import time as _time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import orjson

from .channel import Channel, parse
from .errors import EventError, NoMonitor, PseprError, RemoteError, UsageError
from .event import ATTRIBUTE, attribute_problem

#: Event type of a query (a request; replies go to its ``reply_to``).
QUERY = "http://psepr.org/xs/pldb/query"
#: Event type of a monitor's reply part.
REPLY = "http://psepr.org/xs/pldb/reply"
#: Event type of a monitor's announcement on the monitors channel.
ANNOUNCE = "http://psepr.org/xs/pldb/monitor"
#: Event type of a monitor's report of bad input or a storage failure.
REPORT = "http://psepr.org/xs/pldb/report"

#: Largest accepted attribute value, as JSON, in bytes: PLDB stores facts, not files.
MAX_VALUE_BYTES = 64 * 1024
#: How far ahead of the receiver's clock a tuple's time may be, in seconds.  A
#: version is newer by its time, so a tuple from a clock that runs a year fast
#: would hide every later value of its field for a year.
MAX_CLOCK_AHEAD = 300.0
#: Reply parts are cut at about this many bytes of tuples (events stay far below 1 MiB).
PART_BYTES = 256 * 1024

_ATTRIBUTE_KEYS = frozenset(("field", "value", "expire"))
_QUERY_KEYS = frozenset(("field", "since", "history"))


def monitors_channel(authority: str) -> Channel:
    """Where monitors of ``authority`` announce themselves."""
    return parse(f"/{authority}/_sys/pldb/monitors/")


def reports_channel(authority: str) -> Channel:
    """Where monitors of ``authority`` report bad input and storage trouble."""
    return parse(f"/{authority}/_sys/pldb/reports/")


@dataclass(frozen=True, slots=True)
class Tuple:
    """One remembered attribute value.

    Attributes:
        channel: the channel text the attribute event was sent on.
        field: the attribute name.
        value: the attribute value (any JSON value).
        time: the event's sender time, seconds since the epoch.
        expire: seconds after ``time`` the value stays valid; None = forever.
        source: the sender, ``"service/instance"``.
        id: the event id.
    """

    channel: str
    field: str
    value: Any
    time: float
    expire: float | None
    source: str
    id: str

    @property
    def version(self) -> tuple[float, int, str]:
        """Order of versions of one ``(channel, field)``: newer compares greater.

        The sender's time first; for equal times the id, shorter first, so that
        the SDK's ids (``prefix.counter``) of one sender order by counter.
        """
        return (self.time, len(self.id), self.id)

    @property
    def expires_at(self) -> float:
        """Wall-clock time the value goes stale (``inf`` for never)."""
        return math.inf if self.expire is None else self.time + self.expire

    def row(self) -> list:
        """The tuple as it travels in a reply: ``[channel, field, value, time, expire, source, id]``."""
        return [self.channel, self.field, self.value, self.time, self.expire, self.source, self.id]

    @classmethod
    def from_row(cls, row: Any) -> "Tuple":
        """Rebuild a tuple from :meth:`row` output (e.g. from a peer).

        Raises:
            EventError: the row does not have that shape.
        """
        if not isinstance(row, list) or len(row) != 7:
            raise EventError(f"a PLDB tuple row is a list of 7 items, got {row!r:.80}", "tuples")
        channel, field, value, time, expire, source, id = row
        if not (isinstance(channel, str) and isinstance(field, str) and field
                and _is_number(time) and (expire is None or _is_number(expire))
                and isinstance(source, str) and isinstance(id, str)):
            raise EventError(f"a PLDB tuple row has a field of the wrong type: {row!r:.120}",
                             "tuples")
        parse(channel)
        return cls(channel, field, value, float(time), None if expire is None else float(expire),
                   source, id)


_NUMBER = (int, float)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def tuple_from_event(event, max_value_bytes: int = MAX_VALUE_BYTES, now: float | None = None,
                     max_ahead: float = MAX_CLOCK_AHEAD) -> Tuple:
    """The tuple an attribute event carries.

    Args:
        event: a :class:`~psepr.event.Event` with an attribute payload
            (``{"field", "value", "expire"}``, see :func:`psepr.attribute`).
        max_value_bytes: largest accepted value, as JSON.
        now: the receiver's wall-clock time; with it, an event more than
            ``max_ahead`` seconds later than ``now`` is refused.
        max_ahead: see ``now``.

    Returns:
        The :class:`Tuple`.

    Raises:
        EventError: the payload is not an attribute, or its time is too far
            ahead (names what is wrong).
    """
    channel, field, _, time, expire, source, id = attribute_row(event, max_value_bytes, now,
                                                                max_ahead)
    return Tuple(channel, field, event.payload["value"], time, expire, source, id)


def attribute_row(event, max_value_bytes: int = MAX_VALUE_BYTES, now: float | None = None,
                  max_ahead: float = MAX_CLOCK_AHEAD) -> tuple:
    """Like :func:`tuple_from_event`, as a storage row (the monitor's fast path).

    Returns:
        ``(channel, field, value as JSON bytes, time, expire, source, id)``.

    Raises:
        EventError: the payload is not an attribute, or its time is too far
            ahead (names what is wrong).
    """
    if now is not None and event.time > now + max_ahead:
        raise EventError(f"attribute event {event.id}: its time is {event.time - now:.0f} s "
                         f"ahead of this clock (at most {max_ahead:g} s is taken: is the "
                         f"sender's clock right?)", "time")
    p = event.payload
    if type(p) is not dict:
        raise EventError(f"attribute event {event.id}: payload must be a JSON object with "
                         f"field, value and expire, got {type(p).__name__}", "payload")
    if len(p) > 3 or not p.keys() <= _ATTRIBUTE_KEYS:
        unknown = sorted(p.keys() - _ATTRIBUTE_KEYS)
        raise EventError(f"attribute event {event.id}: unknown key(s) "
                         f"{', '.join(map(repr, unknown))} (allowed: field, value, expire)",
                         unknown[0])
    field, expire = p.get("field"), p.get("expire")
    problem = attribute_problem(field, expire)
    if problem is not None:
        raise EventError(f"attribute event {event.id}: {problem[1]}", problem[0])
    try:
        value = orjson.dumps(p["value"])
    except KeyError:
        raise EventError(f"attribute event {event.id}: no value for field {field!r}",
                         "value") from None
    if len(value) > max_value_bytes:
        raise EventError(f"attribute event {event.id}: value of {field!r} is {len(value)} "
                         f"bytes, more than the {max_value_bytes} allowed", "value")
    if expire is not None:
        expire = float(expire)
    return (event.channel.text, field, value, event.time, expire,
            _source(event.from_service, event.from_instance), event.id)


@functools.lru_cache(maxsize=4096)
def _source(service: str | None, instance: str | None) -> str:
    return f"{service or ''}/{instance or ''}"


@dataclass(frozen=True, slots=True)
class Query:
    """What a query asks for.

    Attributes:
        channel: the channel queried (its whole subtree is answered).
        field: only this field, or None for every field.
        since: only versions at or after this wall-clock time, or None.
        history: every retained version instead of the newest one.
    """

    channel: Channel
    field: str | None = None
    since: float | None = None
    history: bool = False

    def payload(self) -> dict:
        """The query event's JSON payload."""
        return {"field": self.field, "since": self.since, "history": self.history}

    def wants(self, t: Tuple, now: float) -> bool:
        """Whether tuple ``t`` answers this query at wall-clock ``now``."""
        return (t.channel.startswith(self.channel.text)
                and (self.field is None or t.field == self.field)
                and (self.since is None or t.time >= self.since)
                and (self.history or t.expires_at > now))


def parse_query(event) -> Query:
    """The :class:`Query` a query event carries.

    Raises:
        EventError: the payload is not a query (names what is wrong).
    """
    p = event.payload
    if p is None:
        p = {}
    if not isinstance(p, dict):
        raise EventError(f"query {event.id}: payload must be a JSON object, got "
                         f"{type(p).__name__}", "payload")
    unknown = p.keys() - _QUERY_KEYS
    if unknown:
        raise EventError(f"query {event.id}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}"
                         f" (allowed: field, since, history)", sorted(unknown)[0])
    field, since, history = p.get("field"), p.get("since"), p.get("history", False)
    if field is not None and (not isinstance(field, str) or not field):
        raise EventError(f"query {event.id}: field must be a non-empty string or null, "
                         f"got {field!r:.80}", "field")
    if since is not None and not _is_number(since):
        raise EventError(f"query {event.id}: since must be a time in seconds since the epoch "
                         f"or null, got {since!r:.40}", "since")
    if not isinstance(history, bool):
        raise EventError(f"query {event.id}: history must be true or false, got {history!r:.40}",
                         "history")
    return Query(event.channel, field, None if since is None else float(since), history)


def cut_parts(rows: Iterable[list], part_bytes: int = PART_BYTES) -> list[list[list]]:
    """Cut reply rows into parts of about ``part_bytes`` of JSON each (at least one part).

    A monitor sends one reply event per part; an empty answer is one empty part.
    """
    parts: list[list[list]] = [[]]
    size = 0
    for row in rows:
        n = len(orjson.dumps(row))
        if size + n > part_bytes and parts[-1]:
            parts.append([])
            size = 0
        parts[-1].append(row)
        size += n
    return parts


class Replies:
    """Collects the reply parts of one query from several monitors, and merges them.

    Pure bookkeeping: feed it reply payloads with :meth:`add`; :meth:`complete`
    says whether every monitor heard of (answering, or named as a peer by one
    that answered) has sent all its parts.
    """

    def __init__(self) -> None:
        self._parts: dict[str, dict[int, list]] = {}
        self._last: dict[str, int] = {}     # monitor -> index of its last part
        self._known: set[str] = set()
        self._fed = 0
        self.errors: list[RemoteError] = []

    def feed(self, events: list) -> bool:
        """Take the reply events not seen yet (``request_all``'s ``done`` hook).

        Returns:
            :meth:`complete`.
        """
        for ev in events[self._fed:]:
            self.add(ev.payload, ev.from_service)
        self._fed = len(events)
        return self.complete()

    def add(self, payload: Any, sender: str | None = None) -> None:
        """Take one reply payload (a part, or an error).  Garbage is recorded as an error."""
        if not isinstance(payload, dict) or not isinstance(payload.get("monitor"), str):
            self.errors.append(RemoteError(f"malformed PLDB reply from {sender}: {payload!r:.120}",
                                           code="pldb"))
            return
        mon = payload["monitor"]
        self._known.add(mon)
        if "error" in payload:
            self.errors.append(RemoteError(f"monitor {mon}: {payload['error']}", code="pldb"))
            self._last[mon] = -1           # an error is that monitor's whole answer
            self._parts.setdefault(mon, {})
            return
        part, rows = payload.get("part"), payload.get("tuples")
        if not isinstance(part, int) or not isinstance(rows, list):
            self.errors.append(RemoteError(f"malformed PLDB reply part from monitor {mon}",
                                           code="pldb"))
            return
        self._parts.setdefault(mon, {})[part] = rows
        if payload.get("last"):
            self._last[mon] = part
        peers = payload.get("peers")
        if isinstance(peers, list):
            self._known.update(p for p in peers if isinstance(p, str))

    def answered(self, mon: str) -> bool:
        """Whether monitor ``mon`` has sent every part of its answer."""
        last = self._last.get(mon)
        return last is not None and all(i in self._parts[mon] for i in range(last + 1))

    def complete(self) -> bool:
        """Whether every monitor heard of has answered in full."""
        return bool(self._known) and all(self.answered(m) for m in self._known)

    @property
    def monitors(self) -> list[str]:
        """The monitors that answered in full."""
        return sorted(m for m in self._parts if self.answered(m))

    def tuples(self, history: bool = False) -> list[Tuple]:
        """The merged answer, sorted by channel, field and time.

        A malformed row (from a monitor of another version, a damaged database, or
        someone posing as a monitor) is left out and noted in :attr:`errors`; the
        rest of the answer stands.

        Args:
            history: keep every version once (by id) instead of the newest per
                ``(channel, field)``.
        """
        # Pick the winners on the raw rows (3 monitors answer every tuple: only
        # a third become Tuples), then validate those.  Rows of the wrong types
        # are dropped before they compete (a malformed newer row must not push a
        # good older one out); what is left to check, the channel, is part of the
        # key, so a winner that fails it has no good rival to give way to.
        best: dict[tuple, list] = {}
        bad: list = []
        num, nothing = _NUMBER, (int, float, type(None))
        for parts in self._parts.values():
            for rows in parts.values():
                for row in rows:
                    # Tuple.from_row's type checks, inline: this loop runs for every
                    # row of every monitor (60,000 for a 20,000-tuple subtree).
                    if type(row) is not list or len(row) != 7 or type(row[0]) is not str \
                            or type(row[1]) is not str or not row[1] \
                            or type(row[3]) not in num or type(row[4]) not in nothing \
                            or type(row[5]) is not str or type(row[6]) is not str:
                        bad.append(row)
                        continue
                    key = (row[0], row[1], row[6]) if history else (row[0], row[1])
                    old = best.get(key)
                    if old is None:
                        best[key] = row
                    elif row[6] != old[6] and (row[3], len(row[6]), row[6]) > \
                            (old[3], len(old[6]), old[6]):
                        best[key] = row    # a newer version (the same id is the same one)
        out = []
        for row in best.values():
            try:
                out.append(Tuple.from_row(row))
            except PseprError:          # EventError, or ChannelError for the channel
                bad.append(row)
        if bad:
            self.errors.append(RemoteError(f"a PLDB reply held {len(bad)} malformed tuple "
                                           f"row(s), left out: {bad[0]!r:.120}", code="pldb"))
        out.sort(key=lambda t: (t.channel, t.field, t.time, t.id))
        return out


_SPAN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_span(text: str) -> float:
    """Seconds in a span such as ``"90"``, ``"30s"``, ``"10m"``, ``"2h"`` or ``"1d"``.

    Raises:
        UsageError: not a span.
    """
    m = _SPAN.match(text)
    if not m:
        raise UsageError(f"not a time span: {text!r} (examples: 30s, 10m, 2h, 1d)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _finish(replies: Replies, q: Query, timeout: float) -> list[Tuple]:
    if not replies.monitors:
        if replies.errors:
            raise replies.errors[0]
        raise NoMonitor(f"no PLDB monitor answered for {q.channel.text} within {timeout} s "
                        f"(does a `psepr pldb supervisor` or `psepr pldb monitor` keep that "
                        f"channel? `psepr pldb monitors` lists who keeps what)", q.channel.text)
    tuples = replies.tuples(q.history)
    if replies.errors and not tuples:
        raise replies.errors[0]
    return tuples


def make_query(channel: "str | Channel", field: str | None = None, since: float | None = None,
               history: bool = False) -> Query:
    """A checked :class:`Query` (what :func:`query` sends; call it to check first).

    Raises:
        ChannelError: not a channel.  UsageError: the root, or a bad field or since.
    """
    ch = parse(channel)
    if ch.is_root:
        raise UsageError("a PLDB query needs a channel below the root, e.g. /example.com/node/")
    if field is not None and (not isinstance(field, str) or not field):
        raise UsageError(f"field must be a non-empty string or None, got {field!r}")
    if since is not None and not _is_number(since):
        raise UsageError(f"since must be a wall-clock time in seconds, got {since!r}")
    return Query(ch, field, since, bool(history))


def query(con, channel: "str | Channel", field: str | None = None, since: float | None = None,
          history: bool = False, timeout: float = 2.0, settle: float = 0.5) -> list[Tuple]:
    """Ask PLDB for the tuples on ``channel`` and below (a synchronous connection).

    Args:
        con: a :class:`psepr.Connection`.
        channel: the channel; its whole subtree is answered.
        field: only this field (default: every field).
        since: only values at or after this wall-clock time (``time.time()`` scale).
        history: every retained version, oldest first, instead of the newest one.
        timeout: deadline for the answers, in seconds.
        settle: once one monitor has answered, wait at most this much longer
            for the others it named (a monitor that died meanwhile).

    Returns:
        The tuples, sorted by channel, field and time; one per ``(channel,
        field)`` unless ``history``.  Expired values are left out unless
        ``history``.

    Raises:
        UsageError: bad arguments.
        NoMonitor: no monitor answered within ``timeout``.
        RemoteError: every monitor that answered refused the query (the message
            says why).
    """
    q, replies = make_query(channel, field, since, history), Replies()
    events = con.request_all(q.channel, q.payload(), type=QUERY, timeout=timeout,
                             settle=settle, done=replies.feed)
    replies.feed(events)
    return _finish(replies, q, timeout)


async def aquery(con, channel: "str | Channel", field: str | None = None,
                 since: float | None = None, history: bool = False, timeout: float = 2.0,
                 settle: float = 0.5) -> list[Tuple]:
    """:func:`query` for an asyncio connection (:func:`psepr.aio.connect`)."""
    q, replies = make_query(channel, field, since, history), Replies()
    events = await con.request_all(q.channel, q.payload(), type=QUERY, timeout=timeout,
                                   settle=settle, done=replies.feed)
    replies.feed(events)
    return _finish(replies, q, timeout)


def watch(con, channel: "str | Channel", field: str | None = None, timeout: float = 2.0,
          duration: float = 3600.0) -> Iterator[Tuple]:
    """The current tuples below ``channel``, then every newer one as it is sent.

    The lease is in place on every router (the overlay's barrier) before PLDB
    is asked, so nothing sent in between is missed; a live tuple whose version
    the answer already held (or surpassed) is skipped, so nothing comes twice.

    Args:
        con: a :class:`psepr.Connection`.
        channel: the channel subtree.
        field: only this field.
        timeout: deadline for the PLDB answer.
        duration: the lease's requested duration (renewed automatically).

    Yields:
        :class:`Tuple` values: first the answer (sorted), then live ones.

    Raises:
        NoMonitor: no monitor answered (the lease is released).
    """
    ch = make_query(channel, field).channel        # checked before anything is leased
    lease = con.lease(ch, duration=duration, type=ATTRIBUTE, propagated=True)
    try:
        newest: dict[tuple[str, str], tuple] = {}
        for t in query(con, ch, field=field, timeout=timeout):
            newest[(t.channel, t.field)] = t.version
            yield t
        for ev in lease:
            try:
                t = tuple_from_event(ev, now=_time.time())
            except EventError:
                continue          # not an attribute, or dated ahead: monitors report it
            key = (t.channel, t.field)
            if (field is not None and t.field != field) or \
                    (key in newest and t.version <= newest[key]):
                continue
            newest[key] = t.version
            yield t
    finally:
        lease.release()
