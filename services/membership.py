"""Membership: the channels, the payloads, and agreement on numbered views (pure core).

Theory of operation
-------------------
Channels (``A`` is the authority)::

    /A/farm/heartbeat/<host>/     type heartbeat   node agents -> detectors
    /A/farm/detectors/<name>/     type detector    each detector's opinion, to all detectors
    /A/farm/membership/           type view        the numbered views (full member map)
    /A/farm/membership/           type members     a query; every detector answers with its view
    /A/farm/membership/<host>/    type membership  one event per change of one node

Each detector (:mod:`services.detector`) publishes its *opinion* every
``t_gossip`` and at once when it changes: every node it knows with the node's
incarnation and its local state (alive, suspect, left), and whether the
detector is healthy (:class:`services.detection.HealthGuard`).

**Agreement.**  Every detector keeps the latest opinion of every detector
(:class:`Opinions`); a detector is *live* while its opinion is younger than
``detector_ttl``.  The live, healthy detector with the smallest name is the
*leader*; only it publishes views.  Each view it publishes is computed by
:func:`next_view` from the previous view and the live opinions:

* a node any live detector says ``left`` (at its current incarnation or
  later) is ``left``;
* a node suspected by a quorum -- a majority of the live *healthy*
  detectors -- is ``failed`` (unhealthy detectors abstain: a starved
  detector must doubt itself before it accuses others);
* a node suspected by at least one healthy detector, but fewer than a
  quorum, is ``suspect`` (its agent hears it and refutes with a higher
  incarnation); a failed node stays failed until no healthy detector
  suspects it any more, then it has ``recovered``;
* otherwise it is ``alive``; failed and departed nodes leave the view
  ``t_cleanup`` after they failed or left.

Views are numbered from 1; each carries the full member map and the changes
since the previous view.  Every detector, leader or not, follows the views it
hears (:class:`ViewFollower` keeps only increasing numbers), so when the
leader dies its successor -- the next smallest live healthy name, once the
old leader's opinion has aged past ``detector_ttl`` -- continues the same
sequence from the last number it saw.  A leader that hears a view numbered at
least as high as its own from another detector adopts it (two leaders only
overlap while one of them is partitioned or starved; the healthy rule keeps a
detector that was just starved from leading until it has caught up).  Every
subscriber therefore sees one sequence of views; one that joins late asks
with a ``members`` query and continues from the answer.  After a partition,
each view names the view it follows (``prev``), so every detector recognises
the other side's views as a fork and keeps them as *rivals*; whoever leads
next reports every node whose state differs from a rival's and names the
rivals it reconciled (``merged``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from psepr.channel import Channel, parse
from psepr.errors import EventError

from .detection import ALIVE, LEFT, SUSPECT

#: View states of a node (``recovered`` is an event, the state is alive again).
FAILED = "failed"
RECOVERED = "recovered"
STATES = (ALIVE, SUSPECT, FAILED, LEFT)
EVENTS = (ALIVE, SUSPECT, FAILED, RECOVERED, LEFT)

#: Event types.
HEARTBEAT = "heartbeat"
OPINION = "detector"
VIEW = "view"
CHANGE = "membership"
QUERY = "members"


def farm_channel(authority: str, *elements: str) -> Channel:
    """``/<authority>/farm/<elements>/`` as a parsed channel.

    Raises:
        ChannelError: the authority or an element breaks the channel grammar.
    """
    return parse("/" + "/".join((authority, "farm", *elements)) + "/")


def heartbeat_channel(authority: str, host: str | None = None) -> Channel:
    """The heartbeat subtree, or one host's heartbeat channel."""
    return farm_channel(authority, "heartbeat", *((host,) if host else ()))


def detectors_channel(authority: str, name: str | None = None) -> Channel:
    """The detectors' opinion subtree, or one detector's channel."""
    return farm_channel(authority, "detectors", *((name,) if name else ()))


def membership_channel(authority: str, host: str | None = None) -> Channel:
    """The membership channel (views, queries), or one host's change channel."""
    return farm_channel(authority, "membership", *((host,) if host else ()))


# -- payloads ---------------------------------------------------------------------------

_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "an object", list: "an array"}


def _field(payload: Any, name: str, kind, what: str):
    """``payload[name]`` if it is of ``kind`` (a type or a tuple of types; JSON booleans
    are not numbers), else an EventError naming the field and what it should be."""
    if not isinstance(payload, dict):
        raise EventError(f"{what} payload must be a JSON object, got {type(payload).__name__}")
    value = payload.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        expected = "a number" if kind == (int, float) else _JSON_NAMES.get(kind, str(kind))
        raise EventError(f"{what} payload needs {name!r} as {expected}, got {value!r}")
    return value


#: Largest incarnation or counter taken: JSON's exact-integer range.  An agent's
#: incarnation starts at the wall-clock millisecond (about 2**41), and a refutation
#: adds one to the accused incarnation, so a larger one can only be someone's
#: garbage; taking it would push the node's refutation past what JSON (and orjson,
#: at 2**64) can carry.
MAX_COUNT = 2**53 - 1


def _count(payload: Any, name: str, what: str) -> int:
    value = _field(payload, name, int, what)
    if not 0 <= value <= MAX_COUNT:
        raise EventError(f"{what} payload: {name} must be between 0 and 2**53 - 1, got {value}")
    return value


@dataclass(frozen=True)
class Heartbeat:
    """One heartbeat: ``{"host", "incarnation", "counter", "period", "state"}``."""

    host: str
    incarnation: int
    counter: int
    period: float
    left: bool = False

    def payload(self) -> dict:
        return {"host": self.host, "incarnation": self.incarnation, "counter": self.counter,
                "period": self.period, "state": LEFT if self.left else ALIVE}

    @classmethod
    def parse(cls, payload: Any) -> "Heartbeat":
        """Validate a heartbeat payload.

        Raises:
            EventError: a field is missing or of the wrong kind, or the state is unknown.
        """
        host = _field(payload, "host", str, "heartbeat")
        state = payload.get("state", ALIVE)
        if state not in (ALIVE, LEFT):
            raise EventError(f"heartbeat state must be alive or left, got {state!r}")
        period = payload.get("period", 0.0)
        if not isinstance(period, (int, float)) or isinstance(period, bool) or period < 0:
            raise EventError(f"heartbeat period must be a non-negative number, got {period!r}")
        return cls(host, _count(payload, "incarnation", "heartbeat"),
                   _count(payload, "counter", "heartbeat"), float(period), state == LEFT)


@dataclass(frozen=True)
class Opinion:
    """One detector's opinion: what it knows of every node, and its own health."""

    detector: str
    epoch: float                       # the detector's start (wall clock): a restart is newer
    seq: int
    healthy: bool
    health: int
    view: int                          # the last view number it saw
    nodes: Mapping[str, tuple[int, str]]
    view_by: str = ""                  # ... and the leader that published it
    led: int = 0                       # the last view it published itself as leader

    def payload(self) -> dict:
        return {"detector": self.detector, "epoch": self.epoch, "seq": self.seq,
                "healthy": self.healthy, "health": self.health, "view": self.view,
                "view_by": self.view_by, "led": self.led,
                "nodes": {h: [inc, st] for h, (inc, st) in self.nodes.items()}}

    @classmethod
    def parse(cls, payload: Any) -> "Opinion":
        """Validate an opinion payload.

        Raises:
            EventError: a field is missing, of the wrong kind, or names an unknown state.
        """
        what = "detector opinion"
        nodes = _field(payload, "nodes", dict, what)
        parsed = {}
        for host, entry in nodes.items():
            if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
                    or isinstance(entry[0], bool) or entry[1] not in (ALIVE, SUSPECT, LEFT)):
                raise EventError(f"{what}: node {host!r} must be [incarnation, state], "
                                 f"got {entry!r}")
            parsed[host] = (entry[0], entry[1])
        epoch = _field(payload, "epoch", (int, float), what)
        view_by = payload.get("view_by", "")
        if not isinstance(view_by, str):
            raise EventError(f"{what}: view_by must be a detector name, got {view_by!r}")
        led = payload.get("led", 0)
        if not isinstance(led, int) or isinstance(led, bool) or led < 0:
            raise EventError(f"{what}: led must be a view number, got {led!r}")
        return cls(_field(payload, "detector", str, what), float(epoch),
                   _count(payload, "seq", what), bool(_field(payload, "healthy", bool, what)),
                   _count(payload, "health", what), _count(payload, "view", what), parsed,
                   view_by, led)


@dataclass(frozen=True)
class Member:
    """A node in a view."""

    state: str
    incarnation: int
    since: float                       # wall-clock time of its last state change

    def as_list(self) -> list:
        return [self.state, self.incarnation, self.since]


def _view_id(entry: Any, what: str) -> tuple[int, str]:
    """``[number, leader]`` from a view payload, validated."""
    if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], int)
            or isinstance(entry[0], bool) or entry[0] < 0 or not isinstance(entry[1], str)):
        raise EventError(f"view: {what} must be [number, leader], got {entry!r}")
    return entry[0], entry[1]


@dataclass(frozen=True)
class View:
    """A numbered membership view.

    Attributes:
        number: 1, 2, ...; 0 is the empty view before the first.
        leader: the detector that published it.
        members: host -> :class:`Member`.
        changes: ``(host, event)`` pairs that made it (event in :data:`EVENTS`).
        prev: ``(number, leader)`` of the view this one follows -- how a follower
            tells a continuation of what it holds from a fork.
        merged: the ``(number, leader)`` of the rival views this one reconciles
            (after a healed partition); followers stop counting them as rivals.
    """

    number: int = 0
    leader: str = ""
    members: Mapping[str, Member] = field(default_factory=dict)
    changes: tuple[tuple[str, str], ...] = ()
    prev: tuple[int, str] = (0, "")
    merged: tuple[tuple[int, str], ...] = ()

    @property
    def id(self) -> tuple[int, str]:
        """``(number, leader)``: what names a view across forks."""
        return self.number, self.leader

    def payload(self) -> dict:
        return {"view": self.number, "leader": self.leader,
                "members": {h: m.as_list() for h, m in sorted(self.members.items())},
                "changes": [list(c) for c in self.changes],
                "prev": list(self.prev), "merged": [list(m) for m in self.merged]}

    @classmethod
    def parse(cls, payload: Any) -> "View":
        """Validate a view payload (``prev`` and ``merged`` may be absent).

        Raises:
            EventError: a field is missing or malformed.
        """
        what = "view"
        members = {}
        for host, entry in _field(payload, "members", dict, what).items():
            if (not isinstance(entry, list) or len(entry) != 3 or entry[0] not in STATES
                    or not isinstance(entry[1], int) or not isinstance(entry[2], (int, float))
                    or isinstance(entry[1], bool) or isinstance(entry[2], bool)):
                raise EventError(f"view: member {host!r} must be [state, incarnation, since], "
                                 f"got {entry!r}")
            members[host] = Member(entry[0], entry[1], float(entry[2]))
        changes = payload.get("changes", [])
        if not isinstance(changes, list) or not all(
                isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and c[1] in EVENTS
                for c in changes):
            raise EventError(f"view: changes must be [[host, event], ...], got {changes!r}")
        prev = _view_id(payload.get("prev", [0, ""]), "prev")
        merged = payload.get("merged", [])
        if not isinstance(merged, list):
            raise EventError(f"view: merged must be [[number, leader], ...], got {merged!r}")
        return cls(_count(payload, "view", what), _field(payload, "leader", str, what),
                   members, tuple((c[0], c[1]) for c in changes), prev,
                   tuple(_view_id(m, "each merged entry") for m in merged))

    def change_payload(self, host: str, event: str) -> dict:
        """The payload of the ``membership`` event for one change of this view."""
        m = self.members.get(host)
        return {"host": host, "state": event, "incarnation": m.incarnation if m else 0,
                "since": m.since if m else 0.0, "view": self.number, "leader": self.leader}


# -- agreement --------------------------------------------------------------------------

def quorum(voters: int) -> int:
    """A majority of ``voters`` (at least 1)."""
    return voters // 2 + 1


class Opinions:
    """The latest opinion of every detector, and when it arrived.

    Args:
        ttl: an opinion older than this is its detector's death.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._latest: dict[str, tuple[Opinion, float]] = {}

    def add(self, opinion: Opinion, now: float) -> bool:
        """Keep ``opinion`` unless an opinion of the same detector is newer.

        Returns:
            True when it was kept.
        """
        old = self._latest.get(opinion.detector)
        if old is not None and (opinion.epoch, opinion.seq) <= (old[0].epoch, old[0].seq):
            return False
        self._latest[opinion.detector] = (opinion, now)
        return True

    def live(self, now: float, stretch: float = 1.0) -> list[Opinion]:
        """The opinions of live detectors, by name; forgets long-dead ones."""
        ttl = self.ttl * stretch
        for name, (_, at) in list(self._latest.items()):
            if now - at > 10 * ttl:
                del self._latest[name]
        return [op for name, (op, at) in sorted(self._latest.items()) if now - at <= ttl]

    def heard_since(self, t: float, now: float, stretch: float = 1.0) -> bool:
        """True when every live detector's latest opinion arrived at ``t`` or later."""
        ttl = self.ttl * stretch
        return all(at >= t for _, at in self._latest.values() if now - at <= ttl)

    def leader(self, now: float, stretch: float = 1.0) -> str | None:
        """The live healthy detector with the smallest name, or None."""
        for op in self.live(now, stretch):
            if op.healthy:
                return op.detector
        return None


def _event(old: Member | None, state: str, incarnation: int) -> str | None:
    """The change event from ``old`` to (``state``, ``incarnation``), or None if none."""
    if old is not None and old.state == state and old.incarnation == incarnation:
        return None
    return RECOVERED if state == ALIVE and old is not None and old.state == FAILED else state


def next_view(previous: View, opinions: Iterable[Opinion], leader: str, wall: float,
              t_cleanup: float, rivals: Iterable[View] = ()) -> View:
    """The view that follows ``previous`` given the live detectors' opinions.

    Args:
        previous: the last view (number 0 for none).
        opinions: the live detectors' opinions (healthy or not).
        leader: the name of the detector computing it.
        wall: the wall-clock time (for ``since``).
        t_cleanup: seconds a failed or departed node stays in the view.
        rivals: views another leader published while this one's sequence went on
            without them (a partition healed): the next view is numbered past
            them too, and its changes also name every node whose state differs
            from a rival's, so that their subscribers hear it.

    Returns:
        ``previous`` itself when nothing changed (same object), else the next
        view (numbered one past ``previous`` and every rival) with its changes.
    """
    ops = list(opinions)
    rivals = [r for r in rivals if r is not previous]
    voters = [op for op in ops if op.healthy]
    need = quorum(len(voters))
    hosts = set(previous.members)
    for op in ops:
        hosts.update(op.nodes)
    for r in rivals:
        hosts.update(r.members)
    members: dict[str, Member] = {}
    changes: list[tuple[str, str]] = []
    for host in sorted(hosts):
        old = previous.members.get(host)
        seen = [op.nodes[host] for op in ops if host in op.nodes]
        inc = max([i for i, _ in seen] + ([old.incarnation] if old else []), default=0)
        # Votes count only for the newest incarnation: a refutation voids older suspicions.
        left = any(st == LEFT and i >= inc for i, st in seen)
        suspects = sum(1 for op in voters
                       if host in op.nodes and op.nodes[host][1] == SUSPECT
                       and op.nodes[host][0] >= inc)
        alive = any(st == ALIVE and i >= inc for i, st in seen)
        if left:
            state = LEFT
        elif voters and suspects >= need:
            state = FAILED
        elif suspects:
            state = FAILED if old is not None and old.state == FAILED else SUSPECT
        elif alive:
            state = ALIVE
        elif old is None:
            continue                   # nobody says it is alive: it does not join (or rejoin)
        else:
            state = old.state          # nobody healthy has an opinion: keep what we had
        if old is None and state != ALIVE:
            continue                   # never a member: nothing to report
        if (old is not None and old.state in (FAILED, LEFT) and state == old.state
                and wall - old.since > t_cleanup):
            continue                   # gone for good: dropped from the view
        # One event per node: against our previous view, or a rival's when only that
        # differs; "recovered" wins if any of them had it failed.
        events = [e for e in (_event(o, state, inc) for o in
                              [old] + [r.members.get(host) for r in rivals]) if e]
        event = RECOVERED if RECOVERED in events else (events[0] if events else None)
        if event is None:
            members[host] = old
            continue
        since = old.since if old is not None and old.state == state else wall
        members[host] = Member(state, inc, since)
        changes.append((host, event))
    if not changes and not rivals and members.keys() == previous.members.keys():
        return previous
    number = max([previous.number] + [r.number for r in rivals]) + 1
    return View(number, leader, members, tuple(changes), previous.id,
                tuple(sorted(r.id for r in rivals)))


class ViewFollower:
    """The latest view a detector has accepted, its lineage, and the rival views.

    Numbers only ever increase.  The follower remembers which views (by number
    and leader) it accepted, so that a view from a *fork* -- published by
    another leader while a partition kept the two apart -- is recognised as a
    rival rather than mistaken for an old view of this sequence.  Every
    follower keeps the rivals it sees, not only the leader that published one:
    whichever detector leads after the partition heals must tell both sides'
    subscribers where their views differ from the next one.

    Args:
        memory: how many accepted views to remember.

    Attributes:
        view: the view followed.
        rivals: leader -> the last view of that leader's fork, not yet reconciled.
    """

    def __init__(self, memory: int = 256) -> None:
        self.view = View()
        self.rivals: dict[str, View] = {}
        self._lineage: dict[tuple[int, str], None] = {}
        self._memory = memory

    def offer(self, view: View) -> bool:
        """Take a view heard from a detector (or published by this one).

        A view newer than the one held is followed; if it does not continue a
        view this follower knows (its ``prev`` is unknown) and does not merge the
        held one, the two forked and the held view becomes a rival (subscribers
        hold it).  A view not newer and never accepted is a rival itself.  The
        rivals a view ``merged`` are settled.

        Returns:
            True when the view is followed.
        """
        for vid in view.merged:
            self.settled(vid)
        mine = self.view
        if view.number > mine.number:
            if mine.number and not self.known(*view.prev) and mine.id not in view.merged:
                self.rivals[mine.leader] = mine
            self.view = view
            self._remember(view.id)
            return True
        if not self.known(*view.id):
            self.rivals[view.leader] = view
        return False

    def settled(self, vid: tuple[int, str]) -> None:
        """Count the view ``vid`` as known and no longer a rival (a later view
        reconciled it, or it is an old view of this sequence)."""
        rival = self.rivals.get(vid[1])
        if rival is not None and rival.id == vid:
            del self.rivals[vid[1]]
        self._remember(vid)

    def _remember(self, vid: tuple[int, str]) -> None:
        self._lineage[vid] = None
        while len(self._lineage) > self._memory:
            del self._lineage[next(iter(self._lineage))]

    def known(self, number: int, leader: str) -> bool:
        """True when the view ``(number, leader)`` is one this follower accepted or
        saw reconciled (number 0, the empty view, is everybody's)."""
        return number == 0 or (number, leader) in self._lineage


# -- the subscriber's side ----------------------------------------------------------------

def best_answer(replies: Iterable[Any]) -> tuple[View, dict] | None:
    """The newest view among the detectors' answers to a ``members`` query.

    Args:
        replies: reply events (their payloads as :meth:`Detector.status` makes them).

    Returns:
        ``(view, answer)`` for the highest view number, or None when no reply
        held a valid view.
    """
    best = None
    for r in replies:
        payload = r.payload
        try:
            view = View.parse(payload.get("view") if isinstance(payload, dict) else None)
        except EventError:
            continue
        if best is None or view.number > best[0].number:
            best = (view, payload)
    return best


def members(con, authority: str, timeout: float = 2.0) -> tuple[View, dict]:
    """Ask the detectors for the current membership view (synchronous connection).

    Args:
        con: a :class:`psepr.Connection`.
        authority: the naming authority.
        timeout: how long to wait for the first answer.

    Returns:
        ``(view, answer)``: the newest view any detector holds, and that
        detector's answer (``detector``, ``leader``, ``detectors``, ``healthy``).

    Raises:
        NoRoute: no detector answered within ``timeout``.
    """
    from psepr.errors import NoRoute
    ch = membership_channel(authority)
    replies = con.request_all(ch, {}, type=QUERY, timeout=timeout, settle=0.3)
    best = best_answer(replies)
    if best is None:
        raise NoRoute(f"no detector answered on {ch.text} within {timeout:g} s "
                      f"(is `psepr detector --authority {authority}` running?)")
    return best
