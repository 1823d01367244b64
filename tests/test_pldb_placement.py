"""Monitor announcements (pldb/peers.py) and placement decisions (pldb/placement.py).

Pure cores: a manual clock and seeded random generators; a small simulation of
several supervisors sharing one announcement table checks that they converge
on k monitors per channel without talking to each other.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psepr.channel import parse
from psepr.errors import ConfigError, EventError
from pldb.config import PLDBConfig
from pldb.peers import (FILLING, MAX_TTL, READY, STOPPED, MonitorInfo, PeerTable,
                        parse_announcement)
from pldb.placement import START, STOP, Placement, replicas_for, surplus

A = parse("/example.com/a/")
B = parse("/example.com/b/")


def info(id, host, root=A, state=READY, until=10.0):
    return MonitorInfo(id, host, root, state, 0, until)


def test_announcements_parse_and_refuse_garbage():
    m = parse_announcement({"monitor": "m1", "host": "h", "root": A.text, "state": "ready",
                            "ttl": 2.0, "tuples": 5}, now=100.0)
    assert (m.id, m.host, m.root, m.state, m.tuples, m.until) == ("m1", "h", A, READY, 5, 102.0)
    assert parse_announcement(m.announcement(2.0), now=100.0) == m
    for bad, what in [([], "JSON object"), ({"monitor": "m"}, "host"),
                      ({"monitor": "m", "host": "h", "root": "nope", "state": "ready", "ttl": 1},
                       "bad root"),
                      ({"monitor": "m", "host": "h", "root": A.text, "state": "dead", "ttl": 1},
                       "unknown state"),
                      ({"monitor": "m", "host": "h", "root": A.text, "state": "ready", "ttl": -1},
                       "ttl"),
                      # A ghost that would never expire, counted as a replica for good.
                      ({"monitor": "m", "host": "h", "root": A.text, "state": "ready",
                        "ttl": 1e300}, "ttl must be a positive number of seconds, at most 300"),
                      ({"monitor": "m", "host": "h", "root": A.text, "state": "ready", "ttl": 1,
                        "tuples": "many"}, "tuples")]:
        with pytest.raises(EventError) as exc:
            parse_announcement(bad, now=0.0)
        assert what in str(exc.value)


def test_pldb_config_refuses_what_its_peers_would_refuse_or_misuse():
    assert PLDBConfig.preset("wan").announce_ttl <= MAX_TTL
    with pytest.raises(ConfigError, match="announce_ttl must be at most 300 s"):
        PLDBConfig(announce_ttl=301.0)
    with pytest.raises(ConfigError, match="PLDB setting batch must be a positive whole number"):
        PLDBConfig(batch=0)


def test_a_supervisor_names_a_monitor_under_its_host_name_it_did_not_start(tmp_path):
    # Two machines under one name (cloned images) hold fewer replicas than k between
    # them, since replicas go to distinct names: say so, once a minute per monitor.
    from pldb.supervisor import Supervisor
    sup = Supervisor("tcp://127.0.0.1:9", [A.text], 2, host="h1", data_dir=tmp_path,
                     config=PLDBConfig.preset("local"))
    t0 = sup._started
    sup.table.heard(info("h1~aaaaaa", "h1", until=t0 + 100))      # not this supervisor's
    sup.table.heard(info("h2~bbbbbb", "h2", until=t0 + 100))
    assert sup.impostors(t0 + 1.0) == []      # its own previous run's may linger at first
    assert [m.id for m in sup.impostors(t0 + 4.0)] == ["h1~aaaaaa"]
    assert sup.impostors(t0 + 30.0) == []                         # once a minute
    assert [m.id for m in sup.impostors(t0 + 64.5)] == ["h1~aaaaaa"]
    sup._ran.add("h1~cccccc")        # one this supervisor started (or is stopping)
    sup.table.heard(info("h1~cccccc", "h1", until=t0 + 200))
    assert [m.id for m in sup.impostors(t0 + 130.0)] == ["h1~aaaaaa"]     # not cccccc


def test_peer_table_expires_soft_state_and_forgets_stopped_monitors():
    t = PeerTable()
    t.heard(info("m1", "h1", until=5.0))
    t.heard(info("m2", "h2", until=8.0))
    t.heard(info("m3", "h3", root=parse("/example.com/"), until=8.0))
    t.heard(info("m4", "h4", state=FILLING, until=8.0))
    assert [m.id for m in t.live_on(A)] == ["m1", "m2", "m4"]
    assert sorted(m.id for m in t.ready_covering(parse("/example.com/a/x/"))) == ["m1", "m2", "m3"]
    assert [m.id for m in t.expire(now=6.0)] == ["m1"]
    t.heard(info("m2", "h2", state=STOPPED))
    assert [m.id for m in t.all()] == ["m3", "m4"]


def test_replicas_for_follows_the_availability_formula():
    # A = 1 - q p^k: p = 0.1, q = 1 -> 0.9, 0.99, 0.999 for k = 1, 2, 3
    assert replicas_for(10, 0.999, p=0.1) == 3
    assert replicas_for(10, 0.9999, p=0.1) == 4
    assert replicas_for(10, 0.99, p=0.1) == 2
    assert replicas_for(10, 0.999, p=0.1, q=0.01) == 1      # rarely asked: one suffices
    assert replicas_for(2, 0.999999, p=0.1) == 2             # never more than the hosts
    assert replicas_for(10, 0.999, p=0.5) == 10
    with pytest.raises(ValueError):
        replicas_for(3, 1.0)


@settings(max_examples=200)
@given(st.integers(1, 50), st.floats(0.5, 0.999999), st.floats(0.01, 0.9),
       st.floats(0.001, 1.0))
def test_replicas_for_is_the_smallest_k_reaching_the_target(hosts, a, p, q):
    k = replicas_for(hosts, a, p, q)
    assert 1 <= k <= hosts
    if k < hosts:
        assert 1 - q * p ** k >= a - 1e-9
    if k > 1:
        assert 1 - q * p ** (k - 1) < a + 1e-9


def test_surplus_keeps_ready_monitors_first_then_lowest_ids():
    live = [info("c", "h3"), info("a", "h1", state=FILLING), info("b", "h2")]
    assert [m.id for m in surplus(live, 2)] == ["a"]
    assert surplus(live, 3) == []


def test_a_start_waits_for_its_back_off_and_is_dropped_when_the_gap_closes():
    p = Placement("h1", [A], backoff=1.0, rng=random.Random(1))
    table = PeerTable()
    assert p.decide(table, {}, k=1, now=0.0) == []            # back-off drawn
    table.heard(info("other", "h2", until=100.0))             # someone else filled the gap
    assert p.decide(table, {}, k=1, now=5.0) == []
    table.expire(now=200.0)
    assert p.decide(table, {}, k=1, now=200.0) == []          # a new back-off
    acts = p.decide(table, {}, k=1, now=201.0)
    assert [(a.kind, a.root) for a in acts] == [(START, A)]


def test_no_second_monitor_on_a_host_that_has_one():
    p = Placement("h1", [A], backoff=0.0, rng=random.Random(1))
    table = PeerTable()
    table.heard(info("mine-elsewhere", "h1"))
    for now in (0.0, 1.0):
        assert p.decide(table, {}, k=3, now=now) == []


def test_surplus_monitor_stops_after_back_off():
    p = Placement("h3", [A], backoff=1.0, rng=random.Random(2))
    table = PeerTable()
    for i in (1, 2, 3):
        table.heard(info(f"m{i}", f"h{i}", until=100.0))
    local = {A: "m3"}
    assert p.decide(table, local, k=2, now=0.0) == []
    acts = p.decide(table, local, k=2, now=3.0)
    assert [(a.kind, a.root) for a in acts] == [(STOP, A)]
    p1 = Placement("h1", [A], backoff=1.0, rng=random.Random(2))
    assert p1.decide(table, {A: "m1"}, k=2, now=0.0) == []
    assert p1.decide(table, {A: "m1"}, k=2, now=3.0) == []     # m1 is kept: not surplus


def simulate(hosts: int, roots: list, k: int, seed: int, rounds: int = 400,
             delay: int = 2, dead: frozenset = frozenset()) -> dict:
    """Supervisors acting on a shared table whose announcements arrive ``delay`` rounds late.

    Returns:
        ``{root: [hosts running a monitor]}`` at the end.
    """
    rng = random.Random(seed)
    sups = {f"h{i}": Placement(f"h{i}", roots, backoff=3.0, rng=random.Random(rng.random()))
            for i in range(hosts) if f"h{i}" not in dead}
    local: dict[str, dict] = {h: {} for h in sups}
    pending: list = []              # (round it becomes visible, MonitorInfo or None to remove)
    table = PeerTable()
    for now in range(rounds):
        for when, item in [x for x in pending if x[0] <= now]:
            pending.remove((when, item))
            table.heard(item)
        for h in local:             # every live monitor re-announces
            for root, mid in local[h].items():
                pending.append((now + delay, MonitorInfo(mid, h, root, READY, 0, 1e9)))
        for h, sup in sups.items():
            for act in sup.decide(table, local[h], k, float(now)):
                if act.kind == START:
                    local[h][act.root] = f"{h}:{act.root.text}"
                else:
                    mid = local[h].pop(act.root)
                    pending.append((now + delay, MonitorInfo(mid, h, act.root, STOPPED, 0, 0)))
    return {root: sorted(h for h in local if root in local[h]) for root in roots}


@pytest.mark.parametrize("seed", range(8))
def test_independent_supervisors_converge_on_k_per_channel(seed):
    roots = [parse(f"/example.com/c{i}/") for i in range(10)]
    placed = simulate(hosts=4, roots=roots, k=3, seed=seed)
    assert all(len(hosts) == 3 for hosts in placed.values()), placed
