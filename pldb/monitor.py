"""A PLDB monitor: remembers one channel subtree and answers queries about it.

Theory of operation
-------------------
A monitor is an ordinary client of the bus (an asyncio connection).  It holds
three leases:

* ``root`` filtered to attribute events: every tuple sent below ``root`` is
  validated (:func:`psepr.pldb.tuple_from_event`) and stored, a batch per
  SQLite transaction, in its :class:`~pldb.store.TupleStore`;
* ``root`` filtered to query events: each is answered on the asker's inbox,
  in parts, naming the other ready monitors of the channel (``peers``) so the
  asker knows whose answers to wait for;
* the authority's monitors channel: announcements of every monitor, its own
  included, kept in a :class:`~pldb.peers.PeerTable`.

Start-up: lease first (with the overlay-wide barrier), then listen for the
peers' announcements for ``fill_wait``, then copy every version the ready peers
hold (a query with ``history``).  Live tuples are stored meanwhile; the store's
upsert keeps the newest version whatever the order, so the live stream and the
copy need no merge step and leave no gap.  Only then does the monitor say
``ready`` and answer queries: a new monitor never answers with half a past.

Bad input (a malformed attribute, one dated more than ``max_clock_ahead``
ahead of the monitor's clock, a query without a reply channel) is dropped,
counted, and reported on ``/<authority>/_sys/pldb/reports/`` at most once per
``report_every``; a malformed query is answered with an error naming the
problem.  A failing database (disk full, read-only) turns the monitor
``broken``: it stops answering, reports, retries every ``retry_storage``
seconds, and after a write succeeds again fills from its peers once more
(tuples were lost meanwhile) before it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import psepr
import psepr.aio
from psepr.channel import Channel, parse
from psepr.errors import EventError, PseprError, StorageError
from psepr.pldb import (ANNOUNCE, QUERY, REPLY, REPORT, aquery, attribute_row, cut_parts,
                        monitors_channel, parse_query, reports_channel)

from .config import PLDBConfig
from .peers import BROKEN, FILLING, READY, STOPPED, MonitorInfo, PeerTable, parse_announcement
from .store import TupleStore

log = logging.getLogger("psepr.pldb.monitor")


def monitor_root(channel: "str | Channel") -> Channel:
    """The channel a monitor may keep: any below the root (a monitor belongs to an
    authority).

    Raises:
        ChannelError: not a channel.  UsageError: the root.
    """
    root = parse(channel)
    if root.is_root:
        raise psepr.UsageError("a monitor needs a channel below the root, e.g. /example.com/node/")
    return root


def database_path(data_dir: "str | Path", root: Channel) -> Path:
    """Where the monitor of ``root`` keeps its database under ``data_dir``."""
    name = root.text.strip("/").replace("/", "~") or "_root"
    return Path(data_dir) / f"{name}.sqlite"


async def first_set(*events: asyncio.Event) -> None:
    """Return once any of ``events`` is set."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


class Monitor:
    """One monitor of one channel subtree.

    Args:
        con: an open :func:`psepr.aio.connect` connection (the monitor does not close it).
        root: the channel subtree to remember (not ``/``: a monitor belongs to an authority).
        store: where the tuples live.
        host: the host name announced (supervisors place replicas by host).
        config: timings and limits.
        id: the monitor id; a fresh one by default.
        clock: wall-clock time (tuple expiry); ``mono``: monotonic time (everything else).

    Attributes:
        state: ``filling``, ``ready``, ``broken`` or ``stopped``.
        counters: ``tuples`` stored, ``bad`` inputs dropped, ``queries`` answered,
            ``lost`` tuples a broken database could not take.  Tuples dropped
            at a full queue (the monitor too slow for its channel) are counted
            by its lease, announced as ``dropped`` and reported as ``overflow``.
    """

    def __init__(self, con, root: "str | Channel", store: TupleStore, *, host: str,
                 config: PLDBConfig | None = None, id: str | None = None,
                 clock=time.time, mono=time.monotonic) -> None:
        self.con = con
        self.root = monitor_root(root)
        self.store = store
        self.host = host
        self.config = config or PLDBConfig()
        self.id = id or f"{host}~{secrets.token_hex(3)}"
        self.state = FILLING
        self.peers = PeerTable()
        self.counters = {"tuples": 0, "bad": 0, "queries": 0, "lost": 0}
        self._clock, self._mono = clock, mono
        self._tasks: list[asyncio.Task] = []
        self._leases: list = []
        self._attr_lease = None       # set by start()
        self._ready = asyncio.Event()
        self._reported_at = -1e9
        self._retry_at = 0.0
        self._unreported = 0
        self._latest = 0
        self._dirty = False           # tuples stored since _latest was counted
        self._recovering = False      # a write succeeded while broken
        self._rows: list[tuple] = []  # attribute rows waiting for their commit
        self._commit_at = 0.0
        self.failed: BaseException | None = None  # why a task of it ended on its own
        self.ended = asyncio.Event()  # set once stopped (asked, or after a failure)
        self._stopping: asyncio.Task | None = None  # a stop after a failure (asyncio
                                                    # keeps only weak references to tasks)
        self._dropped_told = 0        # queue drops already reported
        self._fill_task: asyncio.Task | None = None

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Lease, then start filling from peers in the background (see :meth:`wait_ready`).

        Raises:
            AccessDenied, TimeoutError: a lease was refused or not granted.
        """
        con, authority = self.con, self.root.authority
        self._mon_lease = await con.lease(monitors_channel(authority), type=ANNOUNCE, id="pldb-peers")
        self._attr_lease = await con.lease(self.root, type=psepr.ATTRIBUTE, id="pldb-tuples",
                                           propagated=True, timeout=10.0)
        self._query_lease = await con.lease(self.root, type=QUERY, id="pldb-queries",
                                            propagated=True, timeout=10.0)
        self._leases = [self._mon_lease, self._attr_lease, self._query_lease]
        self._latest = self._count_latest()
        self._tasks = [asyncio.create_task(coro, name=f"pldb-{name}-{self.id}") for name, coro in (
            ("hear", self._hear()), ("ingest", self._ingest()), ("answer", self._answer()),
            ("tick", self._tick()))]
        for t in self._tasks:
            t.add_done_callback(self._task_ended)
        await self._announce()
        self._start_fill("fill")
        log.info("monitor %s of %s started (database %s)", self.id, self.root.text, self.store.path)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the monitor answers queries (filled from its peers).

        Raises:
            TimeoutError: not ready in time.
            PseprError: it stopped first (:attr:`failed` says why, if it failed).
        """
        try:
            await asyncio.wait_for(first_set(self._ready, self.ended), timeout)
        except asyncio.TimeoutError:
            raise psepr.TimeoutError(f"monitor {self.id} not ready within {timeout} s") from None
        if not self._ready.is_set():
            raise PseprError(f"monitor {self.id} stopped before it was ready"
                             + (f": {self.failed!r}" if self.failed is not None else ""))

    def _start_fill(self, name: str) -> None:
        self._fill_task = asyncio.create_task(self._fill(), name=f"pldb-{name}-{self.id}")
        self._fill_task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task) -> None:
        """A task ended.  Unless it was stopped (or was the fill, done), the monitor
        is no longer whole: one that stopped storing or answering must not go on
        announcing itself ``ready``.  It says why, stops (announcing ``stopped``)
        and sets :attr:`failed`; its runner exits, or its supervisor starts another."""
        if task.cancelled() or self.state == STOPPED or self.failed is not None:
            return
        exc = task.exception()
        if exc is None and task is self._fill_task:
            return
        self.failed = exc or PseprError(f"its task {task.get_name()} ended (connection closed?)")
        log.error("monitor %s of %s: task %s failed: %r; stopping the monitor", self.id,
                  self.root.text, task.get_name(), self.failed, exc_info=exc)
        self._stopping = asyncio.get_running_loop().create_task(self._stop_failed())

    async def _stop_failed(self) -> None:
        try:
            await self.stop()
        except Exception:     # the failure may strike again on the way out: say so
            log.exception("monitor %s: stopping it after the failure failed too", self.id)

    async def stop(self) -> None:
        """Say ``stopped``, release the leases, close the database.  Idempotent."""
        if self.state == STOPPED:
            return
        self.state = STOPPED
        tasks = self._tasks + ([self._fill_task] if self._fill_task else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            if self._leases:
                self._store_waiting(commit=True)      # what was received is kept
            try:
                await self._announce()
                for lease in self._leases:
                    await lease.release(timeout=2.0)
            except PseprError as exc:
                log.warning("monitor %s: could not say goodbye: %s", self.id, exc)
        finally:
            # Whatever happened, the file is released: its lock would otherwise keep
            # the next monitor of this root (a supervisor's restart) out.
            self.store.close()
            self.ended.set()
        log.info("monitor %s of %s stopped", self.id, self.root.text)

    def info(self) -> MonitorInfo:
        """This monitor as its announcement describes it."""
        return MonitorInfo(self.id, self.host, self.root, self.state, self._latest,
                           self._mono() + self.config.announce_ttl, self.counters["tuples"],
                           self._dropped())

    def _dropped(self) -> int:
        """Tuples lost before this monitor saw them: its queue was full (it is too slow)."""
        return 0 if self._attr_lease is None else self._attr_lease.dropped

    # -- filling ------------------------------------------------------------------------------------
    async def _fill(self) -> None:
        """Copy every version the ready peers hold, then become ready."""
        cfg = self.config
        await asyncio.sleep(cfg.fill_wait)
        peers = [m for m in self.peers.ready_covering(self.root) if m.id != self.id]
        copied = 0
        if peers:
            started = self._mono()
            try:
                tuples = await aquery(self.con, self.root, history=True,
                                      timeout=cfg.fill_timeout, settle=cfg.fill_timeout / 4)
                _, error = self._store_waiting(commit=True)   # live rows first: merge sees them
                if error is not None:
                    raise error
                copied = self.store.merge(tuples)
                self._latest = self._count_latest()
                log.info("monitor %s filled %d versions from %d peer(s) in %.2f s", self.id,
                         copied, len(peers), self._mono() - started)
            except StorageError as exc:
                await self._broken(exc)
                return
            except PseprError as exc:      # NoMonitor: the peers died meanwhile
                await self._report("fill-failed", f"could not fill from peers "
                                   f"{', '.join(m.id for m in peers)}: {exc}", force=True)
        if self.state == FILLING:        # not broken meanwhile
            self.state = READY
            self._ready.set()
            await self._announce()

    # -- tasks --------------------------------------------------------------------------------------
    async def _hear(self) -> None:
        async for ev in self._mon_lease:
            try:
                self.peers.heard(parse_announcement(ev.payload, self._mono()))
            except EventError as exc:
                await self._report("bad-announcement", f"event {ev.id} from {ev.from_service}: {exc}")

    async def _ingest(self) -> None:
        lease = self._attr_lease
        while True:
            if not self._rows:
                first = await lease.receive()
            else:                   # rows wait for their commit: not longer than commit_every
                wait = self._commit_at - self._mono()
                try:
                    first = await lease.receive(timeout=wait) if wait > 0 else None
                except psepr.TimeoutError:
                    first = None
            # At most one batch per turn: the connection's reader runs in between.
            await self._after_store(*self._store_waiting(first, commit=first is None,
                                                         limit=self.config.batch))

    def _store_waiting(self, first=None, commit: bool = True,
                       limit: int | None = None) -> tuple[list, StorageError | None]:
        """Take ``first`` and every attribute event already waiting; commit when due.

        Rows are committed together (group commit): when ``commit`` is asked,
        when ``batch`` rows wait, or ``commit_every`` after the oldest arrived.
        No ``await`` inside: a query, which asks for the commit, sees every
        tuple that reached this connection before it.

        Args:
            first: an event already taken from the lease.
            commit: commit whatever waits, now.
            limit: take at most this many waiting events (None: all of them).

        Returns:
            ``(bad, error)``: the refused events with their errors, and the
            storage failure if the write failed.
        """
        events = ([] if first is None else [first]) + self._attr_lease.take(limit)
        rows, bad = self._rows, []
        if events:
            if not rows:
                self._commit_at = self._mono() + self.config.commit_every
            max_bytes, ahead = self.config.max_value_bytes, self.config.max_clock_ahead
            now = self._clock()
            for ev in events:
                try:
                    rows.append(attribute_row(ev, max_bytes, now, ahead))
                except EventError as exc:
                    bad.append((ev, exc))
            self.counters["bad"] += len(bad)
        if not rows or not (commit or len(rows) >= self.config.batch
                            or self._mono() >= self._commit_at):
            return bad, None
        self._rows = []
        if self.state == BROKEN and self._mono() < self._retry_at:
            self.counters["lost"] += len(rows)
            return bad, None
        try:
            for i in range(0, len(rows), self.config.batch):
                self.store.apply_rows(rows[i:i + self.config.batch])
        except StorageError as exc:
            self.counters["lost"] += len(rows)
            return bad, exc
        self.counters["tuples"] += len(rows)
        self._dirty = True
        if self.state == BROKEN:
            self._recovering = True    # writable again: _after_store refills
        return bad, None

    async def _after_store(self, bad: list, error: StorageError | None) -> None:
        """Report what :meth:`_store_waiting` refused, and storage trouble or recovery."""
        for ev, exc in bad:
            await self._report("bad-tuple", f"event {ev.id} on {ev.channel.text} from "
                               f"{ev.from_service}/{ev.from_instance}: {exc}")
        if error is not None:
            await self._broken(error)
        elif self._recovering:
            self._recovering = False
            await self._recovered()

    async def _answer(self) -> None:
        async for ev in self._query_lease:
            if self.state != READY:
                continue          # not filled (or broken): the asker hears the ready ones
            if ev.reply_to is None:
                self.counters["bad"] += 1
                await self._report("bad-query", f"query {ev.id} from {ev.from_service} has no "
                                   "reply_to channel (send it with request, not send)")
                continue
            stored = self._store_waiting()     # tuples that came before the query count
            try:
                q = parse_query(ev)
                rows = [t.row() for t in self.store.query(q, self._clock())]
            except (EventError, StorageError) as exc:
                await self._after_store(*stored)
                self.counters["bad"] += isinstance(exc, EventError)
                await self.con.reply(ev, {"monitor": self.id, "error": str(exc)}, type=REPLY)
                continue
            await self._after_store(*stored)
            peers = [m.id for m in self.peers.ready_covering(q.channel) if m.id != self.id]
            parts = cut_parts(rows)
            for i, part in enumerate(parts):
                await self.con.reply(ev, {"monitor": self.id, "root": self.root.text, "part": i,
                                          "last": i == len(parts) - 1, "peers": peers,
                                          "tuples": part}, type=REPLY)
            self.counters["queries"] += 1

    async def _tick(self) -> None:
        cfg = self.config
        next_maintain = self._mono() + cfg.maintain_every
        while True:
            await asyncio.sleep(cfg.announce_every)
            self.peers.expire(self._mono())
            if self._mono() >= next_maintain and self.state != BROKEN:
                next_maintain = self._mono() + cfg.maintain_every
                try:
                    self.store.purge(self._clock())
                    self.store.checkpoint()
                    self.store.trim()
                    self._latest = self._count_latest()
                except StorageError as exc:
                    await self._broken(exc)
            elif self._dirty:
                self._latest = self._count_latest()
            dropped = self._dropped()
            if dropped > self._dropped_told:
                await self._report("overflow", f"{dropped - self._dropped_told} tuples dropped "
                                   f"at a full queue ({dropped} in all): this monitor cannot keep "
                                   f"up with {self.root.text}")
                self._dropped_told = dropped
            await self._announce()

    # -- storage trouble ----------------------------------------------------------------------------
    async def _broken(self, exc: StorageError) -> None:
        self._retry_at = self._mono() + self.config.retry_storage
        if self.state != BROKEN:
            self.state = BROKEN
            self._ready.clear()
            log.error("monitor %s: %s", self.id, exc)
            await self._announce()
        await self._report("storage", str(exc), force=True)

    async def _recovered(self) -> None:
        log.warning("monitor %s: database writable again; refilling from peers", self.id)
        self.state = FILLING
        await self._announce()
        self._start_fill("refill")

    def _count_latest(self) -> int:
        self._dirty = False
        return len(self.store)

    # -- speaking -----------------------------------------------------------------------------------
    async def _announce(self) -> None:
        info = self.info()
        self.peers.heard(info)
        await self.con.send(monitors_channel(self.root.authority),
                            info.announcement(self.config.announce_ttl), type=ANNOUNCE)

    async def _report(self, kind: str, detail: str, force: bool = False) -> None:
        """Publish a report, at most one per ``report_every`` unless ``force``."""
        now = self._mono()
        if not force and now - self._reported_at < self.config.report_every:
            self._unreported += 1
            return
        log.warning("monitor %s: %s: %s", self.id, kind, detail)
        payload: dict[str, Any] = {"monitor": self.id, "host": self.host, "root": self.root.text,
                                   "kind": kind, "detail": detail, "state": self.state,
                                   "suppressed": self._unreported, "counters": dict(self.counters)}
        self._reported_at, self._unreported = now, 0
        await self.con.send(reports_channel(self.root.authority), payload, type=REPORT)


def connect(routers, config: PLDBConfig, preset: str = "lan", **kwargs):
    """An asyncio connection for a monitor: the ``preset``'s client settings, with a
    lease queue of ``config.queue`` events (a monitor that falls behind drops and
    reports, rather than buffering without end).

    Args:
        routers: router URL(s), as for :func:`psepr.connect`.
        config: the PLDB settings.
        preset: the client preset.
        kwargs: more :func:`psepr.aio.connect` arguments (service, keys).

    Returns:
        The (awaitable) connection.
    """
    from psepr.config import ClientConfig
    return psepr.aio.connect(routers, config=ClientConfig.preset(preset, lease_queue=config.queue),
                             **kwargs)
