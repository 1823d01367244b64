"""The lease table (registry/leases.py), a pure core driven with explicit times.

Proves that grants are capped at ``max_duration``; re-granting the same
(holder, id) is a renewal that moves the expiry and may change channel and
type; release and release_holder remove exactly what they should; ``expire(now)``
returns the due leases in expiry order and only those; ``matching`` covers
element-wise; the per-holder limit raises OverflowError (renewals do not count).
A hypothesis state machine runs random operation sequences against a plain
dict model and checks every observable answer and the indexes after each step,
and that ``generation`` (which the router's match caches are keyed on) moves
whenever the set of leases or their channel/type changes.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from psepr.channel import parse
from registry.leases import LeaseTable

A, AB, ABC, ABX = parse("/a/"), parse("/a/b/"), parse("/a/b/c/"), parse("/a/bc/")


def ids(leases) -> list[str]:
    return [lease.id for lease in leases]


# -- grant, cap, renewal ---------------------------------------------------------------

def test_grant_returns_the_lease_with_its_expiry():
    t = LeaseTable(max_duration=3600)
    lease = t.grant("h", "l1", AB, "hb", 120, now=1000.0)
    assert (lease.holder, lease.id, lease.channel, lease.type) == ("h", "l1", AB, "hb")
    assert lease.granted == 120.0
    assert lease.expires == 1120.0
    assert t.get("h", "l1") is lease
    assert len(t) == 1
    assert t.next_expiry() == 1120.0


def test_grant_is_capped_at_max_duration():
    t = LeaseTable(max_duration=60)
    lease = t.grant("h", "l1", AB, None, 10_000, now=5.0)
    assert lease.granted == 60.0
    assert lease.expires == 65.0


def test_renewal_by_same_id_moves_expiry_without_adding_a_lease():
    t = LeaseTable()
    first = t.grant("h", "l1", AB, None, 10, now=0.0)
    again = t.grant("h", "l1", AB, None, 10, now=8.0)
    assert again is first
    assert again.expires == 18.0
    assert len(t) == 1
    assert t.expire(10.0) == []            # the old expiry no longer applies
    assert ids(t.expire(18.0)) == ["l1"]


def test_renewal_can_change_channel_and_type():
    t = LeaseTable()
    t.grant("h", "l1", AB, "hb", 10, now=0.0)
    lease = t.grant("h", "l1", parse("/x/"), "load", 10, now=1.0)
    assert lease.channel == parse("/x/") and lease.type == "load"
    assert list(t.matching(ABC)) == []
    assert ids(t.matching(parse("/x/y/"))) == ["l1"]
    assert "/a/b/" not in t.by_channel


def test_same_id_for_different_holders_are_different_leases():
    t = LeaseTable()
    t.grant("h1", "l", AB, None, 10, now=0.0)
    t.grant("h2", "l", AB, None, 20, now=0.0)
    assert len(t) == 2
    assert t.get("h1", "l").expires == 10.0
    assert t.get("h2", "l").expires == 20.0


# -- release ----------------------------------------------------------------------------

def test_release_removes_one_lease():
    t = LeaseTable()
    t.grant("h", "l1", AB, None, 10, now=0.0)
    t.grant("h", "l2", AB, None, 10, now=0.0)
    assert t.release("h", "l1").id == "l1"
    assert t.get("h", "l1") is None
    assert ids(t.matching(AB)) == ["l2"]
    assert ids(t.expire(100.0)) == ["l2"]


def test_release_of_an_unknown_lease_returns_none():
    t = LeaseTable()
    assert t.release("h", "nope") is None
    t.grant("h", "l1", AB, None, 10, now=0.0)
    assert t.release("other", "l1") is None
    assert len(t) == 1


def test_release_holder_removes_every_lease_of_that_holder_only():
    t = LeaseTable()
    for lid in ("l1", "l2", "l3"):
        t.grant("h", lid, AB, None, 10, now=0.0)
    t.grant("k", "l1", AB, None, 10, now=0.0)
    assert sorted(ids(t.release_holder("h"))) == ["l1", "l2", "l3"]
    assert t.holder_leases("h") == []
    assert [(x.holder, x.id) for x in t.matching(AB)] == [("k", "l1")]
    assert t.release_holder("h") == []


def test_released_channel_leaves_no_empty_index_entry():
    t = LeaseTable()
    t.grant("h", "l1", AB, None, 10, now=0.0)
    t.release("h", "l1")
    assert t.by_channel == {}
    assert t.next_expiry() is None


# -- expiry -------------------------------------------------------------------------------

def test_expire_returns_due_leases_in_expiry_order_and_only_those():
    t = LeaseTable()
    t.grant("h", "late", AB, None, 30, now=0.0)
    t.grant("h", "early", AB, None, 10, now=0.0)
    t.grant("h", "mid", A, None, 20, now=0.0)
    t.grant("h", "never", A, None, 100, now=0.0)
    assert t.expire(9.99) == []
    assert ids(t.expire(30.0)) == ["early", "mid", "late"]
    assert ids(t.holder_leases("h")) == ["never"]
    assert t.next_expiry() == 100.0


def test_leases_expiring_at_the_same_time_come_out_in_grant_order():
    t = LeaseTable()
    for lid in ("c", "a", "b"):
        t.grant("h", lid, AB, None, 5, now=0.0)
    assert ids(t.expire(5.0)) == ["c", "a", "b"]


def test_expire_is_inclusive_of_now():
    t = LeaseTable()
    t.grant("h", "l1", AB, None, 10, now=0.0)
    assert ids(t.expire(10.0)) == ["l1"]


# -- matching -------------------------------------------------------------------------------

def test_matching_covers_element_wise():
    t = LeaseTable()
    t.grant("h", "root", parse("/"), None, 10, now=0.0)
    t.grant("h", "a", A, None, 10, now=0.0)
    t.grant("h", "ab", AB, None, 10, now=0.0)
    t.grant("h", "abc", ABC, None, 10, now=0.0)
    t.grant("h", "abx", ABX, None, 10, now=0.0)
    assert ids(t.matching(ABC)) == ["root", "a", "ab", "abc"]
    assert ids(t.matching(AB)) == ["root", "a", "ab"]
    assert ids(t.matching(ABX)) == ["root", "a", "abx"]
    assert ids(t.matching(parse("/ab/"))) == ["root"]


def test_matching_ignores_type_filters():
    t = LeaseTable()
    t.grant("h", "typed", AB, "hb", 10, now=0.0)
    assert ids(t.matching(AB)) == ["typed"]


# -- limits -----------------------------------------------------------------------------------

def test_per_holder_limit_raises_overflow_error():
    t = LeaseTable(max_per_holder=2)
    t.grant("h", "l1", AB, None, 10, now=0.0)
    t.grant("h", "l2", AB, None, 10, now=0.0)
    with pytest.raises(OverflowError) as info:
        t.grant("h", "l3", AB, None, 10, now=0.0)
    assert "2" in str(info.value)
    assert len(t) == 2
    # renewals and other holders are unaffected
    assert t.grant("h", "l1", A, None, 10, now=1.0).channel == A
    assert t.grant("k", "l3", AB, None, 10, now=0.0).id == "l3"


def test_limit_frees_up_after_release():
    t = LeaseTable(max_per_holder=1)
    t.grant("h", "l1", AB, None, 10, now=0.0)
    t.release("h", "l1")
    assert t.grant("h", "l2", AB, None, 10, now=0.0).id == "l2"


# -- model-based state machine -------------------------------------------------------------------

HOLDERS = st.sampled_from(["h1", "h2", "h3"])
LEASE_IDS = st.sampled_from(["a", "b", "c", "d"])
CHANNELS = st.sampled_from(["/", "/a/", "/a/b/", "/a/b/c/", "/a/bc/", "/z/"]).map(parse)
TYPES = st.sampled_from([None, "hb", "load"])
MAX_DURATION = 50.0
PER_HOLDER = 3


class LeaseTableMachine(RuleBasedStateMachine):
    """Random grants, renewals, releases, expiries and clock steps vs a dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LeaseTable(max_duration=MAX_DURATION, max_per_holder=PER_HOLDER)
        self.now = 0.0
        self.seq = 0
        # (holder, id) -> (channel, type, expires, seq)
        self.model: dict[tuple, tuple] = {}

    @rule(holder=HOLDERS, lid=LEASE_IDS, channel=CHANNELS, typ=TYPES,
          duration=st.sampled_from([1.0, 2.5, 5.0, 10.0, 49.0, 50.0, 80.0]))
    def grant(self, holder, lid, channel, typ, duration):
        key = (holder, lid)
        mine = sum(1 for h, _ in self.model if h == holder)
        if key not in self.model and mine >= PER_HOLDER:
            with pytest.raises(OverflowError):
                self.table.grant(holder, lid, channel, typ, duration, self.now)
            return
        gen = self.table.generation
        lease = self.table.grant(holder, lid, channel, typ, duration, self.now)
        old = self.model.get(key)
        if old is None or old[:2] != (channel, typ):
            # who matches what changed: caches keyed on the generation must see it
            assert self.table.generation > gen
        granted = min(duration, MAX_DURATION)
        assert lease.granted == granted
        self.seq += 1
        self.model[key] = (channel, typ, self.now + granted, self.seq)

    @rule(holder=HOLDERS, lid=LEASE_IDS)
    def release(self, holder, lid):
        gen = self.table.generation
        got = self.table.release(holder, lid)
        expected = self.model.pop((holder, lid), None)
        if got is not None:
            assert self.table.generation > gen
        assert (got is None) == (expected is None)
        if got is not None:
            assert (got.channel, got.type) == expected[:2]

    @rule(holder=HOLDERS)
    def release_holder(self, holder):
        got = sorted(lease.id for lease in self.table.release_holder(holder))
        expected = sorted(lid for h, lid in self.model if h == holder)
        for lid in expected:
            del self.model[(holder, lid)]
        assert got == expected

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0, 30.0]))
    def advance_and_expire(self, dt):
        self.now += dt
        gen = self.table.generation
        got = [(lease.holder, lease.id) for lease in self.table.expire(self.now)]
        assert (self.table.generation > gen) == bool(got)
        due = sorted((v[2], v[3], k) for k, v in self.model.items() if v[2] <= self.now)
        assert got == [k for _, _, k in due]
        for k in got:
            del self.model[k]

    @rule(channel=CHANNELS)
    def matching(self, channel):
        got = sorted((lease.holder, lease.id) for lease in self.table.matching(channel))
        expected = sorted(k for k, v in self.model.items() if v[0].covers(channel))
        assert got == expected

    @precondition(lambda self: self.model)
    @rule()
    def next_expiry(self):
        assert self.table.next_expiry() == min(v[2] for v in self.model.values())

    @invariant()
    def indexes_agree_with_model(self):
        assert len(self.table) == len(self.model)
        for (holder, lid), (channel, typ, expires, _) in self.model.items():
            lease = self.table.get(holder, lid)
            assert lease is not None
            assert (lease.channel, lease.type, lease.expires) == (channel, typ, expires)
        indexed = sorted((x.holder, x.id, text) for text, lst in self.table.by_channel.items()
                         for x in lst)
        assert indexed == sorted((h, lid, v[0].text) for (h, lid), v in self.model.items())
        assert all(self.table.by_channel.values())   # no empty lists left behind
        for holder in ("h1", "h2", "h3"):
            assert sorted(ids(self.table.holder_leases(holder))) == sorted(
                lid for h, lid in self.model if h == holder)


LeaseTableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                               deadline=None)
TestLeaseTableMachine = LeaseTableMachine.TestCase
