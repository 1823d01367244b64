"""Interest summaries: which routers want which channels (pure core).

Theory of operation
-------------------
A router's *interest* is the set of (channel prefix, type) pairs its local
leases cover; an event is worth sending to a router when one of the event's
channel prefixes is in that router's interest with the event's type or with
``None`` (every type).  Two classes:

* :class:`LocalInterest` turns the local lease set into the *aggregated*
  summary a router advertises: a pair covered by a broader advertised pair
  (``/a/`` with type None covers ``/a/b/`` with any type; ``/a/`` with type T
  covers ``/a/b/`` with type T) is not advertised separately.  Every change
  returns a delta ``(added, removed)``; most lease changes return an empty one.
  Inbox channels (``/<auth>/_inbox/<principal>/...``) are private: only pairs
  at or below the principal's inbox cover them (the router's delivery rule).
* :class:`InterestTable` holds the summaries other routers advertised, each
  with its origin's epoch and sequence number, applies full summaries and
  deltas (a delta must follow the sequence it was made from; otherwise the
  table reports a gap and the caller asks a neighbour for the full summary),
  and answers "which routers want (channel prefixes, type)?" in O(depth).

Everything here is plain data; time, sockets and flooding belong to
:mod:`routers.overlay`.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from psepr.channel import parse
from registry.acl import INBOX

#: A (channel text, type or None) pair.
Pair = tuple


def routing_prefixes(text: str) -> tuple[str, ...]:
    """The channel prefixes whose leases receive events on ``text``.

    Every prefix of the channel, except that inbox channels skip the prefixes
    above ``/<auth>/_inbox/<principal>/`` (inboxes are private).

    Raises:
        ChannelError: ``text`` is not a valid channel.
    """
    ch = parse(text)
    prefs = ch.prefixes()
    if len(ch.parts) >= 3 and ch.parts[1] == INBOX:
        prefs = prefs[3:]
    return prefs


def covers(pair: Pair, other: Pair) -> bool:
    """True if an interest ``pair`` receives every event ``other`` receives."""
    text, typ = pair
    return (typ is None or typ == other[1]) and text in routing_prefixes(other[0])


class LocalInterest:
    """The aggregated interest of one router's local leases.

    ``add``/``remove`` are called once per lease (a reference count per pair
    absorbs duplicates) and return ``(added, removed)``: the change to the
    advertised summary, usually empty.
    """

    def __init__(self) -> None:
        self._counts: dict[Pair, int] = {}
        self._texts: SortedList = SortedList()            # distinct leased channel texts
        self._types: dict[str, dict] = {}                 # text -> {type: count}
        self.advertised: set[Pair] = set()

    def _covered(self, pair: Pair, skip: Pair | None = None) -> bool:
        text, typ = pair
        adv = self.advertised
        for p in routing_prefixes(text):
            for cand in ((p, None), (p, typ)):
                if cand in adv and cand != pair and cand != skip:
                    return True
        return False

    def add(self, text: str, typ: str | None) -> tuple[list, list]:
        """Count one more lease on (text, type).

        Returns:
            ``(added, removed)``: pairs to add to / remove from the advertised summary.
        """
        pair = (text, typ)
        n = self._counts.get(pair, 0)
        self._counts[pair] = n + 1
        if n:
            return [], []
        types = self._types.get(text)
        if types is None:
            self._types[text] = types = {}
            self._texts.add(text)
        types[typ] = True
        if self._covered(pair):
            return [], []
        # Advertise it; drop what it now covers.
        removed = [q for q in self._subtree(text) if q != pair and q in self.advertised
                   and covers(pair, q)]
        for q in removed:
            self.advertised.discard(q)
        self.advertised.add(pair)
        return [pair], removed

    def remove(self, text: str, typ: str | None) -> tuple[list, list]:
        """Count one lease fewer on (text, type); returns ``(added, removed)``."""
        pair = (text, typ)
        n = self._counts.get(pair, 0)
        if n > 1:
            self._counts[pair] = n - 1
            return [], []
        if n == 0:
            return [], []
        del self._counts[pair]
        types = self._types[text]
        del types[typ]
        if not types:
            del self._types[text]
            self._texts.remove(text)
        if pair not in self.advertised:
            return [], []
        self.advertised.discard(pair)
        # Pairs it covered may need advertising now, shortest channels first so
        # that a re-advertised broad pair covers the narrower ones.
        added = []
        for q in sorted((q for q in self._subtree(text) if covers(pair, q)),
                        key=lambda q: (len(q[0]), q[1] is not None)):
            if q not in self.advertised and not self._covered(q):
                self.advertised.add(q)
                added.append(q)
        return added, [pair]

    def _subtree(self, text: str) -> list[Pair]:
        """Every leased pair whose channel is ``text`` or below it."""
        out = []
        for t in self._texts.irange(minimum=text):
            if not t.startswith(text):
                break
            out.extend((t, typ) for typ in self._types[t])
        return out

    def __len__(self) -> int:
        return len(self.advertised)


class Summary:
    """One remote router's advertised interest, at (epoch, seq)."""

    __slots__ = ("epoch", "seq", "pairs")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch = epoch
        self.seq = seq
        self.pairs: set[Pair] = set()


APPLIED, OLD, GAP = "applied", "old", "gap"


class InterestTable:
    """The interest summaries of other routers, indexed by channel prefix."""

    def __init__(self) -> None:
        self.routers: dict[str, Summary] = {}
        self._by_prefix: dict[str, dict[str, set]] = {}   # text -> router -> {types}
        #: Bumped on every change, so callers may cache :meth:`match` results.
        self.generation = 0

    def seq(self, router: str) -> tuple[int, int] | None:
        """``(epoch, seq)`` held for ``router``, or None."""
        s = self.routers.get(router)
        return None if s is None else (s.epoch, s.seq)

    def apply(self, router: str, epoch: int, seq: int, full: bool, add: list,
              remove: list) -> str:
        """Apply a full summary or a delta advertised by ``router``.

        Args:
            router: the origin router.
            epoch, seq: the origin's epoch and the summary's sequence number.
            full: ``add`` is the whole summary (``remove`` is ignored).
            add, remove: lists of (text, type) tuples, already validated.

        Returns:
            ``APPLIED``; ``OLD`` if it is not newer than what the table holds;
            ``GAP`` if it is a delta that does not follow the held sequence (the
            caller should fetch the full summary).
        """
        cur = self.routers.get(router)
        if cur is not None and (epoch, seq) <= (cur.epoch, cur.seq):
            return OLD
        if not full:
            held = cur.seq if cur is not None and cur.epoch == epoch else 0
            if seq != held + 1:
                return GAP
        if full or cur is None or cur.epoch != epoch:
            if cur is not None:
                self._unindex(router, cur.pairs)
            cur = self.routers[router] = Summary(epoch, seq)
        cur.seq = seq
        if not full:
            rm = [p for p in remove if p in cur.pairs]
            self._unindex(router, rm)
            cur.pairs.difference_update(rm)
        new = [p for p in add if p not in cur.pairs]
        cur.pairs.update(new)
        for text, typ in new:
            self._by_prefix.setdefault(text, {}).setdefault(router, set()).add(typ)
        self.generation += 1
        return APPLIED

    def _unindex(self, router: str, pairs) -> None:
        for text, typ in pairs:
            by_router = self._by_prefix.get(text)
            if by_router is None:
                continue
            types = by_router.get(router)
            if types is None:
                continue
            types.discard(typ)
            if not types:
                del by_router[router]
                if not by_router:
                    del self._by_prefix[text]

    def drop(self, router: str) -> None:
        """Forget a router's interest (it died or restarted)."""
        cur = self.routers.pop(router, None)
        if cur is not None:
            self._unindex(router, cur.pairs)
            self.generation += 1

    def drop_before(self, router: str, epoch: int) -> None:
        """Forget a router's interest if it is from a run before ``epoch`` (a restart)."""
        cur = self.routers.get(router)
        if cur is not None and cur.epoch < epoch:
            self.drop(router)

    def match(self, prefixes: tuple, typ: str | None) -> set[str]:
        """The routers whose interest covers an event with these routing prefixes and type."""
        out: set[str] = set()
        by_prefix = self._by_prefix
        for p in prefixes:
            d = by_prefix.get(p)
            if d is None:
                continue
            for router, types in d.items():
                if None in types or typ in types:
                    out.add(router)
        return out

    def full(self, router: str) -> tuple[int, int, list] | None:
        """``(epoch, seq, pairs)`` of a router's summary (to resynchronise a neighbour)."""
        s = self.routers.get(router)
        return None if s is None else (s.epoch, s.seq, sorted(s.pairs, key=_pair_key))


def _pair_key(p: Pair) -> tuple:
    return (p[0], p[1] or "")
