"""Failure detection, the pure core: heartbeat records, two detectors, a health guard.

Theory of operation
-------------------
Every node's agent sends a heartbeat on ``/<authority>/farm/heartbeat/<host>/``
each ``t_gossip`` seconds: ``(incarnation, counter)``.  The counter grows with
every beat; the incarnation grows when the node restarts or refutes a
suspicion.  A detector leases the whole heartbeat subtree, so the overlay
carries each beat once per node per period and replicates it only where a
detector listens (explicit replication): traffic is O(N), never N-1 unicasts.

:class:`DetectorCore` keeps one :class:`NodeRecord` per host and decides,
on each ``tick(now)``, which nodes it suspects.  Two rules are implemented,
chosen by :attr:`DetectionConfig.method`:

* ``gossip`` -- van Renesse, Minsky and Hayden's counter detector: a node
  whose ``(incarnation, counter)`` has not grown for ``t_fail`` seconds is
  suspected; a record that stayed suspected (or left) for ``t_cleanup`` is
  forgotten, so that a node that comes back is a new member.
* ``phi`` -- Hayashibara's accrual detector: the inter-arrival times of a
  node's beats (a sliding window) give a normal distribution; the suspicion
  level ``phi = -log10(P(a beat comes later than now))`` grows continuously
  with the silence, and the node is suspected once ``phi > phi_threshold``.
  ``t_fail`` is still the hard limit (a node never heard twice has no
  distribution yet).

A detector that is itself starved (its event loop late, its own events slow to
come back through the overlay) would accuse everybody at once.  Following
Lifeguard, :class:`HealthGuard` keeps a *local health score*: every late tick
or late self-probe adds one (up to ``max_health``), every ``recover_after``
seconds without trouble takes one away.  All timeouts are stretched by
``1 + score`` while the score is above zero, and a detector with a non-zero
score says so in its opinion; the agreement layer
(:mod:`services.membership`) does not count the votes of unhealthy detectors.

Everything here is pure: no clock, no sockets; callers pass ``now``
(monotonic seconds).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

from psepr.errors import ConfigError

#: Node states as a detector sees them (the view adds ``failed``).
ALIVE, SUSPECT, LEFT = "alive", "suspect", "left"


@dataclass(frozen=True)
class DetectionConfig:
    """Timings of heartbeats, detectors and the health guard.

    Attributes:
        t_gossip: seconds between a node's heartbeats.  Traffic is one event of
            about 150 bytes per node per period, times the number of detectors.
        t_fail: seconds without a new heartbeat before a detector suspects the
            node (``gossip``), or the hard limit for ``phi``.  ``t_fail /
            t_gossip`` beats in a row must be lost or late for a false
            suspicion.
        t_cleanup: seconds a suspected or departed node's record is kept before
            it is forgotten (and dropped from the view once failed or left).
        method: ``gossip`` (counter, fixed timeout) or ``phi`` (accrual).
        phi_threshold: ``phi`` above which a node is suspected: the detector
            accepts a false suspicion probability of ``10 ** -phi_threshold`` per
            check when beats follow the measured distribution.
        phi_window: inter-arrival samples kept per node.
        phi_pause: an acceptable pause (seconds) added to the mean interval before
            the distribution is consulted (as Akka's detector does): a stall of a
            few hundred milliseconds (a GC, a busy machine) is normal, and a
            distribution fitted to very regular beats would call it fatal.
        phi_min_std: floor of the distribution's standard deviation (seconds):
            perfectly regular beats would otherwise make any jitter look fatal.
        tick: seconds between a detector's decisions (and health measurements).
        lag_limit: a tick this much later than scheduled is a health problem.
        probe_limit: the detector's own opinion must come back through the
            overlay within this; a slower echo is a health problem.
        max_health: the highest local health score (timeouts stretch up to
            ``1 + max_health`` times).
        recover_after: seconds without trouble that lower the score by one.
        detector_ttl: an opinion older than this means its detector is gone.
        view_refresh: seconds between re-publications of an unchanged view.
        max_nodes: nodes a detector tracks at most; heartbeats of further new
            nodes are ignored (and the detector warns).  Opinions, views and the
            answer to ``psepr members`` are single events of at most 1 MiB: about
            53, 110 and 220 bytes per node with 27-character host names when
            every node changed at once, so the answer stops fitting at about
            4,700 nodes.  Past that, one flood of forged heartbeats (without an
            ACL anyone may send them) stopped the whole membership service.
    """

    t_gossip: float = 0.5
    t_fail: float = 2.0
    t_cleanup: float = 30.0
    method: str = "gossip"
    phi_threshold: float = 8.0
    phi_window: int = 100
    phi_pause: float = 0.3
    phi_min_std: float = 0.1
    tick: float = 0.1
    lag_limit: float = 0.25
    probe_limit: float = 0.5
    max_health: int = 8
    recover_after: float = 1.0
    detector_ttl: float = 2.0
    view_refresh: float = 5.0
    max_nodes: int = 4000

    PRESETS = {
        # One machine (tests, `psepr run`): loopback never loses a beat.
        "local": dict(t_gossip=0.2, t_fail=1.0, t_cleanup=10.0, tick=0.05, lag_limit=0.2,
                      phi_pause=0.15, phi_min_std=0.05,
                      probe_limit=0.3, detector_ttl=1.0, recover_after=0.5, view_refresh=2.0),
        # A machine room: four beats in a row lost or late before a suspicion;
        # detection within t_fail + a tick + two overlay hops (about 2.3 s).
        "lan": dict(),
        # Wide area: beats every 2 s, five may go missing; detection within ~11 s.
        "wan": dict(t_gossip=2.0, t_fail=10.0, t_cleanup=120.0, tick=0.25, lag_limit=1.0,
                    phi_pause=1.5, phi_min_std=0.5,
                    probe_limit=2.5, detector_ttl=10.0, recover_after=5.0, view_refresh=15.0),
    }

    def __post_init__(self) -> None:
        if self.method not in ("gossip", "phi"):
            raise ConfigError(f"detection method must be gossip or phi, not {self.method!r}")
        for name in ("t_gossip", "t_fail", "t_cleanup", "tick", "lag_limit", "probe_limit",
                     "recover_after", "detector_ttl", "view_refresh", "phi_min_std"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        if not (self.phi_threshold > 0 and math.isfinite(self.phi_threshold)):
            raise ConfigError(f"phi_threshold must be a positive number, "
                              f"got {self.phi_threshold!r}")
        if self.t_fail < 2 * self.t_gossip:
            raise ConfigError(f"t_fail ({self.t_fail:g} s) must be at least two heartbeat "
                              f"periods (t_gossip {self.t_gossip:g} s)")
        if self.t_cleanup < self.t_fail:
            raise ConfigError(f"t_cleanup ({self.t_cleanup:g} s) must not be shorter than "
                              f"t_fail ({self.t_fail:g} s)")
        if not (self.phi_pause >= 0 and math.isfinite(self.phi_pause)):
            raise ConfigError(f"phi_pause must be a number of seconds >= 0, got {self.phi_pause!r}")
        if self.phi_window < 2 or self.max_health < 0:
            raise ConfigError("phi_window must be at least 2 and max_health at least 0")
        if type(self.max_nodes) is not int or self.max_nodes < 1:
            raise ConfigError(f"max_nodes must be a positive whole number, got {self.max_nodes!r}")

    @classmethod
    def preset(cls, preset: str, /, **overrides) -> "DetectionConfig":
        """A configuration from a named preset with overrides.

        Raises:
            ConfigError: unknown preset or inconsistent values.
        """
        try:
            base = cls.PRESETS[preset]
        except KeyError:
            raise ConfigError(f"unknown detection preset {preset!r}; choose from "
                              f"{', '.join(cls.PRESETS)}") from None
        return cls(**{**base, **overrides})

    def replace(self, **changes) -> "DetectionConfig":
        return dataclasses.replace(self, **changes)


class NodeRecord:
    """What one detector knows about one node."""

    __slots__ = ("host", "incarnation", "counter", "state", "heard", "since", "intervals")

    def __init__(self, host: str, incarnation: int, counter: int, now: float,
                 window: int) -> None:
        self.host = host
        self.incarnation = incarnation
        self.counter = counter
        self.state = ALIVE
        self.heard = now          # when (incarnation, counter) last grew
        self.since = now          # when the state last changed
        self.intervals: deque[float] = deque(maxlen=window)

    def phi(self, now: float, min_std: float, pause: float = 0.0) -> float:
        """The accrual suspicion level after ``now - heard`` seconds of silence
        (``pause`` seconds of it are forgiven)."""
        if len(self.intervals) < 2:
            return 0.0
        n = len(self.intervals)
        mean = sum(self.intervals) / n
        var = sum((x - mean) ** 2 for x in self.intervals) / n
        std = max(math.sqrt(var), min_std)
        # P(next beat later than t) under N(mean, std): 0.5 * erfc((t - mean) / (std*sqrt2)).
        p_later = 0.5 * math.erfc((now - self.heard - pause - mean) / (std * math.sqrt(2.0)))
        return math.inf if p_later <= 0.0 else -math.log10(p_later)


class HealthGuard:
    """Lifeguard's local health score: a starved detector doubts itself first.

    Args:
        config: ``lag_limit``, ``probe_limit``, ``max_health``, ``recover_after``.
        now: the current monotonic time.
    """

    def __init__(self, config: DetectionConfig, now: float) -> None:
        self.config = config
        self.score = 0
        self.late_ticks = 0        # ticks later than lag_limit, ever
        self.late_probes = 0       # self-probes slower than probe_limit, ever
        self.worst_lag = 0.0
        self._calm_since = now

    @property
    def stretch(self) -> float:
        """The factor all timeouts are multiplied by now."""
        return 1.0 + self.score

    @property
    def healthy(self) -> bool:
        return self.score == 0

    def tick(self, now: float, scheduled: float) -> None:
        """Record a tick that was due at ``scheduled`` and ran at ``now``."""
        lag = now - scheduled
        self.worst_lag = max(self.worst_lag, lag)
        if lag > self.config.lag_limit:
            self.late_ticks += 1
            self._trouble(now)
        else:
            self._calm(now)

    def probe(self, now: float, rtt: float | None) -> None:
        """Record a self-probe: its round trip, or None when it never came back."""
        if rtt is None or rtt > self.config.probe_limit:
            self.late_probes += 1
            self._trouble(now)

    def _trouble(self, now: float) -> None:
        self.score = min(self.config.max_health, self.score + 1)
        self._calm_since = now

    def _calm(self, now: float) -> None:
        if self.score and now - self._calm_since >= self.config.recover_after:
            self.score -= 1
            self._calm_since = now


class DetectorCore:
    """One detector's records of every node, and its suspicions.

    Args:
        config: the timings and the method.
        now: the current monotonic time.

    Attributes:
        records: host -> :class:`NodeRecord`.
        health: the :class:`HealthGuard`.
        stale: heartbeats ignored because an older incarnation or counter came late.
        refused: heartbeats of new nodes ignored because ``max_nodes`` are tracked.
    """

    def __init__(self, config: DetectionConfig, now: float) -> None:
        self.config = config
        self.records: dict[str, NodeRecord] = {}
        self.health = HealthGuard(config, now)
        self.stale = 0
        self.refused = 0

    def heartbeat(self, now: float, host: str, incarnation: int, counter: int,
                  left: bool = False) -> bool:
        """Take one heartbeat.

        Args:
            now: arrival time.
            host, incarnation, counter: from the heartbeat.
            left: the node said it is leaving (a graceful stop).

        Returns:
            True when the node's state in this detector changed (new, alive again,
            or left): the caller publishes a fresh opinion at once.
        """
        rec = self.records.get(host)
        if rec is None:
            if len(self.records) >= self.config.max_nodes:
                self.refused += 1
                return False
            rec = self.records[host] = NodeRecord(host, incarnation, counter, now,
                                                  self.config.phi_window)
            if left:
                rec.state = LEFT
            return True
        if (incarnation, counter) <= (rec.incarnation, rec.counter):
            self.stale += 1      # late or duplicated (a leaving beat counts one up too)
            return False
        if incarnation == rec.incarnation and rec.state == ALIVE:
            rec.intervals.append(now - rec.heard)
        else:
            rec.intervals.clear()      # a new incarnation (restart) starts a new rhythm
        rec.incarnation, rec.counter, rec.heard = incarnation, counter, now
        new_state = LEFT if left else ALIVE
        if rec.state != new_state:
            rec.state, rec.since = new_state, now
            return True
        return False

    def tick(self, now: float, scheduled: float) -> bool:
        """Re-decide suspicions.

        Args:
            now: the current time.
            scheduled: when this tick was due (its lateness feeds the health guard).

        Returns:
            True when some node's state changed (suspected, or forgotten).
        """
        self.health.tick(now, scheduled)
        cfg = self.config
        stretch = self.health.stretch
        t_fail = cfg.t_fail * stretch
        changed = False
        for host, rec in list(self.records.items()):
            if rec.state == ALIVE:
                silent = now - rec.heard
                if silent > t_fail or (cfg.method == "phi" and rec.phi(
                        rec.heard + silent / stretch, cfg.phi_min_std, cfg.phi_pause)
                        > cfg.phi_threshold):
                    rec.state, rec.since = SUSPECT, now
                    changed = True
            elif now - rec.since > cfg.t_cleanup:
                del self.records[host]
                changed = True
        return changed

    def opinion(self) -> dict[str, list]:
        """Every known node as ``{host: [incarnation, state]}`` (what opinions carry)."""
        return {h: [r.incarnation, r.state] for h, r in self.records.items()}

    def suspects(self) -> list[str]:
        return sorted(h for h, r in self.records.items() if r.state == SUSPECT)
