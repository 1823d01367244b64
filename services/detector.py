"""The detector process: heartbeats in, opinions out, numbered views from the leader.

Theory of operation
-------------------
A detector is an ordinary asyncio client.  It leases, under
``/<authority>/farm/``, the heartbeat subtree (type ``heartbeat``), the
detectors' subtree (type ``detector``) and the membership channel (types
``view`` and ``members``).  Three tasks run:

* *hear* feeds heartbeats to the pure :class:`~services.detection.DetectorCore`,
  opinions to :class:`~services.membership.Opinions`, views to a
  :class:`~services.membership.ViewFollower`, and answers ``members`` queries
  with the view it holds.  Bad payloads are counted and logged (rate-limited),
  never fatal.
* *tick* runs every ``tick`` seconds: the tick's lateness feeds the health
  guard, the core re-decides suspicions, the detector publishes its opinion when
  it changed (and every ``t_gossip`` regardless), and -- when it is the leader
  (:meth:`Opinions.leader`) -- computes the next view with
  :func:`~services.membership.next_view` and publishes it, followed by one
  ``membership`` event per change on ``/<authority>/farm/membership/<host>/``.
* The opinion doubles as the *self-probe*: it travels through the overlay and
  comes back on the detector's own lease; its round trip feeds the health
  guard, so a detector whose router is slow or gone doubts itself.

A detector that just started listens for ``t_fail`` seconds (and asks the
others for the current view) before it may lead, so that it continues the
existing sequence of views instead of starting a new one, and so that it has
heard every live node before it suspects any.

Names are unique.  A detector ignores its own opinions (but for the probe), so
a second one started under the same name (a copied configuration) would go
unseen while both led and numbered views of their own.  Opinions carry their
run's start time (``epoch``): ``TWIN_PROOF`` opinions under this name from
another run prove a twin alive (a run that died sends no more; one or two of
a stopped run's last opinions may still be in flight after a restart).  The
newer of the two stops with :attr:`Detector.error` set -- whoever started it is
there to read why -- and the older one logs the twin once a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from psepr.errors import ConfigError, EventError, PseprError

from .detection import DetectionConfig, DetectorCore
from .membership import (CHANGE, HEARTBEAT, OPINION, QUERY, VIEW, Heartbeat, Opinion, Opinions,
                         View, ViewFollower, detectors_channel, heartbeat_channel,
                         membership_channel, next_view)

log = logging.getLogger("psepr.detector")
#: Opinions under this detector's name from another run that prove a twin alive.
TWIN_PROOF = 3


class Detector:
    """One failure detector.

    Args:
        con: an open :func:`psepr.aio.connect` connection (not closed by the detector).
        authority: the naming authority.
        name: this detector's name (unique among detectors; the smallest live
            healthy name leads).
        config: timings and method.
        clock: monotonic time; wall: wall-clock time (view ``since`` fields).

    Attributes:
        core, opinions, follower: the pure state.
        counters: ``heartbeats``, ``bad`` payloads, ``views`` published,
            ``queries`` answered.
        error: set, with :attr:`failed`, when this detector must stop: its name is
            taken by an older live detector (see the module docstring).
    """

    def __init__(self, con, authority: str, name: str, config: DetectionConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.con = con
        self.authority = authority
        self.name = name
        self.config = cfg = config or DetectionConfig()
        self.clock, self.wall = clock, wall
        now = clock()
        self.core = DetectorCore(cfg, now)
        self.opinions = Opinions(cfg.detector_ttl)
        self.follower = ViewFollower()
        self.epoch = wall()
        self.seq = 0
        self.counters = {"heartbeats": 0, "bad": 0, "views": 0, "queries": 0}
        self.my_channel = detectors_channel(authority, name)
        self.view_channel = membership_channel(authority)
        self._started = now
        self._opinion_at = -1e9
        self._view_at = -1e9
        self._probe: tuple[int, float] | None = None      # (seq, sent at) awaiting its echo
        self._changed = True
        self._bad_logged = -1e9
        self._full_logged = -1e9        # when max_nodes was last said to be reached
        self._refused_told = 0          # core.refused when it was said
        self._catch_up: asyncio.Task | None = None
        self._led: View | None = None          # the last view this detector published
        self._unknown_since: float | None = None   # a live detector holds a view we lack
        self._fork_at: float | None = None         # when this leader first held rivals
        self._tasks: list[asyncio.Task] = []
        self._leases: list = []
        self._twins: dict[float, int] = {}      # another run's epoch -> its opinions heard
        self._twin_logged = -1e9
        self.error: ConfigError | None = None
        self.failed = asyncio.Event()

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Lease the channels and start the tasks.

        Raises:
            AccessDenied, TimeoutError: a lease was refused or not granted.
        """
        con, a = self.con, self.authority
        self._leases = [
            await con.lease(heartbeat_channel(a), type=HEARTBEAT, id="fd-heartbeats",
                            propagated=True, timeout=10.0),
            await con.lease(detectors_channel(a), type=OPINION, id="fd-opinions",
                            propagated=True, timeout=10.0),
            await con.lease(self.view_channel, type=VIEW, id="fd-views", propagated=True,
                            timeout=10.0),
            await con.lease(self.view_channel, type=QUERY, id="fd-queries", propagated=True,
                            timeout=10.0),
        ]
        self._tasks = [asyncio.create_task(self._hear(), name=f"fd-hear-{self.name}"),
                       asyncio.create_task(self._tick(), name=f"fd-tick-{self.name}")]
        self._catch_up = asyncio.create_task(self._ask_view(), name=f"fd-ask-{self.name}")
        log.info("detector %s started on /%s/farm/ (%s, t_fail %g s)", self.name, a,
                 self.config.method, self.config.t_fail)

    async def stop(self) -> None:
        """Stop the tasks and release the leases (the others see this detector age out)."""
        tasks = self._tasks + ([self._catch_up] if self._catch_up else [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for lease in self._leases:
            try:
                await lease.release(timeout=2.0)
            except PseprError:
                pass
        self._leases = []

    # -- hearing ---------------------------------------------------------------------------
    async def _hear(self) -> None:
        con = self.con
        while True:
            ev = await con.receive()
            try:
                await self._take(ev)
            except EventError as exc:
                self.counters["bad"] += 1
                now = self.clock()
                if now - self._bad_logged > 5.0:
                    self._bad_logged = now
                    log.warning("detector %s ignored a %s event from %s on %s: %s (%d so far)",
                                self.name, ev.type, ev.from_service, ev.channel.text, exc,
                                self.counters["bad"])
            except Exception:     # a bug here must not end detection; make it visible
                self.counters["bad"] += 1
                log.exception("detector %s failed on a %s event", self.name, ev.type)

    async def _take(self, ev) -> None:
        now = self.clock()
        kind = ev.type
        if kind == HEARTBEAT:
            hb = Heartbeat.parse(ev.payload)
            if ev.channel.parts[-1] != hb.host:
                raise EventError(f"heartbeat of {hb.host!r} on another host's channel")
            self.counters["heartbeats"] += 1
            if self.core.heartbeat(now, hb.host, hb.incarnation, hb.counter, hb.left):
                self._changed = True
            elif self.core.refused > self._refused_told and now - self._full_logged >= 60.0:
                self._full_logged = now
                log.warning("detector %s tracks %d nodes, its max_nodes: it ignored %d "
                            "heartbeat(s) of nodes it does not track, %s's among them (a flood "
                            "of forged hosts? an ACL limits who may send on /%s/farm/heartbeat/)",
                            self.name, len(self.core.records),
                            self.core.refused - self._refused_told, hb.host, self.authority)
                self._refused_told = self.core.refused
        elif kind == OPINION:
            op = Opinion.parse(ev.payload)
            if op.detector == self.name:
                if op.epoch != self.epoch:
                    self._heard_twin(op.epoch, now)
                elif self._probe is not None and op.seq == self._probe[0]:
                    self.core.health.probe(now, now - self._probe[1])
                    self._probe = None
                return
            self.opinions.add(op, now)
        elif kind == VIEW:
            view = View.parse(ev.payload)
            if view.leader != self.name:
                self.follower.offer(view)
        elif kind == QUERY and ev.reply_to is not None:
            self.counters["queries"] += 1
            await self.con.reply(ev, self.status())

    def _heard_twin(self, epoch: float, now: float) -> None:
        """An opinion under this name from another run (see the module docstring)."""
        if len(self._twins) > 16:           # bounded: a flood of forged epochs
            self._twins.clear()
        n = self._twins[epoch] = self._twins.get(epoch, 0) + 1
        if n < TWIN_PROOF or self.error is not None:
            return
        from psepr.cli import local_time
        if epoch < self.epoch:
            self.error = ConfigError(
                f"detector name {self.name!r} is taken by a live detector started at "
                f"{local_time(epoch)}: detector names must be unique (--name)")
            self.failed.set()
        elif now - self._twin_logged > 60.0:
            self._twin_logged = now
            log.error("detector %s: another detector named %s started at %s is running: "
                      "detector names must be unique (--name); the newer one stops",
                      self.name, self.name, local_time(epoch))

    def status(self) -> dict:
        """What a ``members`` query gets: this detector's view and its standing, the
        last view it published itself, and the rival views it holds (after a partition
        these differ from ``view``)."""
        now = self.clock()
        stretch = self.core.health.stretch
        return {"detector": self.name, "healthy": self.core.health.healthy,
                "health": self.core.health.score,
                "leader": self.opinions.leader(now, stretch),
                "detectors": [op.detector for op in self.opinions.live(now, stretch)],
                "view": self.follower.view.payload(),
                "led": self._led.payload() if self._led is not None else None,
                "rivals": [v.payload() for v in self.follower.rivals.values()]}

    async def _ask_view(self) -> None:
        """Ask the other detectors for the current view (at start, or when behind).

        Each answer's view is followed if newer, and its rivals become ours.  Its
        ``led`` is then known either way: a fork's last view is the answerer's view
        or one of its rivals; any other led view is an old view of this sequence.
        """
        try:
            replies = await self.con.request_all(self.view_channel, {"detector": self.name},
                                                 type=QUERY, timeout=self.config.t_fail,
                                                 settle=self.config.tick * 4)
        except PseprError as exc:
            log.warning("detector %s: asking for the current view failed: %s", self.name, exc)
            return
        for r in replies:
            payload = r.payload if isinstance(r.payload, dict) else {}
            rivals = payload.get("rivals")
            try:
                views = [View.parse(payload.get("view"))]
                views += [View.parse(v) for v in (rivals if isinstance(rivals, list) else [])]
                led = View.parse(payload["led"]) if payload.get("led") is not None else None
            except EventError:
                self.counters["bad"] += 1
                continue
            for view in views:
                self.follower.offer(view)
            if led is not None and led.id not in {v.id for v in views}:
                self.follower.settled(led.id)

    # -- ticking ---------------------------------------------------------------------------
    async def _tick(self) -> None:
        cfg = self.config
        scheduled = self.clock()
        while True:
            scheduled += cfg.tick
            now = self.clock()
            if scheduled < now - cfg.tick:
                scheduled = now          # far behind: do not burst to catch up
            await asyncio.sleep(max(0.0, scheduled - now))
            try:
                await self._decide(self.clock(), scheduled)
            except PseprError as exc:
                log.warning("detector %s: %s", self.name, exc)

    async def _decide(self, now: float, scheduled: float) -> None:
        cfg = self.config
        core = self.core
        if core.tick(now, scheduled):
            self._changed = True
        if self._probe is not None and now - self._probe[1] > cfg.probe_limit:
            core.health.probe(now, None)
            self._probe = None
        if self._changed or now - self._opinion_at >= cfg.t_gossip:
            await self._publish_opinion(now)
        await self._lead(now)

    async def _publish_opinion(self, now: float) -> None:
        self.seq += 1
        health = self.core.health
        view = self.follower.view
        op = Opinion(self.name, self.epoch, self.seq, health.healthy, health.score,
                     view.number, self.core.opinion(), view.leader,
                     self._led.number if self._led is not None else 0)
        self.opinions.add(op, now)
        self._changed = False
        self._opinion_at = now
        if self._probe is None:
            self._probe = (self.seq, now)
        await self.con.send(self.my_channel, op.payload(), type=OPINION)

    async def _lead(self, now: float) -> None:
        cfg = self.config
        stretch = self.core.health.stretch
        if (now - self._started < cfg.t_fail
                or self.opinions.leader(now, stretch) != self.name):
            self._fork_at = None          # a leader again later waits afresh
            return
        live = self.opinions.live(now, stretch)
        current = self.follower.view
        # Views some live detector holds, or published itself during a partition,
        # that we never saw: fetch them (up to t_fail) so the next view reconciles.
        rivals = {v.id for v in self.follower.rivals.values()}
        known = self.follower.known
        if any(((op.view, op.view_by) not in rivals and not known(op.view, op.view_by))
               or (op.detector != self.name and (op.led, op.detector) not in rivals
                   and not known(op.led, op.detector)) for op in live):
            if self._catch_up is None or self._catch_up.done():
                self._catch_up = asyncio.create_task(self._ask_view())
            if self._unknown_since is None:
                self._unknown_since = now
            if now - self._unknown_since < cfg.t_fail:
                return
        self._unknown_since = None
        # A fork means a partition just healed: the opinions at hand were formed
        # while it lasted (a detector still suspects a node whose beats were cut
        # off).  Reconcile with opinions heard two beats after the fork was seen
        # (a beat to arrive, one for the opinion; at most t_fail later), or a
        # node one side had failed would be reported "suspect", not "recovered".
        if self.follower.rivals:
            if self._fork_at is None:
                self._fork_at = now
            if (now - self._fork_at < cfg.t_fail
                    and not self.opinions.heard_since(self._fork_at + 2 * cfg.t_gossip, now,
                                                  stretch)):
                return
        self._fork_at = None
        view = next_view(current, live, self.name, self.wall(), cfg.t_cleanup,
                         self.follower.rivals.values())
        if view is not current:
            self.follower.offer(view)      # it merged every rival: they are settled
            self.counters["views"] += 1
            await self._publish_view(view, changes=True)
            self._view_at = now
        elif now - self._view_at >= cfg.view_refresh and current.number:
            await self._publish_view(current, changes=False)
            self._view_at = now

    async def _publish_view(self, view: View, changes: bool) -> None:
        self._led = view
        con = self.con
        await con.send(self.view_channel, view.payload(), type=VIEW)
        if changes:
            for host, event in view.changes:
                log.info("view %d: %s %s", view.number, host, event)
                await con.send(membership_channel(self.authority, host),
                               view.change_payload(host, event), type=CHANGE)


async def serve(args) -> int:
    """Run one detector until cancelled (SIGTERM/SIGINT in :func:`main`)."""
    config = DetectionConfig.preset(args.preset, **({"method": args.method}
                                                     if args.method else {}))
    import psepr.aio
    async with psepr.aio.connect(args.router, preset=args.preset,
                                 service=args.service or "detector",
                                 keyfile=args.key, server_key=args.server_key) as con:
        det = Detector(con, args.authority, args.name, config)
        await det.start()
        print(f"detector {args.name} on /{args.authority}/farm/ ({config.method}, "
              f"t_gossip {config.t_gossip:g} s, t_fail {config.t_fail:g} s) (ready)",
              flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        import signal
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(det.failed.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            await det.stop()
        if det.error is not None:
            raise det.error
    return 0


def main(args) -> int:
    """``psepr detector``: run a failure detector until SIGTERM/SIGINT.

    Raises:
        UsageError, ConfigError: bad arguments; PseprError: no router.
    """
    membership_channel(args.authority)           # a bad authority fails before connecting
    return asyncio.run(serve(args))
