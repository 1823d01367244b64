"""Membership, the pure core (services/membership.py): payloads, opinions, agreement on views.

No sockets, no clocks: opinions are built by hand, ``now`` and ``wall`` are
numbers.  What is proven:

* the channel helpers name the documented channels;
* :class:`Heartbeat`, :class:`Opinion` and :class:`View` round-trip through
  ``payload()`` -> JSON -> ``parse()``; malformed payloads are refused with an
  :class:`EventError` naming the bad field; random JSON (and valid payloads
  with one random mutation) never raises anything else, and whatever
  ``parse()`` accepts is well typed and round-trips (hypothesis);
* :func:`quorum` is a majority; :class:`Opinions` keeps the newest opinion per
  detector by ``(epoch, seq)``, ages detectors out after ``ttl * stretch``,
  forgets them after ten times that, and elects the smallest live healthy name;
* :func:`next_view` follows the agreement rule: a quorum of live healthy
  detectors fails a node, fewer make it suspect, unhealthy detectors abstain
  (neither their suspicions nor their number count), a higher incarnation
  voids older suspicions, any live detector's ``left`` wins, a failed node
  stays failed while any healthy detector suspects it and then ``recovered``,
  failed and departed members leave strictly after ``t_cleanup``, a node
  joins only when a detector says it is alive, an unchanged input returns the
  very same object and every new view is numbered one more;
* a hypothesis property drives random opinion sets through ``next_view`` step
  after step and checks the numbering, that ``changes`` lists exactly the
  members that differ, that nobody is failed without a quorum (or already
  failed), left without a ``left`` opinion, or alive again without an
  ``alive`` opinion, and that an unchanged step is a fixpoint;
* after a healed partition (``rivals``) the next view is numbered past every
  rival and its changes also name what a rival's subscribers believe
  differently (``recovered`` winning); a host known only to a rival, and to
  no live detector, is not carried into the view;
* :class:`ViewFollower` only moves forward and remembers its lineage (bounded)
  to tell forks apart; :func:`best_answer` picks the newest valid view among
  query replies.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psepr.errors import ChannelError, EventError
from services.detection import ALIVE, LEFT, SUSPECT
from services.membership import (EVENTS, FAILED, RECOVERED, STATES, Heartbeat, Member, Opinion,
                                 Opinions, View, ViewFollower, best_answer, detectors_channel,
                                 farm_channel, heartbeat_channel, membership_channel, next_view,
                                 quorum)

T = 30.0                       # t_cleanup
D3 = ("d1", "d2", "d3")


def op(name, nodes=None, healthy=True, seq=1, epoch=1.0, view=0):
    """An opinion of detector ``name``: ``nodes`` maps host -> (incarnation, state)."""
    return Opinion(name, epoch, seq, healthy, 0 if healthy else 1, view,
                   {h: tuple(v) for h, v in (nodes or {}).items()})


def everyone(state, *hosts, inc=0, names=D3):
    """Every detector in ``names`` says the same of ``hosts``."""
    return [op(d, {h: (inc, state) for h in hosts}) for d in names]


def first_view(*hosts, wall=100.0):
    """View 1: ``hosts`` alive at incarnation 0, seen by three healthy detectors."""
    v = next_view(View(), everyone(ALIVE, *hosts), "d1", wall, T)
    assert v.number == 1 and v.changes == tuple((h, ALIVE) for h in sorted(hosts))
    return v


def failed_view(wall=200.0):
    """View 2: h1 failed (all three suspect it) at ``wall``, h2 alive."""
    v = next_view(first_view("h1", "h2"),
                  [op(d, {"h1": (0, SUSPECT), "h2": (0, ALIVE)}) for d in D3], "d1", wall, T)
    assert v.number == 2 and v.members["h1"] == Member(FAILED, 0, wall)
    return v


def state(view, host):
    m = view.members.get(host)
    return m.state if m else None


def wire(payload):
    """What the payload looks like after the trip through the overlay (orjson)."""
    return orjson.loads(orjson.dumps(payload))


# -- channels --------------------------------------------------------------------------------------

def test_channels_are_the_documented_ones():
    a = "example.com"
    assert farm_channel(a).text == "/example.com/farm/"
    assert heartbeat_channel(a).text == "/example.com/farm/heartbeat/"
    assert heartbeat_channel(a, "h1").text == "/example.com/farm/heartbeat/h1/"
    assert detectors_channel(a).text == "/example.com/farm/detectors/"
    assert detectors_channel(a, "d1").text == "/example.com/farm/detectors/d1/"
    assert membership_channel(a).text == "/example.com/farm/membership/"
    assert membership_channel(a, "h1").text == "/example.com/farm/membership/h1/"
    # A subtree covers its hosts' channels (one lease for all heartbeats).
    assert heartbeat_channel(a, "h1").text.startswith(heartbeat_channel(a).text)
    with pytest.raises(ChannelError):
        farm_channel("exa mple.com")
    with pytest.raises(ChannelError):
        heartbeat_channel(a, "bad host")


def test_quorum_is_a_strict_majority_of_at_least_one():
    assert [quorum(n) for n in range(8)] == [1, 1, 2, 2, 3, 3, 4, 4]
    for n in range(1, 50):
        assert 2 * quorum(n) > n and 2 * (quorum(n) - 1) <= n


# -- payloads --------------------------------------------------------------------------------------

def test_heartbeat_round_trip_and_defaults():
    hb = Heartbeat("h1", 2, 7, 0.5)
    assert hb.payload() == {"host": "h1", "incarnation": 2, "counter": 7, "period": 0.5,
                            "state": ALIVE}
    assert Heartbeat.parse(wire(hb.payload())) == hb
    bye = Heartbeat("h1", 2, 8, 0.5, left=True)
    assert bye.payload()["state"] == LEFT and Heartbeat.parse(wire(bye.payload())) == bye
    # state and period are optional; an integral period is a float.
    hb = Heartbeat.parse({"host": "h", "incarnation": 0, "counter": 0})
    assert (hb.period, hb.left) == (0.0, False)
    hb = Heartbeat.parse({"host": "h", "incarnation": 0, "counter": 0, "period": 2})
    assert hb.period == 2.0 and type(hb.period) is float


GOOD_HB = {"host": "h", "incarnation": 1, "counter": 2, "period": 0.5, "state": ALIVE}


@pytest.mark.parametrize("payload, what", [
    ([], "JSON object"), ("h", "JSON object"), (None, "JSON object"), (3, "JSON object"),
    ({}, "host"),
    ({**GOOD_HB, "host": 7}, "host"),
    ({**GOOD_HB, "host": None}, "host"),
    ({k: v for k, v in GOOD_HB.items() if k != "incarnation"}, "incarnation"),
    ({**GOOD_HB, "incarnation": -1}, "incarnation"),
    ({**GOOD_HB, "incarnation": True}, "incarnation"),
    ({**GOOD_HB, "incarnation": 1.0}, "incarnation"),
    ({**GOOD_HB, "counter": "3"}, "counter"),
    ({**GOOD_HB, "counter": -3}, "counter"),
    ({**GOOD_HB, "incarnation": 2**53}, "incarnation must be between 0 and 2**53 - 1"),
    ({**GOOD_HB, "counter": 2**64 - 1}, "counter must be between 0 and 2**53 - 1"),
    ({**GOOD_HB, "state": "suspect"}, "state"),
    ({**GOOD_HB, "state": "dead"}, "state"),
    ({**GOOD_HB, "state": ["alive"]}, "state"),
    ({**GOOD_HB, "period": -0.5}, "period"),
    ({**GOOD_HB, "period": "fast"}, "period"),
    ({**GOOD_HB, "period": False}, "period"),
    ({**GOOD_HB, "period": None}, "period"),
])
def test_malformed_heartbeats_are_refused_naming_the_field(payload, what):
    with pytest.raises(EventError) as exc:
        Heartbeat.parse(payload)
    assert what in str(exc.value)


def test_opinion_round_trip():
    o = Opinion("d1", 1700000000.25, 42, False, 3, 17,
                {"h1": (0, ALIVE), "h2": (5, SUSPECT), "h3": (1, LEFT)})
    p = o.payload()
    assert p["nodes"] == {"h1": [0, ALIVE], "h2": [5, SUSPECT], "h3": [1, LEFT]}
    assert (p["detector"], p["epoch"], p["seq"], p["healthy"], p["health"], p["view"]) == \
        ("d1", 1700000000.25, 42, False, 3, 17)
    assert Opinion.parse(wire(p)) == o
    assert Opinion.parse({**p, "epoch": 12}).epoch == 12.0
    # The view lineage fields: optional (older detectors do not send them), kept when sent.
    assert (p["view_by"], p["led"]) == ("", 0)
    old = {k: x for k, x in p.items() if k not in ("view_by", "led")}
    assert Opinion.parse(old) == o
    lineage = Opinion("d1", 1.0, 2, True, 0, 17, {}, view_by="d0", led=16)
    assert Opinion.parse(wire(lineage.payload())) == lineage
    empty = op("d9")
    assert Opinion.parse(wire(empty.payload())) == empty


GOOD_OP = op("d1", {"h1": (0, ALIVE)}).payload()


@pytest.mark.parametrize("payload, what", [
    ([], "JSON object"), (None, "JSON object"),
    ({k: v for k, v in GOOD_OP.items() if k != "nodes"}, "nodes"),
    ({**GOOD_OP, "nodes": [["h1", 0, "alive"]]}, "nodes"),
    ({**GOOD_OP, "nodes": {"h1": "alive"}}, "h1"),
    ({**GOOD_OP, "nodes": {"h1": [0]}}, "h1"),
    ({**GOOD_OP, "nodes": {"h1": [0, "alive", 1]}}, "h1"),
    ({**GOOD_OP, "nodes": {"h1": [True, "alive"]}}, "h1"),
    ({**GOOD_OP, "nodes": {"h1": ["0", "alive"]}}, "h1"),
    ({**GOOD_OP, "nodes": {"h1": [0, "failed"]}}, "h1"),      # failed is the view's word
    ({**GOOD_OP, "nodes": {"h1": [0, None]}}, "h1"),
    ({k: v for k, v in GOOD_OP.items() if k != "epoch"}, "epoch"),
    ({**GOOD_OP, "epoch": "yesterday"}, "epoch"),
    ({**GOOD_OP, "epoch": True}, "epoch"),
    ({**GOOD_OP, "detector": 1}, "detector"),
    ({**GOOD_OP, "seq": -1}, "seq"),
    ({**GOOD_OP, "seq": 1.5}, "seq"),
    ({**GOOD_OP, "healthy": 1}, "healthy"),
    ({**GOOD_OP, "healthy": "yes"}, "healthy"),
    ({**GOOD_OP, "health": -2}, "health"),
    ({k: v for k, v in GOOD_OP.items() if k != "view"}, "view"),
    ({**GOOD_OP, "view_by": 3}, "view_by"),
    ({**GOOD_OP, "view_by": None}, "view_by"),
    ({**GOOD_OP, "led": -1}, "led"),
    ({**GOOD_OP, "led": True}, "led"),
    ({**GOOD_OP, "led": "7"}, "led"),
])
def test_malformed_opinions_are_refused_naming_the_field(payload, what):
    with pytest.raises(EventError) as exc:
        Opinion.parse(payload)
    assert what in str(exc.value)


def test_view_round_trip_and_change_payloads():
    v = View(7, "d2", {"b": Member(FAILED, 3, 1700000000.5), "a": Member(ALIVE, 0, 12.0)},
             (("b", FAILED), ("a", RECOVERED)))
    p = v.payload()
    assert list(p["members"]) == ["a", "b"]                 # sorted on the wire
    assert p == {"view": 7, "leader": "d2",
                 "members": {"a": [ALIVE, 0, 12.0], "b": [FAILED, 3, 1700000000.5]},
                 "changes": [["b", FAILED], ["a", RECOVERED]], "prev": [0, ""], "merged": []}
    assert View.parse(wire(p)) == v
    assert View.parse(wire(View().payload())) == View()
    assert View.parse({k: x for k, x in p.items() if k != "changes"}).changes == ()
    # prev and merged are optional on input (views from before they existed).
    assert View.parse({k: x for k, x in p.items() if k not in ("prev", "merged")}) == v
    healed = View(9, "d1", {}, (), (6, "d1"), ((5, "d3"), (7, "d4")))
    assert healed.payload()["prev"] == [6, "d1"]
    assert healed.payload()["merged"] == [[5, "d3"], [7, "d4"]]
    assert View.parse(wire(healed.payload())) == healed and healed.id == (9, "d1")
    assert View.parse({**p, "members": {"a": [ALIVE, 0, 12]}}).members["a"].since == 12.0
    assert v.change_payload("b", FAILED) == {"host": "b", "state": FAILED, "incarnation": 3,
                                             "since": 1700000000.5, "view": 7, "leader": "d2"}
    # A member that is no longer in the view (dropped) still gets a well-formed change.
    assert v.change_payload("gone", LEFT) == {"host": "gone", "state": LEFT, "incarnation": 0,
                                              "since": 0.0, "view": 7, "leader": "d2"}


GOOD_VIEW = View(3, "d1", {"h1": Member(ALIVE, 0, 1.0)}, (("h1", ALIVE),)).payload()


@pytest.mark.parametrize("payload, what", [
    ([], "JSON object"), (None, "JSON object"), ("view", "JSON object"),
    ({k: v for k, v in GOOD_VIEW.items() if k != "members"}, "members"),
    ({**GOOD_VIEW, "members": [["h1", "alive", 0, 1.0]]}, "members"),
    ({**GOOD_VIEW, "members": {"h1": ["alive", 0]}}, "h1"),
    ({**GOOD_VIEW, "members": {"h1": ["recovered", 0, 1.0]}}, "h1"),   # an event, not a state
    ({**GOOD_VIEW, "members": {"h1": ["alive", "0", 1.0]}}, "h1"),
    ({**GOOD_VIEW, "members": {"h1": ["alive", 0.5, 1.0]}}, "h1"),
    ({**GOOD_VIEW, "members": {"h1": ["alive", True, 1.0]}}, "h1"),
    ({**GOOD_VIEW, "members": {"h1": ["alive", 0, "now"]}}, "h1"),
    ({**GOOD_VIEW, "members": {"h1": ["alive", 0, False]}}, "h1"),
    ({**GOOD_VIEW, "changes": {"h1": "alive"}}, "changes"),
    ({**GOOD_VIEW, "changes": None}, "changes"),
    ({**GOOD_VIEW, "changes": [["h1"]]}, "changes"),
    ({**GOOD_VIEW, "changes": [["h1", "rebooted"]]}, "changes"),
    ({**GOOD_VIEW, "changes": ["h1", "alive"]}, "changes"),
    ({**GOOD_VIEW, "changes": [[1, "alive"]]}, "changes"),           # the host is a name
    ({**GOOD_VIEW, "changes": [[None, "failed"]]}, "changes"),
    ({**GOOD_VIEW, "view": -1}, "view"),
    ({**GOOD_VIEW, "prev": 3}, "prev"),
    ({**GOOD_VIEW, "prev": [3]}, "prev"),
    ({**GOOD_VIEW, "prev": [-1, "d1"]}, "prev"),
    ({**GOOD_VIEW, "prev": [True, "d1"]}, "prev"),
    ({**GOOD_VIEW, "prev": [2, None]}, "prev"),
    ({**GOOD_VIEW, "merged": {"d1": 2}}, "merged"),
    ({**GOOD_VIEW, "merged": [[2, "d1"], [2]]}, "merged"),
    ({**GOOD_VIEW, "merged": [["2", "d1"]]}, "merged"),
    ({**GOOD_VIEW, "view": "3"}, "view"),
    ({k: v for k, v in GOOD_VIEW.items() if k != "leader"}, "leader"),
    ({**GOOD_VIEW, "leader": None}, "leader"),
])
def test_malformed_views_are_refused_naming_the_field(payload, what):
    with pytest.raises(EventError) as exc:
        View.parse(payload)
    assert what in str(exc.value)


# -- hypothesis: payload round trips and fuzzing ---------------------------------------------------

names = st.text(min_size=1, max_size=12)
counts = st.integers(0, 2**53 - 1)      # JSON's exact integers: MAX_COUNT
finite = st.floats(allow_nan=False, allow_infinity=False)

heartbeats = st.builds(Heartbeat, names, counts, counts, st.floats(0, 1e9), st.booleans())
opinions = st.builds(Opinion, names, finite, counts, st.booleans(), counts, counts,
                     st.dictionaries(names, st.tuples(st.integers(-2**63, 2**63 - 1),
                                                      st.sampled_from((ALIVE, SUSPECT, LEFT))),
                                     max_size=6),
                     st.text(max_size=12), counts)
views = st.builds(View, counts, st.text(max_size=12),
                  st.dictionaries(names, st.builds(Member, st.sampled_from(STATES),
                                                   st.integers(-2**63, 2**63 - 1), finite),
                                  max_size=6),
                  st.lists(st.tuples(names, st.sampled_from(EVENTS)), max_size=6).map(tuple),
                  st.tuples(counts, st.text(max_size=12)),
                  st.lists(st.tuples(counts, st.text(max_size=12)), max_size=3).map(tuple))


@settings(max_examples=200, deadline=None)
@given(heartbeats, opinions, views)
def test_payloads_round_trip_through_the_wire(hb, o, v):
    assert Heartbeat.parse(wire(hb.payload())) == hb
    assert Opinion.parse(wire(o.payload())) == o
    assert View.parse(wire(v.payload())) == v


KEYS = ("host", "incarnation", "counter", "period", "state", "detector", "epoch", "seq",
        "healthy", "health", "view", "nodes", "members", "changes", "leader", "view_by", "led",
        "prev", "merged")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | finite
    | st.text(max_size=8) | st.sampled_from(STATES + EVENTS + KEYS),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6) | st.sampled_from(KEYS), inner, max_size=6),
    max_leaves=25)


def mutate(data, payload):
    """``payload`` (JSON) with one random element replaced, removed or added."""
    payload = wire(payload)
    spots = []

    def walk(node):
        if isinstance(node, dict):
            spots.extend((node, k) for k in list(node) + [None])
            for x in node.values():
                walk(x)
        elif isinstance(node, list):
            spots.extend((node, i) for i in range(len(node) + 1))
            for x in node:
                walk(x)
    walk(payload)
    container, key = data.draw(st.sampled_from(spots))
    value = data.draw(json_values)
    if isinstance(container, dict):
        if key is None:
            container[data.draw(st.sampled_from(KEYS) | st.text(max_size=4))] = value
        elif data.draw(st.booleans()):
            del container[key]
        else:
            container[key] = value
    elif key == len(container):
        container.append(value)
    elif data.draw(st.booleans()):
        del container[key]
    else:
        container[key] = value
    return payload


def well_typed(x):
    """Whatever parse() accepts has the documented types, and round-trips."""
    if isinstance(x, Heartbeat):
        assert type(x.host) is str and type(x.left) is bool and type(x.period) is float
        assert type(x.incarnation) is int and type(x.counter) is int
        assert x.incarnation >= 0 and x.counter >= 0 and x.period >= 0
    elif isinstance(x, Opinion):
        assert type(x.detector) is str and type(x.epoch) is float and type(x.healthy) is bool
        assert type(x.view_by) is str
        for n in (x.seq, x.health, x.view, x.led):
            assert type(n) is int and n >= 0
        for h, entry in x.nodes.items():
            assert type(h) is str and type(entry) is tuple and len(entry) == 2
            assert type(entry[0]) is int and entry[1] in (ALIVE, SUSPECT, LEFT)
    else:
        assert type(x.number) is int and x.number >= 0 and type(x.leader) is str
        for h, m in x.members.items():
            assert type(h) is str and m.state in STATES
            assert type(m.incarnation) is int and type(m.since) is float
        for c in x.changes:
            assert type(c) is tuple and len(c) == 2
            assert type(c[0]) is str and c[1] in EVENTS
    assert type(x).parse(wire(x.payload())) == x


PARSERS = (Heartbeat.parse, Opinion.parse, View.parse)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_random_json_only_ever_raises_event_error(value):
    for parse in PARSERS:
        try:
            x = parse(value)
        except EventError:
            continue
        well_typed(x)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), heartbeats, opinions.filter(lambda o: o.nodes),
       views.filter(lambda v: v.members and v.changes))
def test_mutated_payloads_only_ever_raise_event_error(data, hb, o, v):
    for parse, good in zip(PARSERS, (hb, o, v)):
        bad = mutate(data, good.payload())
        try:
            x = parse(bad)
        except EventError:
            continue
        well_typed(x)


# -- Opinions --------------------------------------------------------------------------------------

def test_opinions_keep_the_newest_per_detector():
    ops = Opinions(ttl=2.0)
    assert ops.add(op("d1", seq=5), now=0.0) is True
    assert ops.add(op("d1", seq=5, nodes={"h": (0, SUSPECT)}), now=0.1) is False   # duplicate
    assert ops.add(op("d1", seq=4), now=0.2) is False                              # late
    assert ops.live(0.3) == [op("d1", seq=5)]
    assert ops.add(op("d1", seq=6, nodes={"h": (0, ALIVE)}), now=0.4) is True
    assert ops.live(0.5)[0].nodes == {"h": (0, ALIVE)}
    # A restarted detector (later epoch) starts its seq again and is still newer...
    assert ops.add(op("d1", seq=0, epoch=2.0), now=0.6) is True
    # ...and its previous life's opinions, however high their seq, are older.
    assert ops.add(op("d1", seq=99, epoch=1.0), now=0.7) is False
    assert [(o.epoch, o.seq) for o in ops.live(0.8)] == [(2.0, 0)]
    # Detectors are independent.
    assert ops.add(op("d0", seq=0), now=0.9) is True
    assert [o.detector for o in ops.live(1.0)] == ["d0", "d1"]


def test_opinions_age_out_after_the_stretched_ttl_by_arrival_time():
    ops = Opinions(ttl=2.0)
    ops.add(op("d2"), now=10.0)
    ops.add(op("d1", epoch=-5.0), now=11.0)   # the epoch is the detector's, not the arrival
    assert [o.detector for o in ops.live(12.0)] == ["d1", "d2"]        # exactly ttl: live
    assert [o.detector for o in ops.live(math.nextafter(12.0, 13.0))] == ["d1"]
    assert [o.detector for o in ops.live(14.0, stretch=2.0)] == ["d1", "d2"]
    assert [o.detector for o in ops.live(15.5, stretch=2.0)] == []


def test_heard_since_asks_for_a_newer_opinion_from_every_live_detector():
    ops = Opinions(ttl=2.0)
    ops.add(op("d1", seq=1), now=10.0)
    ops.add(op("d2", seq=1), now=10.5)
    assert ops.heard_since(10.0, now=11.0) and not ops.heard_since(10.2, now=11.0)
    ops.add(op("d1", seq=2), now=11.0)
    assert ops.heard_since(10.2, now=11.0) and not ops.heard_since(10.7, now=11.0)
    # A dead detector (past its ttl) is not waited for.
    assert ops.heard_since(10.7, now=12.6)
    assert not ops.heard_since(10.7, now=12.6, stretch=2.0)   # ...unless the ttl is stretched


def test_opinions_forget_long_dead_detectors():
    ops = Opinions(ttl=2.0)
    ops.add(op("d1", seq=9), now=0.0)
    assert ops.live(20.0) == []
    assert ops.add(op("d1", seq=1), now=20.0) is False       # still remembered at 10 * ttl
    assert ops.live(math.nextafter(20.0, 21.0)) == []         # now forgotten...
    assert ops.add(op("d1", seq=1), now=21.0) is True         # ...so any seq is news again
    assert ops.live(21.0) == [op("d1", seq=1)]


def test_the_leader_is_the_smallest_live_healthy_detector():
    ops = Opinions(ttl=2.0)
    assert ops.leader(0.0) is None
    ops.add(op("d1", healthy=False), now=0.0)
    ops.add(op("d3"), now=0.0)
    ops.add(op("d2"), now=1.0)
    assert ops.leader(1.0) == "d2"            # d1 is starved: it does not lead
    assert ops.leader(2.5) == "d2"            # d3's opinion aged out
    ops.add(op("d3", seq=2), now=2.5)
    assert ops.leader(3.5) == "d3"            # d2 aged out: its successor takes over
    assert ops.leader(3.5, stretch=2.0) == "d2"
    ops.add(op("d1", seq=2), now=3.5)         # d1 recovered: the smallest name leads again
    assert ops.leader(3.5) == "d1"
    ops.add(op("d1", seq=3, healthy=False), now=3.6)
    ops.add(op("d3", seq=3, healthy=False), now=3.6)
    assert ops.leader(3.7) is None            # nobody healthy: nobody leads


# -- next_view: the agreement rule -----------------------------------------------------------------

def test_the_first_view_lists_every_node_a_detector_says_is_alive():
    assert next_view(View(), [], "d1", 100.0, T) == View()
    empty = View()
    assert next_view(empty, [], "d1", 100.0, T) is empty
    v = next_view(View(), everyone(ALIVE, "h2", "h1"), "d1", 100.0, T)
    assert (v.number, v.leader) == (1, "d1")
    assert v.members == {"h1": Member(ALIVE, 0, 100.0), "h2": Member(ALIVE, 0, 100.0)}
    assert v.changes == (("h1", ALIVE), ("h2", ALIVE))
    # One detector that knows a node suffices for it to join.
    v = next_view(View(), [op("d1", {"h1": (3, ALIVE)}), op("d2"), op("d3")], "d2", 5.0, T)
    assert v.members == {"h1": Member(ALIVE, 3, 5.0)} and v.leader == "d2"


def test_an_unchanged_input_returns_the_very_same_view():
    v1 = first_view("h1", "h2")
    ops = everyone(ALIVE, "h1", "h2")
    assert next_view(v1, ops, "d1", 101.0, T) is v1
    assert next_view(v1, ops, "d2", 10_000.0, T) is v1       # another leader, much later
    assert next_view(v1, [], "d1", 101.0, T) is v1           # nobody has an opinion: keep
    assert next_view(v1, [op("d1", {"h1": (0, ALIVE)})], "d1", 101.0, T) is v1
    v2 = failed_view()
    assert next_view(v2, [op(d, {"h1": (0, SUSPECT), "h2": (0, ALIVE)}) for d in D3],
                     "d1", 201.0, T) is v2


def test_a_majority_of_healthy_detectors_fails_a_node():
    v1 = first_view("h1", "h2")
    ops = [op("d1", {"h1": (0, SUSPECT), "h2": (0, ALIVE)}),
           op("d2", {"h1": (0, SUSPECT), "h2": (0, ALIVE)}),
           op("d3", {"h1": (0, ALIVE), "h2": (0, ALIVE)})]
    v2 = next_view(v1, ops, "d1", 150.0, T)
    assert (v2.number, v2.changes) == (2, (("h1", FAILED),))
    assert v2.members["h1"] == Member(FAILED, 0, 150.0)
    assert v2.members["h2"] is v1.members["h2"]             # untouched members are kept as is


def test_a_minority_makes_a_node_suspect_and_the_next_suspicion_fails_it():
    v1 = first_view("h1")
    v2 = next_view(v1, [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, ALIVE)}),
                        op("d3", {"h1": (0, ALIVE)})], "d1", 110.0, T)
    assert v2.changes == (("h1", SUSPECT),) and v2.members["h1"] == Member(SUSPECT, 0, 110.0)
    v3 = next_view(v2, [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)}),
                        op("d3", {"h1": (0, ALIVE)})], "d1", 111.0, T)
    assert v3.number == 3 and v3.changes == (("h1", FAILED),)
    assert v3.members["h1"] == Member(FAILED, 0, 111.0)


def test_with_an_even_number_of_detectors_half_is_not_a_quorum():
    names = ("d1", "d2", "d3", "d4")
    v1 = next_view(View(), everyone(ALIVE, "h1", names=names), "d1", 100.0, T)
    two = [op(d, {"h1": (0, SUSPECT if d in ("d1", "d2") else ALIVE)}) for d in names]
    assert state(next_view(v1, two, "d1", 101.0, T), "h1") == SUSPECT
    three = [op(d, {"h1": (0, ALIVE if d == "d4" else SUSPECT)}) for d in names]
    assert state(next_view(v1, three, "d1", 101.0, T), "h1") == FAILED


def test_detectors_that_do_not_know_a_node_still_count_as_voters():
    v1 = first_view("h1")
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2"), op("d3")]    # d2, d3 just started
    assert state(next_view(v1, ops, "d1", 101.0, T), "h1") == SUSPECT


def test_unhealthy_detectors_suspicions_do_not_count():
    v1 = first_view("h1")
    ops = [op("d1", {"h1": (0, SUSPECT)}, healthy=False),
           op("d2", {"h1": (0, SUSPECT)}, healthy=False),
           op("d3", {"h1": (0, ALIVE)})]
    assert next_view(v1, ops, "d3", 101.0, T) is v1          # a starved majority accuses nobody
    # Not even a suspect: the one healthy detector sees it alive.
    ops[2] = op("d3", {"h1": (0, SUSPECT)}, healthy=False)
    assert next_view(v1, ops, "d3", 101.0, T) is v1          # nobody healthy at all: no votes


def test_unhealthy_detectors_do_not_count_toward_the_quorum():
    v1 = first_view("h1")
    # One healthy voter: its suspicion is the quorum, though two of three detectors disagree.
    ops = [op("d1", {"h1": (0, SUSPECT)}),
           op("d2", {"h1": (0, ALIVE)}, healthy=False),
           op("d3", {"h1": (0, ALIVE)}, healthy=False)]
    v2 = next_view(v1, ops, "d1", 101.0, T)
    assert v2.changes == (("h1", FAILED),)
    # Two healthy of four: a majority of voters, a minority of detectors.
    v1 = next_view(View(), everyone(ALIVE, "h1", names=("d1", "d2", "d3", "d4")), "d1", 0.0, T)
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)}),
           op("d3", {"h1": (0, ALIVE)}, healthy=False), op("d4", {"h1": (0, ALIVE)}, healthy=False)]
    assert state(next_view(v1, ops, "d1", 1.0, T), "h1") == FAILED


def test_a_refutation_voids_older_suspicions():
    v1 = first_view("h1")
    v2 = next_view(v1, [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, ALIVE)}),
                        op("d3", {"h1": (0, ALIVE)})], "d1", 110.0, T)
    assert state(v2, "h1") == SUSPECT
    # The node heard it and refuted with incarnation 1; only d3 has heard that yet.  A
    # quorum of suspicions of incarnation 0 no longer counts.
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)}),
           op("d3", {"h1": (1, ALIVE)})]
    v3 = next_view(v2, ops, "d1", 111.0, T)
    assert v3.changes == (("h1", ALIVE),) and v3.members["h1"] == Member(ALIVE, 1, 111.0)
    assert next_view(v3, ops, "d1", 112.0, T) is v3
    # Suspicions of the new incarnation count again.
    ops = [op("d1", {"h1": (1, SUSPECT)}), op("d2", {"h1": (1, SUSPECT)}),
           op("d3", {"h1": (1, ALIVE)})]
    v4 = next_view(v3, ops, "d1", 113.0, T)
    assert v4.members["h1"] == Member(FAILED, 1, 113.0)


def test_the_view_remembers_the_incarnation_when_opinions_lag_behind():
    v1 = next_view(View(), everyone(ALIVE, "h1", inc=2), "d1", 0.0, T)
    # Late opinions about an older incarnation, even unanimous, are not about this node.
    assert next_view(v1, everyone(SUSPECT, "h1", inc=1), "d1", 1.0, T) is v1
    assert next_view(v1, everyone(LEFT, "h1", inc=1), "d1", 1.0, T) is v1


def test_a_failed_node_stays_failed_while_a_healthy_detector_suspects_it():
    v2 = failed_view()
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, ALIVE)}),
           op("d3", {"h1": (0, ALIVE)})]
    assert next_view(v2, ops, "d1", 201.0, T) is v2          # a minority still suspects
    ops = [op("d1", {"h1": (0, SUSPECT)}, healthy=False), op("d2"), op("d3")]
    assert next_view(v2, ops, "d1", 201.0, T) is v2          # silence is not life
    ops = [op("d1", {"h1": (0, ALIVE)}), op("d2"), op("d3")]
    v3 = next_view(v2, ops, "d1", 202.0, T)                   # nobody suspects, one sees it
    assert v3.number == 3 and v3.changes == (("h1", RECOVERED),)
    assert v3.members["h1"] == Member(ALIVE, 0, 202.0)


def test_a_refuting_failed_node_has_recovered():
    v2 = failed_view()
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)}),
           op("d3", {"h1": (1, ALIVE)}, healthy=False)]
    v3 = next_view(v2, ops, "d1", 205.0, T)
    assert v3.changes == (("h1", RECOVERED),) and v3.members["h1"] == Member(ALIVE, 1, 205.0)


def test_left_wins_from_any_live_detector_at_the_current_incarnation():
    v1 = first_view("h1", "h2")
    ops = [op("d1", {"h1": (0, LEFT), "h2": (0, SUSPECT)}, healthy=False),
           op("d2", {"h1": (0, SUSPECT), "h2": (0, LEFT)}),
           op("d3", {"h1": (0, SUSPECT), "h2": (0, SUSPECT)})]
    v2 = next_view(v1, ops, "d2", 120.0, T)
    assert v2.changes == (("h1", LEFT), ("h2", LEFT))
    assert v2.members == {"h1": Member(LEFT, 0, 120.0), "h2": Member(LEFT, 0, 120.0)}
    # A goodbye of an older life does not count against a restarted node.
    v1 = next_view(View(), everyone(ALIVE, "h1", inc=1), "d1", 0.0, T)
    ops = [op("d1", {"h1": (0, LEFT)}), op("d2", {"h1": (1, ALIVE)}), op("d3")]
    assert next_view(v1, ops, "d1", 1.0, T) is v1
    # A node that comes back after leaving is alive again.
    v3 = next_view(v2, [op("d1", {"h1": (1, ALIVE)}), op("d2", {"h2": (0, LEFT)})],
                   "d1", 130.0, T)
    assert v3.changes == (("h1", ALIVE),) and v3.members["h1"] == Member(ALIVE, 1, 130.0)


def test_a_node_never_in_a_view_is_not_reported_suspect_failed_or_left():
    v1 = first_view("h1")
    ops = [op("d1", {"h1": (0, ALIVE), "x": (0, SUSPECT), "y": (0, LEFT)}),
           op("d2", {"h1": (0, ALIVE), "x": (0, SUSPECT), "z": (0, SUSPECT)}),
           op("d3", {"h1": (0, ALIVE), "z": (0, SUSPECT)})]
    assert next_view(v1, ops, "d1", 101.0, T) is v1


def test_a_node_joins_only_when_some_detector_says_it_is_alive():
    v1 = first_view("h1")
    # Only a starved detector knows "ghost", and it suspects it: nobody vouches for it.
    ops = everyone(ALIVE, "h1")[:2] + [op("d3", {"h1": (0, ALIVE), "ghost": (0, SUSPECT)},
                                          healthy=False)]
    assert next_view(v1, ops, "d1", 101.0, T) is v1
    # An alive opinion, even a starved detector's, is enough to join.
    ops[2] = op("d3", {"h1": (0, ALIVE), "ghost": (0, ALIVE)}, healthy=False)
    v2 = next_view(v1, ops, "d1", 102.0, T)
    assert v2.changes == (("ghost", ALIVE),)


def test_failed_and_departed_members_are_dropped_strictly_after_t_cleanup():
    v2 = failed_view(wall=200.0)
    left = next_view(v2, [op("d1", {"h2": (0, LEFT)})], "d1", 210.0, T)
    assert left.changes == (("h2", LEFT),)
    quiet = [op("d1"), op("d2"), op("d3")]                  # the detectors forgot both
    assert next_view(left, quiet, "d1", 200.0 + T, T) is left
    v4 = next_view(left, quiet, "d1", 200.5 + T, T)
    assert v4.number == left.number + 1 and v4.changes == ()
    assert sorted(v4.members) == ["h2"]                      # h1 failed at 200: gone
    assert next_view(v4, quiet, "d1", 210.0 + T, T) is v4
    v5 = next_view(v4, quiet, "d1", 210.5 + T, T)
    assert v5.number == v4.number + 1 and v5.members == {} and v5.changes == ()
    assert next_view(v5, quiet, "d1", 1000.0, T) is v5


def test_alive_and_suspect_members_are_never_dropped():
    v1 = first_view("h1", "h2")
    v2 = next_view(v1, [op("d1", {"h2": (0, SUSPECT)}), op("d2"), op("d3")], "d1", 100.0, T)
    assert state(v2, "h2") == SUSPECT
    assert next_view(v2, [], "d1", 1e9, T) is v2


def test_a_dropped_member_suspected_by_a_minority_does_not_come_back():
    v2 = failed_view(wall=200.0)
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2"), op("d3")]   # d1 suspected it later
    v3 = next_view(v2, ops, "d1", 231.0, T)
    assert "h1" not in v3.members
    assert next_view(v3, ops, "d1", 232.0, T) is v3


def test_a_dropped_member_does_not_come_back_on_a_starved_detectors_suspicion():
    # Regression: a starved detector suspects late (its timeouts are stretched), so it may
    # still report a failed node when the view drops it.  Its suspicion does not count,
    # but it must not make the node rejoin as alive either -- nobody says it is alive, and
    # once that detector forgets the node it would stay "alive" in every view for good.
    v2 = failed_view(wall=200.0)
    ops = [op("d1"), op("d2"), op("d3", {"h1": (0, SUSPECT)}, healthy=False)]
    v3 = next_view(v2, ops, "d1", 231.0, T)
    assert "h1" not in v3.members
    assert next_view(v3, ops, "d1", 232.0, T) is v3
    assert next_view(v3, [op("d1"), op("d2"), op("d3")], "d1", 300.0, T) is v3


def test_a_restart_of_a_live_node_is_reported_with_its_new_incarnation():
    v1 = first_view("h1")
    v2 = next_view(v1, everyone(ALIVE, "h1", inc=1), "d1", 150.0, T)
    assert v2.changes == (("h1", ALIVE),)
    assert v2.members["h1"] == Member(ALIVE, 1, 100.0)      # alive all along: since unchanged


def test_view_numbers_increase_by_one_per_change():
    v = View()
    seq = [everyone(ALIVE, "h1"), everyone(ALIVE, "h1"),
           [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, ALIVE)})],
           [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)})],
           [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)})],
           [op("d1", {"h1": (1, ALIVE)})],
           [op("d1", {"h1": (1, LEFT)})]]
    numbers, states = [], []
    for k, ops in enumerate(seq):
        v = next_view(v, ops, "d1", float(k), T)
        numbers.append(v.number)
        states.append(state(v, "h1"))
    assert numbers == [1, 1, 2, 3, 3, 4, 5]
    assert states == [ALIVE, ALIVE, SUSPECT, FAILED, FAILED, ALIVE, LEFT]


# -- next_view after a healed partition: rival views -------------------------------------------

def test_a_view_after_a_healed_partition_is_numbered_past_every_rival():
    v1 = first_view("h1", "h2")
    ops = everyone(ALIVE, "h1", "h2")
    twin = View(3, "d3", dict(v1.members), ())             # a fork that agrees on everything
    v = next_view(v1, ops, "d1", 200.0, T, rivals=[twin])
    assert (v.number, v.leader, v.changes) == (4, "d1", ())  # a rival always makes a view
    assert v.members == v1.members
    v = next_view(v1, ops, "d1", 200.0, T, rivals=[twin, View(7, "d4", dict(v1.members))])
    assert v.number == 8
    behind = View(0, "d5")                                  # numbered below ours: one past ours
    assert next_view(v1, ops, "d1", 200.0, T, rivals=[behind]).number == 2
    # Our own previous view is no rival of itself.
    assert next_view(v1, ops, "d1", 200.0, T, rivals=[v1]) is v1


def test_changes_also_name_what_a_rivals_subscribers_believe_differently():
    v1 = first_view("h1", "h2", "h3")
    ops = everyone(ALIVE, "h1", "h2", "h3")
    rival = View(5, "d3", {"h1": Member(ALIVE, 0, 100.0), "h2": Member(FAILED, 0, 150.0),
                           "h3": Member(LEFT, 0, 150.0)}, (("h2", FAILED), ("h3", LEFT)))
    v = next_view(v1, ops, "d1", 200.0, T, rivals=[rival])
    assert v.number == 6
    assert v.changes == (("h2", RECOVERED), ("h3", ALIVE))
    assert v.members["h1"] is v1.members["h1"]
    assert v.members["h2"] == v.members["h3"] == Member(ALIVE, 0, 100.0)   # alive all along
    # "recovered" wins when any rival had the node failed.
    suspect = View(6, "d4", {**rival.members, "h2": Member(SUSPECT, 0, 150.0)})
    v = next_view(v1, ops, "d1", 200.0, T, rivals=[suspect, rival])
    assert dict(v.changes)["h2"] == RECOVERED and v.number == 7
    # A change against our own previous view is reported as usual.
    ops = [op("d1", {"h1": (0, SUSPECT)}), op("d2", {"h1": (0, SUSPECT)}), op("d3")]
    v = next_view(v1, ops, "d1", 200.0, T, rivals=[rival])
    assert dict(v.changes)["h1"] == FAILED


def test_a_host_known_only_to_a_rival_is_not_carried_into_the_view():
    v1 = first_view("h1")
    rival = View(4, "d3", {"h1": Member(ALIVE, 0, 100.0), "x": Member(FAILED, 0, 150.0)})
    v = next_view(v1, everyone(ALIVE, "h1"), "d1", 200.0, T, rivals=[rival])
    assert v.number == 5 and "x" not in v.members


# -- hypothesis: the agreement rule, step after step -----------------------------------------------

DETS = ("d1", "d2", "d3", "d4", "d5")
HOSTS = ("h1", "h2", "h3")
node_entries = st.tuples(st.integers(0, 2), st.sampled_from((ALIVE, SUSPECT, LEFT)))
opinion_sets = st.dictionaries(
    st.sampled_from(DETS),
    st.tuples(st.booleans(), st.dictionaries(st.sampled_from(HOSTS), node_entries)),
    max_size=5,
).map(lambda d: [op(name, nodes, healthy=ok) for name, (ok, nodes) in sorted(d.items())])
# None repeats the previous step's opinions (to exercise stickiness and fixpoints).
steps = st.lists(st.tuples(st.none() | opinion_sets, st.sampled_from((0.0, 1.0, 10.0, 31.0))),
                 min_size=1, max_size=25)


def check_step(prev, new, ops, wall):
    """Every property one step of next_view must have."""
    if new is prev:
        return
    assert new.number == prev.number + 1 and new.leader == "L"
    healthy = [o for o in ops if o.healthy]
    need = quorum(len(healthy))
    hosts = [h for h, _ in new.changes]
    assert len(hosts) == len(set(hosts))
    assert new.changes or new.members.keys() != prev.members.keys()
    for host, m in new.members.items():
        old = prev.members.get(host)
        seen = [o.nodes[host] for o in ops if host in o.nodes]
        # The view never goes back in incarnation, and it knows the newest one.
        assert m.incarnation == max([i for i, _ in seen] + ([old.incarnation] if old else []))
        if old is not None and old == m:
            assert host not in hosts and m is old          # unchanged members: same object
            continue
        # Every member that differs is listed, with the right event.
        event = dict(new.changes)[host]
        assert (old is None) or (old.state, old.incarnation) != (m.state, m.incarnation)
        if old is not None and old.state == FAILED and m.state == ALIVE:
            assert event == RECOVERED
        else:
            assert event == m.state
        assert m.since == (old.since if old is not None and old.state == m.state else wall)
        # Failed only by a quorum of healthy suspicions of its newest incarnation.
        suspects = sum(1 for o in healthy if o.nodes.get(host, (-1, ""))[1] == SUSPECT
                       and o.nodes[host][0] >= m.incarnation)
        if m.state == FAILED and not (old is not None and old.state == FAILED):
            assert healthy and suspects >= need
        # Left only on somebody's word (or already left, now at a newer incarnation).
        if m.state == LEFT and not (old is not None and old.state == LEFT):
            assert any(st_ == LEFT and i >= m.incarnation for i, st_ in seen)
        # Alive -- joined, recovered, refuted -- only on somebody's word; a member that was
        # alive stays alive (at the newest incarnation) while no healthy detector suspects it.
        if m.state == ALIVE:
            assert suspects == 0
            if not (old is not None and old.state == ALIVE):
                assert any(st_ == ALIVE and i >= m.incarnation for i, st_ in seen)
        # Suspect only on a healthy minority's word (or already suspect).
        if m.state == SUSPECT and not (old is not None and old.state == SUSPECT):
            assert 0 < suspects < need
    for host in prev.members.keys() - new.members.keys():
        old = prev.members[host]
        assert old.state in (FAILED, LEFT) and wall - old.since > T
        assert host not in hosts
    for host in hosts:
        assert host in new.members


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_next_view_keeps_its_promises_step_after_step(plan):
    view, ops, wall = View(), [], 1000.0
    for new_ops, dt in plan:
        ops = ops if new_ops is None else new_ops
        wall += dt
        new = next_view(view, ops, "L", wall, T)
        check_step(view, new, ops, wall)
        dropped = view.members.keys() - new.members.keys()
        if not dropped:
            # Nothing left the view: the same input again changes nothing.
            assert next_view(new, ops, "L", wall, T) is new
        # Failed stays failed while no healthy detector has changed its mind about it.
        for host, m in view.members.items():
            if m.state == FAILED and host in new.members and new.members[host].state != FAILED:
                assert new.members[host].state in (LEFT, ALIVE)
        view = new


# -- followers and answers -------------------------------------------------------------------------

def test_a_follower_only_moves_forward():
    f = ViewFollower()
    assert f.view == View() and f.view.number == 0
    v1, v3 = View(1, "d1"), View(3, "d2")
    assert f.offer(View(0, "d9")) is False
    assert f.offer(v1) is True and f.view is v1
    assert f.offer(View(1, "d2")) is False and f.view is v1   # same number: first one wins
    assert f.offer(v3) is True and f.view is v3
    assert f.offer(View(2, "d1")) is False and f.view is v3
    # What it did not follow and never accepted is a fork's view: a rival.
    assert f.rivals == {"d2": View(1, "d2"), "d1": View(2, "d1")}


def test_a_follower_remembers_its_lineage_to_tell_forks_apart():
    f = ViewFollower(memory=3)
    assert f.known(0, "anybody")                              # the empty view is everybody's
    assert not f.known(1, "d1")
    f.offer(View(1, "d1"))
    assert f.known(1, "d1") and not f.known(1, "d2")          # same number, other leader: a fork
    f.offer(View(1, "d2"))                                    # refused, so not remembered
    assert not f.known(1, "d2")
    assert f.rivals == {"d2": View(1, "d2")}
    f.settled((1, "d2"))                                      # reconciled: known, no rival
    assert f.rivals == {} and f.known(1, "d2")
    f.settled((4, "d3"))                                      # known...
    assert f.known(4, "d3") and f.view.number == 1            # ...but not followed
    f.offer(View(2, "d1"))
    f.offer(View(3, "d1"))
    assert not f.known(1, "d1")                               # the oldest fell out of memory
    assert f.known(4, "d3") and f.known(2, "d1") and f.known(3, "d1")


def test_a_newer_view_that_does_not_continue_ours_makes_ours_a_rival():
    f = ViewFollower()
    v1 = View(1, "d1")
    f.offer(v1)
    v2 = View(2, "d2", prev=(1, "d1"))                   # a new leader continues our sequence
    assert f.offer(v2) and f.rivals == {}
    fork = View(5, "d3", prev=(4, "d3"))                 # the other side of a partition
    assert f.offer(fork) and f.view is fork
    assert f.rivals == {"d2": v2}                         # our subscribers were told v2
    # The view that reconciles both settles the rival, and counts it as known.
    joined = View(6, "d2", prev=(5, "d3"), merged=((2, "d2"),))
    assert f.offer(joined) and f.rivals == {} and f.known(2, "d2")
    # A fork that already merged the view we hold is no fork of it.
    g = ViewFollower()
    g.offer(v2)
    assert g.offer(View(7, "d3", prev=(6, "d3"), merged=((2, "d2"),))) and g.rivals == {}


def test_whoever_leads_after_a_partition_tells_each_side_what_changed():
    """d1, d2 (with h1, h2) and d3 (with h3) are cut apart; each side fails the other's
    nodes, side d3 in more views.  After the heal d1 is starved, so d2 leads: it never
    led during the partition, yet its next view must say h3 ``recovered`` to d1's and
    d2's subscribers and h1, h2 ``recovered`` to d3's (the flake that found this)."""
    hosts = ("h1", "h2", "h3")
    base = next_view(View(), everyone(ALIVE, *hosts), "d1", 100.0, T)
    f = {d: ViewFollower() for d in ("d1", "d2", "d3")}
    for x in f.values():
        x.offer(base)
    # Side {d1, d2}: h3 suspect, then failed.
    a1 = next_view(base, [op("d1", {"h1": (0, ALIVE), "h2": (0, ALIVE), "h3": (0, SUSPECT)}),
                          op("d2", {"h1": (0, ALIVE), "h2": (0, ALIVE), "h3": (0, ALIVE)})],
                   "d1", 110.0, T)
    a2 = next_view(a1, [op(d, {"h1": (0, ALIVE), "h2": (0, ALIVE), "h3": (0, SUSPECT)})
                        for d in ("d1", "d2")], "d1", 111.0, T)
    assert state(a2, "h3") == FAILED
    # Side {d3}: h1 failed, then h2 failed, then a third view (h3 restarted).
    c1 = next_view(base, [op("d3", {"h1": (0, SUSPECT), "h2": (0, ALIVE), "h3": (0, ALIVE)})],
                   "d3", 110.0, T)
    c2 = next_view(c1, [op("d3", {"h1": (0, SUSPECT), "h2": (0, SUSPECT), "h3": (0, ALIVE)})],
                   "d3", 111.0, T)
    c3 = next_view(c2, [op("d3", {"h1": (0, SUSPECT), "h2": (0, SUSPECT), "h3": (1, ALIVE)})],
                   "d3", 112.0, T)
    assert c3.number > a2.number
    for v in (a1, a2):
        f["d1"].offer(v)
        f["d2"].offer(v)
    for v in (c1, c2, c3):
        f["d3"].offer(v)
    # The heal: each side hears the other's latest view.
    for d in ("d1", "d2"):
        assert f[d].offer(c3) and f[d].rivals == {"d1": a2}
    assert not f["d3"].offer(a2) and f["d3"].rivals == {"d1": a2}
    # d2 leads (d1 is starved) and every node is alive again.
    alive = [op(d, {"h1": (0, ALIVE), "h2": (0, ALIVE), "h3": (1, ALIVE)}) for d in ("d2", "d3")]
    healed = next_view(f["d2"].view, alive, "d2", 120.0, T, f["d2"].rivals.values())
    assert dict(healed.changes) == {"h1": RECOVERED, "h2": RECOVERED, "h3": RECOVERED}
    assert healed.merged == ((a2.number, "d1"),) and healed.prev == c3.id
    for x in f.values():
        assert x.offer(healed) and x.rivals == {}


def reply(payload):
    return SimpleNamespace(payload=payload)


def status(name, view):
    return {"detector": name, "healthy": True, "health": 0, "leader": "d1",
            "detectors": ["d1", "d2"], "view": view.payload()}


def test_best_answer_picks_the_newest_valid_view():
    v3 = View(3, "d1", {"h1": Member(ALIVE, 0, 1.0)}, (("h1", ALIVE),))
    v5 = View(5, "d2", {"h1": Member(FAILED, 0, 9.0)}, (("h1", FAILED),))
    a, b, c = status("d1", v3), status("d2", v5), status("d3", v5)
    replies = [reply(None), reply([1, 2]), reply({"detector": "x"}), reply({"view": "v"}),
               reply({"view": {**v5.payload(), "view": 99, "members": 1}}),
               reply(a), reply(b), reply(c)]
    view, answer = best_answer(replies)
    assert view == v5 and answer is b                         # ties: the first one
    assert best_answer([reply(a)]) == (v3, a)
    assert best_answer(iter([reply(a), reply(b)]))[1] is b
    assert best_answer([]) is None
    assert best_answer([reply(None), reply({"view": None}), reply("x")]) is None
