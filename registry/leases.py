"""The lease table: who receives which channel, until when (pure core).

Theory of operation
-------------------
A lease is (holder, id, channel, type filter, expiry).  The holder is an opaque
object supplied by the caller (the router passes its connection object), so
the table knows nothing about sockets.  Two indexes serve the two questions:

* ``by_channel[text]`` -> list of leases on exactly that channel.  To find the
  leases covering an event's channel the router looks up each of the channel's
  prefixes (``/``, ``/a/``, ``/a/b/``...): O(depth) dict look-ups per event.
* ``expiry``: a SortedList of (expires, seq, key) so that :meth:`expire` pops
  only what is due, in order, in O(log n) per lease.

Re-granting an existing (holder, id) is a renewal: the expiry moves, the
channel and type may change.  ``on_add(text, type)`` and ``on_remove(text,
type)``, when set, hear of every lease entering or leaving the index (the
router's interest summary follows them); plain renewals call neither.  Grants are capped at ``max_duration``.  Time is
passed in (``now``); the table never reads a clock.
"""

from __future__ import annotations

import itertools
from typing import Hashable, Iterable

from sortedcontainers import SortedList

from psepr.channel import Channel


class Lease:
    """One granted lease.

    Attributes:
        holder: the caller's holder object (e.g. a router connection).
        id: the holder-chosen lease id.
        channel: the leased :class:`Channel`.
        type: event-type filter, or None for every type.
        granted: the granted duration in seconds.
        expires: absolute expiry time.
    """

    __slots__ = ("holder", "id", "channel", "type", "granted", "expires", "_seq")

    def __init__(self, holder: Hashable, id: str, channel: Channel, type: str | None) -> None:
        self.holder = holder
        self.id = id
        self.channel = channel
        self.type = type
        self.granted = 0.0
        self.expires = 0.0
        self._seq = 0

    def __repr__(self) -> str:
        return f"Lease({self.id!r}, {self.channel.text!r}, type={self.type!r})"


class LeaseTable:
    """Leases indexed by channel and by expiry.

    Args:
        max_duration: the longest grant, in seconds (longer requests are cut).
        max_per_holder: the most leases one holder may hold.
    """

    def __init__(self, max_duration: float = 3600.0, max_per_holder: int = 100_000) -> None:
        self.max_duration = max_duration
        self.max_per_holder = max_per_holder
        self.by_channel: dict[str, list[Lease]] = {}
        self._by_key: dict[tuple, Lease] = {}
        self._per_holder: dict[Hashable, dict[str, Lease]] = {}
        self._expiry: SortedList = SortedList()
        self._seq = itertools.count()
        #: Bumped whenever the set of (holder, channel, type) changes (not on plain
        #: renewals), so that callers may cache matching results.
        self.generation = 0
        self.on_add = None      # callable(text, type) or None
        self.on_remove = None

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, holder: Hashable, lease_id: str) -> Lease | None:
        return self._by_key.get((holder, lease_id))

    def holder_leases(self, holder: Hashable) -> list[Lease]:
        """The leases of one holder."""
        return list(self._per_holder.get(holder, {}).values())

    def grant(self, holder: Hashable, lease_id: str, channel: Channel, type: str | None,
              duration: float, now: float) -> Lease:
        """Grant a new lease or renew an existing one.

        Args:
            holder: the holder object.
            lease_id: holder-chosen id; an existing id is renewed.
            channel: channel to lease (the root is allowed).
            type: event-type filter or None.
            duration: requested seconds (> 0); capped at ``max_duration``.
            now: current time.

        Returns:
            The granted :class:`Lease` (``granted``/``expires`` set).

        Raises:
            OverflowError: if the holder already has ``max_per_holder`` leases.
        """
        key = (holder, lease_id)
        lease = self._by_key.get(key)
        if lease is None:
            mine = self._per_holder.setdefault(holder, {})
            if len(mine) >= self.max_per_holder:
                raise OverflowError(f"at most {self.max_per_holder} leases per connection")
            lease = Lease(holder, lease_id, channel, type)
            self.generation += 1
            self._by_key[key] = lease
            mine[lease_id] = lease
            self.by_channel.setdefault(channel.text, []).append(lease)
            if self.on_add is not None:
                self.on_add(channel.text, type)
        else:
            self._expiry.discard((lease.expires, lease._seq, key))
            if lease.channel != channel or lease.type != type:
                self.generation += 1
                if self.on_remove is not None:
                    self.on_remove(lease.channel.text, lease.type)
                    self.on_add(channel.text, type)
            if lease.channel != channel:
                self._unindex(lease)
                lease.channel = channel
                self.by_channel.setdefault(channel.text, []).append(lease)
            lease.type = type
        lease.granted = min(float(duration), self.max_duration)
        lease.expires = now + lease.granted
        lease._seq = next(self._seq)
        self._expiry.add((lease.expires, lease._seq, key))
        return lease

    def _unindex(self, lease: Lease) -> None:
        lst = self.by_channel.get(lease.channel.text)
        if lst is not None:
            # Rebuild rather than mutate: an event being routed may hold the old list.
            rest = [x for x in lst if x is not lease]
            if rest:
                self.by_channel[lease.channel.text] = rest
            else:
                del self.by_channel[lease.channel.text]

    def release(self, holder: Hashable, lease_id: str) -> Lease | None:
        """Remove one lease; returns it, or None if it did not exist."""
        key = (holder, lease_id)
        lease = self._by_key.pop(key, None)
        if lease is None:
            return None
        self.generation += 1
        self._expiry.discard((lease.expires, lease._seq, key))
        self._unindex(lease)
        if self.on_remove is not None:
            self.on_remove(lease.channel.text, lease.type)
        mine = self._per_holder.get(holder)
        if mine is not None:
            mine.pop(lease_id, None)
            if not mine:
                del self._per_holder[holder]
        return lease

    def release_holder(self, holder: Hashable) -> list[Lease]:
        """Remove every lease of a holder (it disconnected); returns them."""
        return [lease for lid in list(self._per_holder.get(holder, {}))
                if (lease := self.release(holder, lid)) is not None]

    def expire(self, now: float) -> list[Lease]:
        """Remove and return every lease whose expiry is at or before ``now``."""
        out = []
        while self._expiry and self._expiry[0][0] <= now:
            _, _, key = self._expiry[0]
            lease = self.release(*key)
            if lease is None:  # pragma: no cover - index and table always agree
                self._expiry.pop(0)
                continue
            out.append(lease)
        return out

    def next_expiry(self) -> float | None:
        """When the next lease expires, or None if there are none."""
        return self._expiry[0][0] if self._expiry else None

    def matching(self, channel: Channel) -> Iterable[Lease]:
        """Every lease covering ``channel`` (any type), for tests and tools."""
        for p in channel.prefixes():
            yield from self.by_channel.get(p, ())
