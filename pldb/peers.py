"""Who monitors what: the table of monitor announcements (pure core).

Theory of operation
-------------------
Every monitor announces itself every ``announce_every`` seconds on
``/<authority>/_sys/pldb/monitors/`` with its id, host, root channel, state and
a time-to-live.  Monitors and supervisors keep a :class:`PeerTable` of what they
heard: an entry lives until its ttl passes without a fresh announcement (soft
state: a monitor that died simply stops being counted), or until the monitor
says ``stopped``.  Times are the *receiver's* monotonic clock, passed in, so
clocks of other hosts never matter.

States: ``filling`` (starting; copying tuples from its peers, not answering),
``ready`` (answers queries), ``broken`` (its storage fails; not answering),
``stopped`` (gone on purpose).  A monitor counts towards a channel's replicas
while it is ``filling`` or ``ready``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psepr.channel import Channel, parse
from psepr.errors import ChannelError, EventError

FILLING, READY, BROKEN, STOPPED = "filling", "ready", "broken", "stopped"
STATES = (FILLING, READY, BROKEN, STOPPED)
#: States that count towards a channel's replicas.
LIVE = (FILLING, READY)
#: Longest announcement lifetime taken, in seconds.  A monitor that dies lingers
#: this long in every peer table (counted as a replica, waited for by askers), so
#: a ttl of 1e300 from a misconfigured or hostile announcer would make a ghost
#: that never leaves; the presets announce ttls of 1.75-10.5 s.
MAX_TTL = 300.0


@dataclass(frozen=True, slots=True)
class MonitorInfo:
    """What one announcement said.

    Attributes:
        id: the monitor's id (unique in the farm).
        host: the host it runs on.
        root: the channel subtree it leases.
        state: one of :data:`STATES`.
        tuples: how many current tuples it holds.
        until: receiver's monotonic time after which the entry is gone.
        stored: tuple versions it stored since it started (a rate gauge).
        dropped: tuples it lost at a full queue since it started (too slow).
    """

    id: str
    host: str
    root: Channel
    state: str
    tuples: int
    until: float
    stored: int = 0
    dropped: int = 0

    def announcement(self, ttl: float) -> dict:
        """The announcement payload describing this monitor."""
        return {"monitor": self.id, "host": self.host, "root": self.root.text,
                "state": self.state, "tuples": self.tuples, "stored": self.stored,
                "dropped": self.dropped, "ttl": ttl}


def parse_announcement(payload: Any, now: float) -> MonitorInfo:
    """The :class:`MonitorInfo` an announcement payload carries, heard at ``now``.

    Raises:
        EventError: the payload is not an announcement (names what is wrong).
    """
    if not isinstance(payload, dict):
        raise EventError(f"monitor announcement must be a JSON object, got "
                         f"{type(payload).__name__}", "payload")
    for key in ("monitor", "host", "root", "state"):
        if not isinstance(payload.get(key), str) or not payload[key]:
            raise EventError(f"monitor announcement: {key} must be a non-empty string, "
                             f"got {payload.get(key)!r:.60}", key)
    if payload["state"] not in STATES:
        raise EventError(f"monitor announcement: unknown state {payload['state']!r:.40} "
                         f"(one of {', '.join(STATES)})", "state")
    ttl = payload.get("ttl")
    counts = {k: payload.get(k, 0) for k in ("tuples", "stored", "dropped")}
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL:
        raise EventError(f"monitor announcement: ttl must be a positive number of seconds, at "
                         f"most {MAX_TTL:g}, got {ttl!r:.40}", "ttl")
    for key, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int):
            raise EventError(f"monitor announcement: {key} must be an integer, got {n!r:.40}", key)
    try:
        root = parse(payload["root"])
    except ChannelError as exc:
        raise EventError(f"monitor announcement: bad root: {exc}", "root") from None
    return MonitorInfo(payload["monitor"], payload["host"], root, payload["state"],
                       counts["tuples"], now + ttl, counts["stored"], counts["dropped"])


class PeerTable:
    """Monitors heard of, by id; entries expire (soft state)."""

    def __init__(self) -> None:
        self._by_id: dict[str, MonitorInfo] = {}

    def heard(self, info: MonitorInfo) -> None:
        """Record an announcement (``stopped`` removes the monitor at once)."""
        if info.state == STOPPED:
            self._by_id.pop(info.id, None)
        else:
            self._by_id[info.id] = info

    def expire(self, now: float) -> list[MonitorInfo]:
        """Forget monitors not heard from in time.

        Returns:
            The entries forgotten.
        """
        gone = [m for m in self._by_id.values() if m.until <= now]
        for m in gone:
            del self._by_id[m.id]
        return gone

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[MonitorInfo]:
        """Every monitor known, sorted by root then id."""
        return sorted(self._by_id.values(), key=lambda m: (m.root.text, m.id))

    def live_on(self, root: Channel) -> list[MonitorInfo]:
        """The live (filling or ready) monitors whose root is exactly ``root``, by id."""
        return sorted((m for m in self._by_id.values() if m.root == root and m.state in LIVE),
                      key=lambda m: m.id)

    def ready_covering(self, channel: Channel) -> list[MonitorInfo]:
        """The ready monitors whose root covers ``channel`` (they receive its queries)."""
        return [m for m in self._by_id.values()
                if m.state == READY and m.root.covers(channel)]
