"""Failure detection, the pure core (services/detection.py).

Everything runs on numbers: ``now`` and ``scheduled`` are passed in, nothing
sleeps and nothing touches a socket.  What is proven:

* every preset builds and is consistent; every inconsistent configuration is
  refused with a :class:`ConfigError` that names the bad field;
* :meth:`NodeRecord.phi` is Hayashibara's ``-log10(P(later))`` under the
  window's normal distribution (checked against :class:`statistics.NormalDist`);
* :class:`HealthGuard`: a late tick or probe raises the score by one (capped
  at ``max_health``), ``recover_after`` seconds of calm ticks lower it by one,
  the stretch is ``1 + score``;
* :class:`DetectorCore` with ``gossip`` suspects a silent node exactly after
  ``t_fail`` (not at ``t_fail``), for every preset; a beat after suspicion
  makes it alive again; stale or duplicated beats are ignored and counted; a
  leaving node is ``left`` and never suspected; suspected and departed records
  are forgotten strictly after ``t_cleanup``;
* with ``phi``, a very regular node is suspected well before ``t_fail`` while a
  jittery one is not suspected within its normal jitter; a new incarnation
  starts a new phi window;
* a late tick stretches every timeout in that very tick (a node silent for a
  little more than ``t_fail`` is not suspected), and the stretch decays again.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psepr.errors import ConfigError
from services.detection import (ALIVE, LEFT, SUSPECT, DetectionConfig, DetectorCore,
                                HealthGuard, NodeRecord)

LAN = DetectionConfig.preset("lan")
# The bare accrual rule (no forgiven pause, a 0.05 s deviation floor): the phi numbers in
# the tests below are computed for it.  The preset's pause has tests of its own.
PHI = LAN.replace(method="phi", phi_pause=0.0, phi_min_std=0.05)


def after(t: float) -> float:
    """The smallest float strictly greater than ``t``."""
    return math.nextafter(t, math.inf)


def beat_at(core: DetectorCore, times, host="h", incarnation=0, first_counter=1):
    """Heartbeats of ``host`` at ``times`` with growing counters; returns the last counter."""
    c = first_counter
    for t in times:
        core.heartbeat(t, host, incarnation, c)
        c += 1
    return c - 1


def on_time(core: DetectorCore, now: float) -> bool:
    """A tick that runs exactly when it was due."""
    return core.tick(now, now)


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DetectionConfig.PRESETS))
def test_every_preset_builds_and_is_consistent(name):
    c = DetectionConfig.preset(name)
    assert c.method == "gossip"
    assert c.t_fail >= 2 * c.t_gossip
    assert c.t_cleanup >= c.t_fail
    assert c.tick < c.t_gossip and c.lag_limit > 0 and c.probe_limit > 0
    assert c.detector_ttl > 0 and c.view_refresh > 0
    assert 0 <= c.phi_pause < c.t_fail and 0 < c.phi_min_std < c.t_gossip
    # Every preset accepts the phi method and a field override on top.
    p = DetectionConfig.preset(name, method="phi", t_cleanup=c.t_cleanup * 2)
    assert (p.method, p.t_cleanup, p.t_fail) == ("phi", c.t_cleanup * 2, c.t_fail)


def test_preset_values_are_the_documented_ones():
    local, lan, wan = (DetectionConfig.preset(n) for n in ("local", "lan", "wan"))
    assert lan == DetectionConfig()
    assert (local.t_gossip, local.t_fail, local.t_cleanup) == (0.2, 1.0, 10.0)
    assert (lan.t_gossip, lan.t_fail, lan.t_cleanup) == (0.5, 2.0, 30.0)
    assert (wan.t_gossip, wan.t_fail, wan.t_cleanup) == (2.0, 10.0, 120.0)
    # lan: four beats lost or late in a row before a false suspicion.
    assert lan.t_fail / lan.t_gossip == 4
    doc = DetectionConfig.__doc__
    for f in dataclasses.fields(DetectionConfig):
        assert f.name + ":" in doc, f.name


def test_configuration_is_frozen_and_replace_validates():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LAN.t_fail = 3.0
    assert LAN.replace(t_fail=3.0).t_fail == 3.0
    assert LAN.t_fail == 2.0
    with pytest.raises(ConfigError, match="t_fail"):
        LAN.replace(t_fail=0.9)


def test_unknown_preset_is_refused_with_the_choices():
    with pytest.raises(ConfigError) as exc:
        DetectionConfig.preset("moon")
    assert "moon" in str(exc.value)
    for name in ("local", "lan", "wan"):
        assert name in str(exc.value)


POSITIVE_FIELDS = ("t_gossip", "t_fail", "t_cleanup", "tick", "lag_limit", "probe_limit",
                   "recover_after", "detector_ttl", "view_refresh", "phi_min_std",
                   "phi_threshold")


@pytest.mark.parametrize("name", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
def test_a_timing_that_is_not_a_positive_finite_number_names_its_field(name, value):
    with pytest.raises(ConfigError) as exc:
        DetectionConfig(**{name: value})
    assert name in str(exc.value)


@pytest.mark.parametrize("overrides, field", [
    (dict(method="heartbeat"), "method"),
    (dict(method="PHI"), "method"),
    (dict(t_fail=0.9), "t_fail"),                      # fewer than two heartbeat periods
    (dict(t_gossip=1.5), "t_gossip"),                  # the same, from the other side
    (dict(t_cleanup=1.5), "t_cleanup"),                # shorter than t_fail
    (dict(phi_window=1), "phi_window"),
    (dict(phi_window=0), "phi_window"),
    (dict(max_health=-1), "max_health"),
])
def test_inconsistent_values_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError) as exc:
        DetectionConfig(**overrides)
    assert field in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        DetectionConfig.preset("wan" if "t_gossip" not in overrides else "lan", **overrides)
    assert field in str(exc.value)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_a_bad_phi_pause_names_its_field(value):
    with pytest.raises(ConfigError) as exc:
        DetectionConfig(phi_pause=value)
    assert "phi_pause" in str(exc.value)


def test_boundary_values_are_accepted():
    DetectionConfig(t_gossip=1.0, t_fail=2.0, t_cleanup=2.0, phi_window=2, max_health=0,
                    phi_pause=0.0)


# -- NodeRecord.phi --------------------------------------------------------------------------------

def test_phi_is_zero_until_two_intervals_are_known():
    r = NodeRecord("h", 0, 0, now=10.0, window=10)
    assert r.phi(1000.0, 0.05) == 0.0
    r.intervals.append(0.5)
    assert r.phi(1000.0, 0.05) == 0.0
    r.intervals.append(0.5)
    assert r.phi(1000.0, 0.05) == math.inf       # far beyond any normal tail: erfc underflows


@pytest.mark.parametrize("intervals, silence", [
    ([0.25, 0.75] * 5, 1.0), ([0.25, 0.75] * 5, 1.5), ([0.4, 0.5, 0.6, 0.5], 0.7),
    ([1.0, 2.0, 3.0], 2.5), ([0.5] * 4, 0.5), ([0.5] * 4, 0.55),
])
def test_phi_is_minus_log10_of_the_normal_tail(intervals, silence):
    r = NodeRecord("h", 0, 0, now=100.0, window=100)
    r.intervals.extend(intervals)
    std = max(statistics.pstdev(intervals), 0.05)
    expected = -math.log10(1.0 - statistics.NormalDist(statistics.fmean(intervals),
                                                       std).cdf(silence))
    assert r.phi(100.0 + silence, 0.05) == pytest.approx(expected, rel=1e-6)


def test_phi_at_the_mean_is_log10_2_and_grows_with_the_silence():
    r = NodeRecord("h", 0, 0, now=0.0, window=100)
    r.intervals.extend([0.5] * 10)
    assert r.phi(0.5, 0.05) == pytest.approx(math.log10(2))
    values = [r.phi(s / 100, 0.05) for s in range(0, 120)]
    assert values == sorted(values)


def test_phi_min_std_floors_a_perfectly_regular_rhythm():
    r = NodeRecord("h", 0, 0, now=0.0, window=100)
    r.intervals.extend([0.5] * 10)
    # z = (0.6 - 0.5) / std: a larger floor means a smaller phi for the same jitter.
    assert r.phi(0.6, 0.2) < r.phi(0.6, 0.05) < r.phi(0.6, 0.01)
    assert r.phi(0.6, 0.05) == pytest.approx(-math.log10(0.5 * math.erfc(2 / math.sqrt(2))))


def test_phi_pause_forgives_that_much_silence():
    r = NodeRecord("h", 0, 0, now=0.0, window=100)
    r.intervals.extend([0.25, 0.75] * 5)
    for silence in (0.5, 1.0, 1.5):
        assert r.phi(silence + 0.3, 0.05, pause=0.3) == pytest.approx(r.phi(silence, 0.05))
    assert r.phi(0.8, 0.05, pause=0.3) < r.phi(0.8, 0.05)


def test_the_phi_window_slides():
    core = DetectorCore(PHI.replace(phi_window=3), now=0.0)
    beat_at(core, [0.0, 3.0, 3.5, 4.0, 4.5])    # the 3 s gap falls out of the window
    assert list(core.records["h"].intervals) == [0.5, 0.5, 0.5]


# -- HealthGuard -----------------------------------------------------------------------------------

def test_a_fresh_guard_is_healthy_with_no_stretch():
    g = HealthGuard(LAN, now=0.0)
    assert (g.score, g.stretch, g.healthy, g.late_ticks, g.late_probes) == (0, 1.0, True, 0, 0)


def test_late_ticks_raise_the_score_and_on_time_ticks_do_not():
    g = HealthGuard(LAN, now=0.0)
    g.tick(1.25, scheduled=1.0)                   # exactly lag_limit late: still fine
    assert (g.score, g.late_ticks, g.worst_lag) == (0, 0, 0.25)
    g.tick(after(2.25), scheduled=2.0)            # a hair later than lag_limit: trouble
    assert (g.score, g.stretch, g.healthy, g.late_ticks) == (1, 2.0, False, 1)
    g.tick(3.5, scheduled=3.0)
    assert (g.score, g.stretch, g.late_ticks, g.worst_lag) == (2, 3.0, 2, 0.5)


def test_late_or_lost_probes_raise_the_score():
    g = HealthGuard(LAN, now=0.0)
    g.probe(1.0, rtt=0.5)                         # exactly probe_limit: fine
    assert (g.score, g.late_probes) == (0, 0)
    g.probe(2.0, rtt=0.75)
    assert (g.score, g.late_probes) == (1, 1)
    g.probe(3.0, rtt=None)                        # never came back
    assert (g.score, g.late_probes, g.stretch) == (2, 2, 3.0)


def test_the_score_is_capped_at_max_health():
    g = HealthGuard(LAN, now=0.0)
    for k in range(20):
        g.tick(k + 0.5, scheduled=float(k))
    assert (g.score, g.stretch, g.late_ticks) == (LAN.max_health, 1.0 + LAN.max_health, 20)
    g0 = HealthGuard(LAN.replace(max_health=0), now=0.0)
    g0.tick(5.0, scheduled=1.0)
    g0.probe(5.0, None)
    assert (g0.score, g0.healthy, g0.stretch, g0.late_ticks, g0.late_probes) == \
        (0, True, 1.0, 1, 1)


def test_the_score_decays_one_step_per_recover_after_of_calm():
    g = HealthGuard(LAN, now=0.0)                 # recover_after = 1.0
    for k in range(3):
        g.tick(10.0 + k * 0.5, scheduled=10.0 + k * 0.5 - 0.5)
    assert g.score == 3                           # last trouble at 11.0
    scores = {}
    t = 11.0
    while t < 16.0:
        t += 0.25
        g.tick(t, scheduled=t)
        scores[t] = g.score
    assert scores[11.75] == 3 and scores[12.0] == 2
    assert scores[12.75] == 2 and scores[13.0] == 1
    assert scores[13.75] == 1 and scores[14.0] == 0
    assert g.healthy and g.stretch == 1.0 and scores[15.75] == 0


def test_trouble_restarts_the_calm_period():
    g = HealthGuard(LAN, now=0.0)
    g.tick(1.5, scheduled=1.0)                    # score 1, calm since 1.5
    g.tick(2.25, scheduled=2.25)
    g.probe(2.4, rtt=None)                        # score 2, calm since 2.4
    g.tick(3.25, scheduled=3.25)                  # 0.85 s calm: not yet
    assert g.score == 2
    g.tick(3.5, scheduled=3.5)                    # 1.1 s: one step down
    assert g.score == 1
    g.tick(4.0, scheduled=4.0)                    # only 0.5 s since the last step
    assert g.score == 1
    g.tick(4.5, scheduled=4.5)
    assert g.score == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 2.0), st.floats(0.0, 1.0), st.booleans()),
                max_size=60))
def test_health_score_stays_within_bounds_and_the_stretch_follows_it(events):
    cfg = LAN.replace(max_health=4)
    g = HealthGuard(cfg, now=0.0)
    now = 0.0
    for gap, lag, is_probe in events:
        now += gap
        before = g.score
        if is_probe:
            g.probe(now, lag)
            assert g.score == (min(4, before + 1) if lag > cfg.probe_limit else before)
        else:
            g.tick(now, now - lag)
            if lag > cfg.lag_limit:
                assert g.score == min(4, before + 1)
            else:
                assert g.score in (before, max(0, before - 1))
        assert 0 <= g.score <= 4
        assert g.stretch == 1.0 + g.score and g.healthy == (g.score == 0)


# -- DetectorCore, gossip --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(DetectionConfig.PRESETS))
def test_gossip_suspects_exactly_after_t_fail_for_every_preset(name):
    cfg = DetectionConfig.preset(name)
    core = DetectorCore(cfg, now=0.0)
    assert core.heartbeat(100.0, "h", 0, 1) is True          # a new node
    t = 100.0
    while t + cfg.tick < 100.0 + cfg.t_fail:
        t += cfg.tick
        assert on_time(core, t) is False
    assert on_time(core, 100.0 + cfg.t_fail) is False         # exactly t_fail: not yet
    assert core.records["h"].state == ALIVE and core.suspects() == []
    assert on_time(core, after(100.0 + cfg.t_fail)) is True   # just after: suspected
    assert core.suspects() == ["h"]
    rec = core.records["h"]
    assert (rec.state, rec.since, rec.heard) == (SUSPECT, after(100.0 + cfg.t_fail), 100.0)
    assert core.opinion() == {"h": [0, SUSPECT]}
    assert on_time(core, 100.0 + 2 * cfg.t_fail) is False     # no news is no change


def test_regular_beats_keep_a_node_alive_indefinitely():
    core = DetectorCore(LAN, now=0.0)
    for k in range(200):
        core.heartbeat(k * 0.5, "h", 0, k + 1)
        assert on_time(core, k * 0.5 + 0.25) is False
    assert core.records["h"].state == ALIVE
    # A few beats lost in a row (a gap below t_fail) do not matter either.
    assert on_time(core, 101.25) is False                    # 1.75 s since the beat at 99.5
    core.heartbeat(101.5, "h", 0, 1000)
    assert on_time(core, 103.25) is False


def test_only_a_growing_counter_counts_as_news():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(10.0, "h", 0, 5)
    assert core.heartbeat(11.5, "h", 0, 5) is False           # a duplicate: heard not renewed
    assert core.heartbeat(11.6, "h", 0, 4) is False           # a late one
    assert core.stale == 2
    assert core.records["h"].heard == 10.0
    assert on_time(core, after(12.0)) is True                 # counted from 10.0
    assert core.suspects() == ["h"]


def test_stale_beats_are_ignored_and_counted_across_incarnations():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(1.0, "h", 2, 10)
    core.heartbeat(1.5, "h", 1, 99)           # an older incarnation, whatever its counter
    core.heartbeat(1.6, "h", 2, 9)
    core.heartbeat(1.7, "h", 2, 10)
    assert core.stale == 3
    rec = core.records["h"]
    assert (rec.incarnation, rec.counter, rec.heard, len(rec.intervals)) == (2, 10, 1.0, 0)
    core.heartbeat(2.0, "h", 2, 11)
    assert (rec.counter, list(rec.intervals), core.stale) == (11, [1.0], 3)
    core.heartbeat(2.5, "other", 0, 0)        # stale counts are per detector, not per host
    core.heartbeat(2.6, "other", 0, 0)
    assert core.stale == 4


def test_a_beat_after_suspicion_makes_the_node_alive_again():
    core = DetectorCore(LAN, now=0.0)
    beat_at(core, [0.0, 0.5, 1.0])
    assert on_time(core, 3.5) is True and core.suspects() == ["h"]
    assert core.heartbeat(3.6, "h", 0, 3) is False            # an old beat: still suspected
    assert core.suspects() == ["h"] and core.stale == 1
    assert core.heartbeat(3.75, "h", 0, 4) is True            # fresh news: alive
    rec = core.records["h"]
    assert (rec.state, rec.since, rec.heard, rec.counter) == (ALIVE, 3.75, 3.75, 4)
    assert list(rec.intervals) == []          # the long gap is not part of its rhythm
    assert core.suspects() == [] and core.opinion() == {"h": [0, ALIVE]}
    assert on_time(core, 5.75) is False
    assert on_time(core, after(5.75)) is True                 # and t_fail counts from the beat


def test_a_higher_incarnation_refutes_and_restarts():
    core = DetectorCore(LAN, now=0.0)
    beat_at(core, [0.0, 0.5])
    on_time(core, 3.0)
    assert core.suspects() == ["h"]
    assert core.heartbeat(3.1, "h", 1, 0) is True             # counter restarts with it
    rec = core.records["h"]
    assert (rec.state, rec.incarnation, rec.counter) == (ALIVE, 1, 0)
    assert core.opinion() == {"h": [1, ALIVE]}


def test_left_beats():
    core = DetectorCore(LAN, now=0.0)
    beat_at(core, [0.0, 0.5, 1.0])                            # counters 1..3
    assert core.heartbeat(1.2, "h", 0, 4, left=True) is True
    rec = core.records["h"]
    assert (rec.state, rec.since) == (LEFT, 1.2)
    assert core.heartbeat(1.3, "h", 0, 4, left=True) is False  # the same goodbye again
    assert core.stale == 1
    assert core.heartbeat(1.4, "h", 0, 5, left=True) is False  # still left: no change
    assert rec.since == 1.2
    # A departed node is never suspected, however long it stays silent...
    assert on_time(core, 1.2 + LAN.t_fail * 5) is False
    assert core.suspects() == [] and core.opinion() == {"h": [0, LEFT]}
    # ...and it comes back as alive when it beats again.
    assert core.heartbeat(20.0, "h", 0, 6) is True
    assert (rec.state, rec.since) == (ALIVE, 20.0)


def test_a_node_first_heard_leaving_is_left_at_once():
    core = DetectorCore(LAN, now=0.0)
    assert core.heartbeat(5.0, "h", 3, 7, left=True) is True
    assert core.opinion() == {"h": [3, LEFT]}


def test_cleanup_forgets_suspected_records_strictly_after_t_cleanup():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(0.0, "h", 4, 40)
    assert on_time(core, 2.5) is True                         # suspected since 2.5
    assert on_time(core, 2.5 + LAN.t_cleanup) is False        # exactly t_cleanup: kept
    assert "h" in core.records
    assert on_time(core, after(2.5 + LAN.t_cleanup)) is True  # then forgotten
    assert core.records == {} and core.opinion() == {}
    # A node that comes back is a new member, whatever its counter.
    assert core.heartbeat(40.0, "h", 0, 0) is True
    assert core.opinion() == {"h": [0, ALIVE]} and core.stale == 0


def test_cleanup_forgets_departed_records():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(0.0, "a", 0, 1)
    core.heartbeat(1.0, "b", 0, 1, left=True)
    core.heartbeat(1.0, "c", 0, 1)
    for t in range(2, 32):
        core.heartbeat(float(t), "c", 0, t)
        on_time(core, t + 0.25)
    # b left at 1.0: forgotten at the tick of 31.25; a, suspected at 2.25, is still there.
    assert sorted(core.records) == ["a", "c"]
    assert core.records["a"].state == SUSPECT and core.records["a"].since == 2.25
    assert on_time(core, 32.25) is False
    assert on_time(core, after(32.25)) is True
    assert sorted(core.records) == ["c"]


def test_tick_reports_changes_only_when_a_state_changes():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(0.0, "a", 0, 1)
    core.heartbeat(0.0, "b", 0, 1)
    assert on_time(core, 1.0) is False
    core.heartbeat(1.5, "b", 0, 2)
    assert on_time(core, 2.25) is True and core.suspects() == ["a"]
    assert on_time(core, 3.0) is False
    assert on_time(core, 3.75) is True and core.suspects() == ["a", "b"]
    assert core.opinion() == {"a": [0, SUSPECT], "b": [0, SUSPECT]}


# -- DetectorCore, phi -----------------------------------------------------------------------------

REGULAR = [k * 0.5 for k in range(11)]                      # 0.0 .. 5.0, every 0.5 s exactly
JITTERY = [0.0] + [k * 1.0 + d for k in range(5) for d in (0.25, 1.0)]   # gaps 0.25, 0.75


def test_phi_suspects_a_very_regular_node_long_before_t_fail():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, REGULAR)
    rec = core.records["h"]
    assert list(rec.intervals) == [0.5] * 10
    # 0.1 s late (two floor deviations): phi 1.64, far from 8.
    assert on_time(core, 5.6) is False
    # 0.5 s late (ten deviations): phi about 23 -- suspected, though t_fail is 2 s.
    assert rec.phi(6.0, PHI.phi_min_std) > 20
    assert on_time(core, 6.0) is True
    assert core.suspects() == ["h"] and rec.since == 6.0
    # The gossip method, same beats, same silence: not suspected.
    gossip = DetectorCore(LAN, now=0.0)
    beat_at(gossip, REGULAR)
    assert on_time(gossip, 6.0) is False and on_time(gossip, 7.0) is False


def test_phi_threshold_is_where_suspicion_starts():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, REGULAR)
    rec = core.records["h"]
    # Find the silence at which phi crosses 8 and check both sides of it (1 ms apart).
    crossing = next(s / 1000 for s in range(500, 2000) if rec.phi(5.0 + s / 1000, 0.05) > 8.0)
    assert 0.75 < crossing < 0.8                 # 0.5 s mean + about 5.6 floor deviations
    assert on_time(core, 5.0 + crossing - 0.001) is False
    assert on_time(core, 5.0 + crossing) is True


def test_phi_does_not_suspect_a_jittery_node_within_its_jitter():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, JITTERY)                                    # last beat at 5.0
    rec = core.records["h"]
    assert statistics.fmean(rec.intervals) == 0.5 and statistics.pstdev(rec.intervals) == 0.25
    # One second of silence condemns the regular node, but is only two deviations here.
    assert rec.phi(6.0, PHI.phi_min_std) == pytest.approx(1.64, abs=0.01)
    assert on_time(core, 6.0) is False
    assert on_time(core, 6.5) is False                        # four deviations: phi 4.5
    assert on_time(core, 6.75) is False                       # five deviations: phi 6.5
    assert rec.phi(6.75, PHI.phi_min_std) == pytest.approx(6.54, abs=0.01)
    # Six deviations (phi 9) is beyond its jitter: suspected, at t_fail.
    assert on_time(core, 7.0) is True
    assert rec.phi(7.0, PHI.phi_min_std) > PHI.phi_threshold


def test_phi_leaves_a_very_jittery_node_to_the_hard_limit():
    core = DetectorCore(PHI, now=0.0)
    beats = [0.0] + [k * 1.0 + d for k in range(5) for d in (0.125, 1.0)]   # 0.125, 0.875
    beat_at(core, beats)
    rec = core.records["h"]
    assert statistics.pstdev(rec.intervals) == 0.375
    assert on_time(core, 7.0) is False                        # t_fail: four deviations only
    assert rec.phi(7.0, PHI.phi_min_std) < 5
    assert on_time(core, after(7.0)) is True                  # t_fail still holds


def test_phi_needs_a_distribution_and_falls_back_to_t_fail():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, [0.0, 0.5])                                 # one interval: no distribution
    assert on_time(core, 2.5) is False
    assert on_time(core, after(2.5)) is True


def test_the_preset_phi_rule_forgives_a_short_stall_but_beats_t_fail():
    cfg = LAN.replace(method="phi")                           # pause 0.3 s, floor 0.1 s
    core = DetectorCore(cfg, now=0.0)
    beat_at(core, REGULAR)                                    # last beat at 5.0
    rec = core.records["h"]
    # A 0.3 s stall on top of the usual 0.5 s is nothing: phi at the mean, log10(2).
    assert rec.phi(5.8, cfg.phi_min_std, cfg.phi_pause) == pytest.approx(math.log10(2))
    assert on_time(core, 5.8) is False
    assert on_time(core, 6.0) is False                        # two floor deviations
    # phi crosses 8 near 0.8 + 5.6 * 0.1 = 1.36 s of silence, well before t_fail.
    assert on_time(core, 6.3) is False
    assert on_time(core, 6.5) is True
    assert core.suspects() == ["h"] and 6.5 - 5.0 < cfg.t_fail


def test_a_higher_incarnation_resets_the_phi_window():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, REGULAR)
    assert core.heartbeat(5.0 + 0.5, "h", 1, 0) is False      # restarted, still alive
    rec = core.records["h"]
    assert list(rec.intervals) == [] and rec.incarnation == 1
    # The old rhythm would have condemned it a second later; the new one knows nothing yet.
    assert rec.phi(6.5, PHI.phi_min_std) == 0.0
    assert on_time(core, 6.5) is False
    core.heartbeat(6.5, "h", 1, 1)
    core.heartbeat(7.0, "h", 1, 2)
    assert list(rec.intervals) == [1.0, 0.5]
    # Compare: the same beats at the same incarnation keep growing the old window.
    same = DetectorCore(PHI, now=0.0)
    last = beat_at(same, REGULAR)
    same.heartbeat(5.5, "h", 0, last + 1)
    assert len(same.records["h"].intervals) == 11


def test_a_beat_after_a_phi_suspicion_starts_a_new_rhythm():
    core = DetectorCore(PHI, now=0.0)
    last = beat_at(core, REGULAR)
    assert on_time(core, 6.0) is True
    assert core.heartbeat(6.1, "h", 0, last + 1) is True
    assert list(core.records["h"].intervals) == []
    assert on_time(core, 7.5) is False                        # no distribution, under t_fail


# -- the health guard inside the detector ----------------------------------------------------------

def test_a_late_tick_stretches_t_fail_in_that_very_tick():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(10.0, "h", 0, 1)
    # Silent 2.5 s > t_fail, but the tick itself is 0.5 s late: score 1, t_fail 4 s.
    assert core.tick(12.5, scheduled=12.0) is False
    assert core.records["h"].state == ALIVE
    assert (core.health.score, core.health.stretch) == (1, 2.0)
    # Control: the same silence with a punctual tick is a suspicion.
    control = DetectorCore(LAN, now=0.0)
    control.heartbeat(10.0, "h", 0, 1)
    assert control.tick(12.5, scheduled=12.5) is True


def test_the_stretch_decays_and_suspicion_follows():
    core = DetectorCore(LAN, now=0.0)
    core.heartbeat(10.0, "h", 0, 1)
    core.tick(12.5, scheduled=12.0)                           # score 1 (calm since 12.5)
    assert on_time(core, 13.0) is False                       # 3 s < 4 s, still stretched
    assert core.health.score == 1
    assert on_time(core, 13.5) is True                        # a second of calm: score 0
    assert core.health.healthy and core.suspects() == ["h"]


def test_a_starved_detector_suspects_only_after_the_stretched_timeout():
    cfg = LAN.replace(recover_after=100.0)                    # keep the score up
    core = DetectorCore(cfg, now=0.0)
    core.heartbeat(10.0, "h", 0, 1)
    for k in range(3):                                        # three late ticks: stretch 4
        core.tick(10.5 + k * 0.5, scheduled=10.0 + k * 0.5)
    assert core.health.stretch == 4.0
    assert on_time(core, 18.0) is False                       # exactly 4 * t_fail
    assert on_time(core, after(18.0)) is True


def test_the_stretch_also_slows_phi():
    core = DetectorCore(PHI, now=0.0)
    beat_at(core, REGULAR)
    # At 6.0 a punctual tick suspects (see above); a late one sees half the silence.
    assert core.tick(6.0, scheduled=5.5) is False
    assert core.health.stretch == 2.0 and core.records["h"].state == ALIVE
    rec = core.records["h"]
    assert rec.phi(5.0 + 1.0 / 2.0, PHI.phi_min_std) < 1
    assert on_time(core, 6.75) is True                        # still stretched: phi(0.875 s)


def test_a_detector_tracks_at_most_max_nodes():
    # 50,000 forged hosts made every opinion, view and members answer too big to
    # send (1 MiB per event): membership stopped for the real nodes too.
    core = DetectorCore(DetectionConfig(max_nodes=3), now=0.0)
    for i, host in enumerate(("a", "b", "c")):
        assert core.heartbeat(1.0, host, 1, 1)
    assert not core.heartbeat(1.0, "d", 1, 1) and core.refused == 1
    assert set(core.records) == {"a", "b", "c"}
    assert not core.heartbeat(1.5, "a", 1, 2) and core.records["a"].counter == 2  # still kept
    core.records.pop("c")                  # forgotten (t_cleanup): room for a new node
    assert core.heartbeat(2.0, "d", 1, 2) and "d" in core.records
    with pytest.raises(ConfigError, match="max_nodes must be a positive whole number"):
        DetectionConfig(max_nodes=0)
