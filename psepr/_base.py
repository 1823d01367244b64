"""What the synchronous and asyncio connections share.

Both shells keep, per lease, a bounded deque of delivered events, and per
connection an *arrivals* deque naming the lease of each delivered event in
arrival order (what ``con.receive()`` walks).  Filing a delivered batch into
those queues, enforcing the per-lease limit, and answering requests from the
inbox are the same in both; only how waiting readers are woken differs, which
each shell supplies (:meth:`ConnectionBase._answer`, and waking the readers of
the leases :meth:`ConnectionBase._file` lists in ``_touched``).
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

from .errors import ConnectionLost, LeaseExpired, TimeoutError, UsageError

log = logging.getLogger("psepr.client")

#: Prefix of the lease ids of request inboxes (see ``request``).
INBOX_PREFIX = "inbox:"


def check_seconds(value: Any, name: str = "timeout", none_ok: bool = False) -> None:
    """Refuse a wait that is not a number of seconds.

    NaN is refused too: every comparison with it is false, so a NaN wait never
    ends, or spins, or ends at once, depending on the primitive under it.

    Raises:
        UsageError: ``value`` is not an int or float (a bool is not), or is NaN.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        if value is None and none_ok:
            return
        raise UsageError(f"{name} must be a number of seconds{' or None' if none_ok else ''}, "
                         f"got {value!r}")


def time_left(timeout: float | None, deadline: float | None, where: str = "") -> tuple:
    """``(deadline, seconds left)`` for a wait of ``timeout`` seconds (None: forever).

    The deadline is fixed at the first call (pass back what it returned): a
    ``receive`` that finds an event waiting never reads the clock.

    Args:
        where: what the wait is on, for the error (e.g. ``" on /a/b/"``).

    Raises:
        TimeoutError: the deadline has passed ("no event<where> within <timeout> s").
        UsageError: ``timeout`` is not a number (NaN included: it would wait forever).
    """
    if timeout is None:
        return None, None
    now = time.monotonic()
    if deadline is None:
        check_seconds(timeout, none_ok=True)
        deadline = now + timeout
    if deadline <= now:
        raise TimeoutError(f"no event{where} within {timeout} s") from None
    return deadline, deadline - now


class LeaseBase:
    """What a lease handle holds in either shell.

    Attributes:
        id: the lease id (unique within the connection).
        channel: the leased :class:`~psepr.channel.Channel`.
        type: the event-type filter, or None.
        granted: the duration the router granted, in seconds.
        dropped: events dropped because this lease's queue was full.
    """

    def __init__(self, con, id: str, channel, type: str | None, has) -> None:
        self._con = con
        self.id = id
        self.channel = channel
        self.type = type
        self.granted = 0.0
        self.dropped = 0
        self._q: collections.deque = collections.deque()
        self._has = has                  # set by the connection when events arrive
        self._waiting = 0                # readers waiting on _has (the shell wakes only those)
        self._warn_at = 0.0
        self._inbox = id.startswith(INBOX_PREFIX)   # a request inbox: replies, not a queue
        self._error: Exception | None = None
        self._closed = False

    def __repr__(self) -> str:
        return (f"<{type(self).__module__.split('.')[-1]}.Lease {self.id} {self.channel.text} "
                f"type={self.type!r} granted={self.granted}>")

    def pending(self) -> int:
        """Events waiting to be received."""
        return len(self._q)

    def take(self, limit: int | None = None) -> list:
        """The events already waiting on this lease, oldest first, without waiting.

        Not a coroutine in either shell: a batch consumer takes what is there
        in one step, and nothing else runs in between.

        Args:
            limit: take at most this many (default: all).

        Returns:
            A list of :class:`~psepr.event.Event`, possibly empty.
        """
        q = self._q
        n = len(q) if limit is None else min(limit, len(q))
        return [q.popleft() for _ in range(n)]


class ConnectionBase:
    """Shared identity properties and delivery bookkeeping (a mixin).

    Subclasses set ``config``, ``_session``, ``welcome``, ``_leases``, ``_lease_seq``,
    ``_errors`` and ``dropped_by_router`` and call :meth:`_init_arrivals`.
    """

    def _init_arrivals(self) -> None:
        # One entry per delivered event, naming its lease, in arrival order.
        # Entries whose event was taken through lease.receive() are skipped;
        # compacted when stale entries pile up (see _compact), never lost.
        self._arrivals: collections.deque = collections.deque()
        self._arrivals_limit = 2 * self.config.lease_queue
        self._touched: dict = {}    # leases given events since the shell last woke readers
        #: Ids of leases whose queue is full: the session does not even build events
        #: only these would receive (they would be dropped); see overflow().
        self.full_ids: set = set()

    @property
    def _curve(self) -> bool:
        """Whether this connection uses CURVE (for the words of a failed handshake)."""
        return self.config.curve_server_key is not None

    def _unreachable(self, limit: float) -> ConnectionLost:
        """The error of a connection that got no WELCOME within ``limit`` seconds."""
        refusal = self._session.refusal
        hint = (f": {refusal}" if refusal is not None else
                " (is `psepr router` running there? does it need CURVE keys?)")
        return ConnectionLost(f"could not reach any router of {', '.join(self.routers)} "
                              f"within {limit:.1f} s{hint}")

    def _auto_lease_id(self) -> str:
        """The next ``L<n>`` that no lease of this connection holds: a lease whose id
        the caller chose (``id="L2"``) is never re-registered by an automatic one.

        Called with the shell's lock held (the sync client) or on its loop (asyncio).
        """
        while True:
            self._lease_seq += 1
            lid = f"L{self._lease_seq}"
            if lid not in self._leases and lid not in self._session.leases:
                return lid

    def _give_up(self, lease_id: str, lease) -> bool:
        """Forget a new lease whose caller stopped waiting for its grant (a timeout, a
        cancelled task): see :meth:`Session.abandon`.  Its events from a grant that
        raced the timeout go too.  The caller sends what the session queued.

        Returns:
            False if ``lease`` is no longer this connection's (nothing to do).
        """
        if self._leases.get(lease_id) is not lease:
            return False
        del self._leases[lease_id]
        self._session.abandon(lease_id)
        lease._closed = True
        lease._q.clear()
        return True

    @property
    def principal(self) -> str | None:
        """The principal the router knows us by (from WELCOME)."""
        return self.welcome.get("principal") if self.welcome else None

    @property
    def instance(self) -> str:
        """This connection's instance name."""
        return self._session.instance

    @property
    def router(self) -> str:
        """The router endpoint in use."""
        return self._session.router

    @property
    def authority(self) -> str | None:
        """The router's own authority (where its system channels live)."""
        return self.welcome.get("authority") if self.welcome else None

    # -- hooks -------------------------------------------------------------------
    def _answer(self, event) -> None:
        """Hand a reply that arrived on an inbox to its waiting request."""
        raise NotImplementedError

    # -- filing deliveries -------------------------------------------------------
    def _file(self, batches: list) -> None:
        """Put delivered batches into the lease queues.

        A batch is ``(lease_ids, events)`` (every event for those leases), or
        ``(None, events)`` (one-event groups for differing leases: each event is
        filed by its own ``leases``).  Leases someone waits on are noted in
        ``_touched`` for the shell to wake.
        """
        leases = self._leases
        arrivals = self._arrivals
        touched = self._touched
        limit = self.config.lease_queue
        for lids, events in batches:
            if lids is None:
                # Many leases, one event each (the 10,000-lease shape): no per-group
                # list to build or walk.
                for ev in events:
                    for lid in ev.leases:
                        lease = leases.get(lid)
                        if lease is None:
                            continue  # released meanwhile
                        q = lease._q
                        if lease._inbox:
                            self._answer(ev)
                        elif len(q) < limit:
                            q.append(ev)
                            arrivals.append(lease)
                            if lease._waiting:
                                touched[lease] = True
                        else:
                            self._full(lease, [ev])
                continue
            n = len(events)
            for lid in lids:
                lease = leases.get(lid)
                if lease is None:
                    continue  # released meanwhile
                if lease._inbox:
                    for ev in events:
                        self._answer(ev)
                    continue
                q = lease._q
                if limit - len(q) > n:
                    q.extend(events)
                    arrivals.extend([lease] * n)
                    if lease._waiting:
                        touched[lease] = True
                else:
                    self._full(lease, events)
        if len(arrivals) > self._arrivals_limit:
            self._compact()

    def _full(self, lease, events: list) -> None:
        """File what fits of ``events`` for a lease whose queue is (nearly) full;
        count the rest (the batch's other leases still get every event)."""
        q = lease._q
        self.full_ids.add(lease.id)
        kept = events[:max(self.config.lease_queue - len(q), 0)]
        if len(kept) < len(events):
            self._dropped_here(lease, len(events) - len(kept))
        q.extend(kept)
        self._arrivals.extend([lease] * len(kept))
        if kept and lease._waiting:
            self._touched[lease] = True

    def _dropped_here(self, lease, n: int) -> None:
        lease.dropped += n
        now = time.monotonic()
        if now >= lease._warn_at:   # at most one warning per lease per 5 s
            lease._warn_at = now + 5.0
            log.warning("lease %s on %s: queue full (%d events, reader too slow); %d dropped "
                        "so far", lease.id, lease.channel.text, self.config.lease_queue,
                        lease.dropped)

    def overflow(self, lids: tuple, n: int) -> None:
        """Sink: ``n`` events for these (all full) leases were not even decoded."""
        for lid in lids:
            lease = self._leases.get(lid)
            if lease is not None:
                self._dropped_here(lease, n)

    def _refresh_full(self) -> None:
        """Forget full leases that have room again (the shell calls it before reading)."""
        if self.full_ids:
            limit = self.config.lease_queue
            leases = self._leases
            self.full_ids = {lid for lid in self.full_ids
                             if lid in leases and len(leases[lid]._q) >= limit}

    def _compact(self) -> None:
        """Drop arrival entries whose events were taken through lease.receive().

        Arrival order between leases becomes approximate (lease by lease) for the
        events kept; within a lease it stays exact.  Runs rarely: only when the
        entries outnumber twice the per-lease queue limit.
        """
        arrivals: collections.deque = collections.deque()
        for lease in [lease for lease in self._leases.values() if lease._q]:
            arrivals.extend([lease] * len(lease._q))
        self._arrivals = arrivals
        self._arrivals_limit = max(2 * self.config.lease_queue, 2 * len(arrivals))

    def _expire(self, lease_id: str):
        """Mark a lease expired at the router; returns it (or None if unknown)."""
        lease = self._leases.pop(lease_id, None)
        if lease is not None:
            log.warning("lease %s on %s expired at the router", lease_id, lease.channel.text)
            lease._error = LeaseExpired(f"lease {lease_id} on {lease.channel.text} expired",
                                        code="expired", channel=lease.channel.text, ref=lease_id)
            lease._has.set()
        return lease

    # -- Sink methods both shells share ------------------------------------------
    def async_error(self, exc: Exception) -> None:
        log.warning("router %s: %s", self._session.router, exc)
        if len(self._errors) < 100:
            self._errors.append(exc)

    def dropped(self, n: int) -> None:
        self.dropped_by_router += n
        log.warning("router %s dropped %d events for this connection (slow reader); %d in all",
                    self._session.router, n, self.dropped_by_router)
