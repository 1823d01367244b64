"""A PLDB supervisor: keeps every channel it watches at k live monitors.

Theory of operation
-------------------
The shell around :class:`~pldb.placement.Placement`.  One supervisor runs on
each host that offers to keep tuples.  It leases the monitors channel of every
authority it supervises, keeps a :class:`~pldb.peers.PeerTable` of the
announcements, and every ``supervise_every`` seconds (an APScheduler interval
job) asks the placement core what to do, then starts or stops *local*
monitors.  Each local monitor is a :class:`~pldb.monitor.Monitor` with its own
connection and its own SQLite file under ``data_dir``; a monitor restarted on
the same host reopens its file, so it only needs what changed from its peers.

With ``replicas="auto"`` the target k is recomputed each round from the number
of distinct hosts that announce monitors (supervisors start monitors, so that
is the number of hosts offering to keep tuples) with
:func:`~pldb.placement.replicas_for`.

Replicas go to distinct host *names*, so two machines under one name (cloned
images, both ``localhost``) count as one host and hold fewer replicas than k
between them.  A supervisor that hears a live monitor under its own host name
that it did not start says so, once a minute per monitor (after its first
``2 * announce_ttl``, when the announcements of its own previous run have
expired).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler

import psepr.aio
from psepr.channel import Channel, parse
from psepr.errors import EventError, PseprError, UsageError
from psepr.pldb import ANNOUNCE, monitors_channel

from .config import PLDBConfig
from .monitor import Monitor, connect, database_path
from .peers import PeerTable, parse_announcement
from .placement import START, Placement, replicas_for
from .store import TupleStore

log = logging.getLogger("psepr.pldb.supervisor")


class Supervisor:
    """Keeps ``k`` monitors per channel across the hosts running supervisors.

    Args:
        routers: router URL(s) for this supervisor's and its monitors' connections.
        channels: the channel subtrees to keep.
        replicas: k, or ``"auto"`` (see module docs).
        host: this host's name (replicas go to distinct hosts).
        data_dir: where local monitors keep their databases.
        config: timings; ``preset``: the client and PLDB preset name.
        availability: the target A for ``replicas="auto"``.
        rng: random generator for back-offs.

    Raises:
        UsageError: no channels, a root channel, or a bad replica count.
    """

    def __init__(self, routers, channels: list, replicas: "int | str", *, host: str,
                 data_dir: "str | Path", config: PLDBConfig | None = None,
                 preset: str = "lan", availability: float = 0.999,
                 rng: random.Random | None = None) -> None:
        self.roots: list[Channel] = [parse(c) for c in channels]
        if not self.roots or any(r.is_root for r in self.roots):
            raise UsageError("a supervisor needs channels below the root, e.g. /example.com/node/")
        if replicas != "auto" and (not isinstance(replicas, int) or replicas < 1):
            raise UsageError(f"replicas must be a positive integer or 'auto', got {replicas!r}")
        self.routers = routers
        self.replicas = replicas
        self.availability = availability
        self.host = host
        self.data_dir = Path(data_dir)
        self.preset = preset
        self.config = config or PLDBConfig.preset(preset)
        self.table = PeerTable()
        self.placement = Placement(host, self.roots, self.config.backoff, rng or random.Random(),
                                   self.config.backoff_step)
        self.monitors: dict[Channel, Monitor] = {}
        self._busy: set[Channel] = set()        # starts and stops under way
        self._con = None
        self._scheduler: AsyncIOScheduler | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = time.monotonic()
        self._clash_logged: dict[str, float] = {}     # foreign monitor id -> when said
        self._ran: set[str] = set()       # every monitor id this run started (one stopping
                                          # still announces until its last word arrives)

    def target(self) -> int:
        """The k of this round."""
        if self.replicas != "auto":
            return self.replicas
        hosts = {m.host for m in self.table.all()} | {self.host}
        return replicas_for(len(hosts), self.availability)

    async def start(self) -> None:
        """Lease the monitors channels and start the rounds.

        Raises:
            AccessDenied, TimeoutError: a lease was refused or not granted.
        """
        self._con = await psepr.aio.connect(self.routers, preset=self.preset)
        for authority in sorted({r.authority for r in self.roots}):
            lease = await self._con.lease(monitors_channel(authority), type=ANNOUNCE,
                                          id=f"pldb-monitors-{authority}")
            self._tasks.append(asyncio.create_task(self._hear(lease)))
        self._scheduler = AsyncIOScheduler()
        self._scheduler.add_job(self.round, "interval", seconds=self.config.supervise_every,
                                max_instances=1, coalesce=True)
        self._scheduler.start()
        log.info("supervisor on %s keeps %s replica(s) of %s", self.host, self.replicas,
                 ", ".join(r.text for r in self.roots))

    async def _hear(self, lease) -> None:
        async for ev in lease:
            try:
                self.table.heard(parse_announcement(ev.payload, time.monotonic()))
            except EventError as exc:
                log.warning("ignoring a bad announcement %s from %s: %s", ev.id,
                            ev.from_service, exc)

    def impostors(self, now: float) -> list:
        """Live monitors announcing this supervisor's host name that it did not start
        (see the module docstring), each listed at most once a minute."""
        if now - self._started < 2 * self.config.announce_ttl:
            return []
        found = [m for m in self.table.all() if m.host == self.host and m.id not in self._ran
                 and now - self._clash_logged.get(m.id, -1e9) >= 60.0]
        if len(self._clash_logged) > 1000:
            self._clash_logged.clear()
        for m in found:
            self._clash_logged[m.id] = now
        return found

    async def round(self) -> None:
        """One round: forget silent monitors, decide, act (starts and stops run as tasks)."""
        now = time.monotonic()
        self.table.expire(now)
        for m in self.impostors(now):
            log.warning("monitor %s of %s announces host %s, this supervisor's, but this "
                        "supervisor did not start it: do two machines share the name %s? "
                        "Replicas go to distinct host names; give each machine its own "
                        "(--host)", m.id, m.root.text, self.host, self.host)
        for root, m in list(self.monitors.items()):
            if m.failed is not None and m.ended.is_set() and root not in self._busy:
                # It stopped on its own (and said so); the decision below starts another.
                log.error("monitor %s of %s failed (%r): starting another", m.id, root.text,
                          m.failed)
                del self.monitors[root]
                self._tasks.append(asyncio.create_task(m.con.close()))
        local = {root: m.id for root, m in self.monitors.items()}
        for action in self.placement.decide(self.table, local, self.target(), now):
            if action.root in self._busy:
                continue
            self._busy.add(action.root)
            work = self._start_monitor if action.kind == START else self._stop_monitor
            self._tasks.append(asyncio.create_task(work(action.root)))
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _start_monitor(self, root: Channel) -> None:
        con = store = None
        try:
            store = TupleStore(database_path(self.data_dir, root), self.config.history_rows)
            con = await connect(self.routers, self.config, self.preset)
            mon = Monitor(con, root, store, host=self.host, config=self.config)
            self.monitors[root] = mon
            if len(self._ran) > 10_000:
                self._ran = {m.id for m in self.monitors.values()}
            self._ran.add(mon.id)
            await mon.start()
            log.info("started monitor %s of %s (k=%d)", mon.id, root.text, self.target())
        except PseprError as exc:
            log.error("could not start a monitor of %s: %s", root.text, exc)
            self.monitors.pop(root, None)
            if store is not None:
                store.close()
            if con is not None:
                await con.close()
        finally:
            self._busy.discard(root)

    async def _stop_monitor(self, root: Channel, why: str | None = None) -> None:
        try:
            mon = self.monitors.pop(root, None)
            if mon is not None:
                log.info("stopping monitor %s of %s (%s)", mon.id, root.text,
                         why or f"surplus over k={self.target()}")
                await mon.stop()
                await mon.con.close()
        finally:
            self._busy.discard(root)

    async def stop(self) -> None:
        """Stop the rounds and every local monitor (they say ``stopped``)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for root in list(self.monitors):
            await self._stop_monitor(root, "the supervisor stops")
        if self._con is not None:
            await self._con.close()
