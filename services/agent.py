"""The node agent: heartbeats (and sensors) for one host, or several simulated ones.

Theory of operation
-------------------
``psepr agent`` runs on every host.  For each of its hosts a
:class:`Heartbeater` (pure: no clock, no I/O) keeps the node's
``(incarnation, counter)``: the incarnation starts at the wall-clock
millisecond of the start, so a restarted node is always newer than it was; the
counter grows by one per beat.  The shell (:class:`Agent`) sends a beat on
``/<authority>/farm/heartbeat/<host>/`` every ``t_gossip`` seconds on a fixed
grid, and leases ``/<authority>/farm/membership/<host>/`` (type
``membership``): when a view calls the node ``suspect`` or ``failed`` at its
current incarnation (or later), the node is alive to hear it, so it *refutes*
-- the incarnation becomes one more than the accused one and a beat leaves at
once (SWIM's rule: the suspicion of an old incarnation is void).  A graceful
stop (SIGTERM, SIGINT) sends a last beat with state ``left``.

The agent also runs the node sensors (:mod:`services.sensors`) of its host in a
thread of their own on the same connection, unless told not to; a process
simulating many hosts (``--host`` repeated) normally runs without them.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Callable, Iterable

from psepr.errors import ConnectionLost, PseprError
from psepr.errors import TimeoutError as PseprTimeout

from .detection import DetectionConfig
from .membership import (CHANGE, FAILED, HEARTBEAT, MAX_COUNT, SUSPECT, Heartbeat,
                         heartbeat_channel, membership_channel)

log = logging.getLogger("psepr.agent")


class Heartbeater:
    """One node's heartbeat state (pure).

    Args:
        host: the node's name.
        period: seconds between beats.
        incarnation: the starting incarnation (the shell passes wall-clock ms).
        now: the current monotonic time; the first beat is due at once.
    """

    def __init__(self, host: str, period: float, incarnation: int, now: float) -> None:
        self.host = host
        self.period = period
        self.incarnation = incarnation
        self.counter = 0
        self.next_at = now
        self.refutations = 0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def beat(self, now: float, left: bool = False) -> Heartbeat:
        """The next beat; schedules the one after on the grid (no drift, no burst)."""
        self.counter += 1
        self.next_at += self.period
        if self.next_at <= now:
            self.next_at = now + self.period
        return Heartbeat(self.host, self.incarnation, self.counter, self.period, left)

    def accused(self, state: str, incarnation: int, now: float) -> bool:
        """A view said this node is ``state`` at ``incarnation``.

        Returns:
            True when that is a suspicion or failure of the current incarnation (or
            a later one, after a restart raced it): the incarnation is raised past
            it and a beat is due at once.
        """
        if state not in (SUSPECT, FAILED) or incarnation < self.incarnation:
            return False
        self.incarnation = incarnation + 1
        self.next_at = now
        self.refutations += 1
        return True


class Agent:
    """Heartbeats for one or more hosts on one connection.

    Args:
        con: a synchronous :class:`psepr.Connection`.
        authority: the naming authority.
        hosts: the node names (several simulate several hosts).
        period: seconds between beats (the preset's ``t_gossip``).
        clock: monotonic clock; wall: wall clock (incarnations).

    Raises:
        ChannelError: a host or the authority makes no valid channel.
    """

    def __init__(self, con, authority: str, hosts: Iterable[str],
                 period: float = DetectionConfig.t_gossip,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.con = con
        self.clock = clock
        now = clock()
        start = int(wall() * 1000)
        self.beaters = {h: Heartbeater(h, period, start, now) for h in hosts}
        self.channels = {h: heartbeat_channel(authority, h) for h in self.beaters}
        self.watch = {h: membership_channel(authority, h) for h in self.beaters}
        self.sent = 0
        self.bad = 0

    def lease(self) -> None:
        """Lease every host's membership channel (to hear accusations)."""
        for ch in self.watch.values():
            self.con.lease(ch, type=CHANGE, duration=3600)

    def _send(self, b: Heartbeater, now: float, left: bool = False) -> None:
        self.con.send(self.channels[b.host], b.beat(now, left).payload(), type=HEARTBEAT)
        self.sent += 1

    def step(self, now: float) -> float:
        """Send every beat that is due.

        Returns:
            The time the next beat is due.
        """
        for b in self.beaters.values():
            if b.due(now):
                self._send(b, now)
        return min(b.next_at for b in self.beaters.values())

    def hear(self, payload, now: float) -> None:
        """Take one membership event about one of our hosts; refute if accused."""
        b = self.beaters.get(payload.get("host")) if isinstance(payload, dict) else None
        inc = payload.get("incarnation") if b is not None else None
        if b is None or not isinstance(inc, int) or isinstance(inc, bool) \
                or not 0 <= inc < MAX_COUNT:
            # Out of range: refuting it would take an incarnation no detector (nor
            # JSON) takes, and the beats that carry it could not be sent at all.
            self.bad += 1
            log.warning("ignored a membership event for no host of ours, or without an "
                        "incarnation below 2**53 - 1: %.200r", payload)
            return
        if b.accused(payload.get("state"), inc, now):
            log.warning("%s was called %s at incarnation %d; refuting with incarnation %d",
                        b.host, payload.get("state"), inc, b.incarnation)

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        """Beat and listen until ``stop`` is set; then say ``left`` for every host.

        Raises:
            RemoteError: the router refused the beats (e.g. AccessDenied).
        """
        self.lease()
        next_at = self.step(self.clock())
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            wait = max(0.0, min(next_at - self.clock(), 0.25))   # 0.25: notice stop
            try:
                ev = self.con.receive(timeout=wait)
                self.hear(ev.payload, self.clock())
            except PseprTimeout:
                pass
            except ConnectionLost as exc:
                log.warning("agent: %s (the SDK reconnects)", exc)
            next_at = self.step(self.clock())
        self.leave()

    def leave(self) -> None:
        """Send a ``left`` beat for every host and hand them to the router."""
        now = self.clock()
        for b in self.beaters.values():
            self._send(b, now, left=True)
        try:
            self.con.flush(timeout=2.0)
        except PseprError as exc:
            log.warning("agent: the left beats may be lost: %s", exc)


def main(args) -> int:
    """``psepr agent``: heartbeats (and sensors) until SIGTERM/SIGINT.

    Returns:
        0 after a graceful stop (``left`` sent).

    Raises:
        UsageError: a host or authority that makes no channel, a bad preset.
        PseprError: no router, or the router refused the events.
    """
    import psepr
    from .sensors import SensorConfig, Sensors

    period = args.period or DetectionConfig.preset(args.preset).t_gossip
    hosts = args.host or [__import__("socket").gethostname()]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    threads = []
    try:
        with psepr.connect(args.router, preset=args.preset, service=args.service or "agent",
                           keyfile=args.key, server_key=args.server_key) as con:
            agent = Agent(con, args.authority, hosts, period)
            if not args.no_sensors:
                for h in hosts:
                    sensors = Sensors(con, args.authority, h, SensorConfig.preset(args.preset))
                    t = threading.Thread(target=sensors.run, args=(stop,), daemon=True,
                                         name=f"sensors-{h}")
                    t.start()
                    threads.append(t)

            def ready() -> None:
                what = "" if args.no_sensors else " and sensors"
                names = hosts[0] if len(hosts) == 1 else f"{len(hosts)} hosts"
                print(f"agent of {names}: heartbeats{what} on "
                      f"/{args.authority}/farm/heartbeat/ every {period:g} s (ready)",
                      flush=True)
            agent.run(stop, on_ready=ready)
            for t in threads:
                t.join(timeout=5.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
