"""The link-state database and shortest paths of the overlay (pure core).

Theory of operation
-------------------
Every router floods a *link-state advertisement* (LSA): its name, its
*epoch* (fixed at start, larger after a restart), a sequence number bumped on
every change and refresh, its neighbours whose links are up (with their
round-trip times, for humans), its interest sequence number (so a router that
missed an interest delta notices) and a few load counters (for ``psepr
status``).  An advertisement replaces the stored one of its origin only when
``(epoch, seq)`` is larger; that order makes flooding converge and lets a
restarted router supersede its former self.

Adverts are soft state: each carries a maximum age, and one not refreshed in
time is dropped (its origin died, and nobody speaks for it).  Long before
that, the dead router's neighbours notice the silent link and flood adverts
without it.

Routes use only links both ends advertise (a half-dead link carries nothing)
and hop count as the cost; ties break on the neighbour's name so every router
computes the same trees.  :meth:`LinkState.routes` gives, for every reachable
router, the neighbour to send through.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Advert:
    """One router's link-state advertisement."""

    router: str
    epoch: int
    seq: int
    links: dict[str, float]           # neighbour -> round-trip time in ms
    interest_seq: int = 0
    load: dict = field(default_factory=dict)
    max_age: float = 30.0
    expires: float = 0.0              # local time, set on arrival

    def to_wire(self) -> dict:
        """The advert as a JSON-able dict (docs/protocol.md, LINKSTATE)."""
        return {"r": self.router, "e": self.epoch, "q": self.seq, "n": self.links,
                "iq": self.interest_seq, "s": self.load, "a": self.max_age}


def advert_from_wire(h: dict) -> Advert:
    """Parse a LINKSTATE header from a peer.

    Raises:
        ValueError: a field is missing or of the wrong type (the message names it).
    """
    r, e, q, n = h.get("r"), h.get("e"), h.get("q"), h.get("n")
    if type(r) is not str or not r:
        raise ValueError(f"linkstate: router name must be a non-empty string, got {r!r}")
    if type(e) is not int or type(q) is not int or e < 0 or q < 0:
        raise ValueError(f"linkstate from {r}: epoch and seq must be non-negative integers")
    if type(n) is not dict or not all(type(k) is str and type(v) in (int, float)
                                      for k, v in n.items()):
        raise ValueError(f"linkstate from {r}: n must map neighbour names to numbers")
    iq, load, age = h.get("iq", 0), h.get("s", {}), h.get("a", 30.0)
    if type(iq) is not int or type(load) is not dict or type(age) not in (int, float) \
            or not 0 < age <= 3600:
        raise ValueError(f"linkstate from {r}: iq must be an integer, s an object and a a "
                         f"number of seconds in (0, 3600]")
    return Advert(r, e, q, dict(n), iq, load, float(age))


class LinkState:
    """The adverts of every known router, and the routes they imply.

    Args:
        me: this router's name (its own advert is stored like the others).
    """

    def __init__(self, me: str) -> None:
        self.me = me
        self.adverts: dict[str, Advert] = {}
        #: Bumped whenever the graph changes, so that callers may cache routes.
        self.generation = 0
        self._routes: dict[str, str] | None = None

    def accept(self, adv: Advert, now: float) -> bool:
        """Store ``adv`` if it is newer than the stored advert of its origin.

        Returns:
            True if stored (the caller floods it on), False if old news.
        """
        cur = self.adverts.get(adv.router)
        if cur is not None and (adv.epoch, adv.seq) <= (cur.epoch, cur.seq):
            return False
        adv.expires = now + adv.max_age
        self.adverts[adv.router] = adv
        if cur is None or cur.links.keys() != adv.links.keys():
            self._changed()
        return True

    def expire(self, now: float) -> list[str]:
        """Drop adverts past their age (never this router's own); returns their origins."""
        gone = [r for r, a in self.adverts.items() if a.expires <= now and r != self.me]
        for r in gone:
            del self.adverts[r]
        if gone:
            self._changed()
        return gone

    def next_expiry(self) -> float | None:
        """When the next advert (other than ours) expires."""
        ex = [a.expires for r, a in self.adverts.items() if r != self.me]
        return min(ex) if ex else None

    def _changed(self) -> None:
        self.generation += 1
        self._routes = None

    def routes(self) -> dict[str, str]:
        """``{router: next hop}`` for every router reachable from this one (not itself).

        Breadth-first over links advertised by both ends; neighbours are visited
        in name order so that equal-cost ties break the same way everywhere.
        """
        if self._routes is not None:
            return self._routes
        adverts = self.adverts
        mine = adverts.get(self.me)
        routes: dict[str, str] = {}
        if mine is not None:
            frontier = []
            for nb in sorted(mine.links):
                other = adverts.get(nb)
                if other is not None and self.me in other.links and nb not in routes:
                    routes[nb] = nb
                    frontier.append(nb)
            while frontier:
                nxt = []
                for node in frontier:
                    for nb in sorted(adverts[node].links):
                        if nb == self.me or nb in routes:
                            continue
                        other = adverts.get(nb)
                        if other is not None and node in other.links:
                            routes[nb] = routes[node]
                            nxt.append(nb)
                frontier = nxt
        self._routes = routes
        return routes

    def reachable(self) -> set[str]:
        """Every router reachable from this one (not itself)."""
        return set(self.routes())
