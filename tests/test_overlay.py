"""The overlay's pure cores, driven as a cluster over an in-memory transport.

No sockets and no clock: every router is a RouterCore with its OverlayCore;
``Net.pump`` carries each ``take_out()`` message to the other end of its link
until nothing moves.  Proves, for registry/interest.py, registry/linkstate.py
and routers/overlay.py:

* aggregation: a lease covered by a broader local lease is not advertised;
  releasing the broad one re-advertises what it covered; inbox leases are not
  covered by a lease above the inbox;
* the interest table applies deltas in sequence, reports gaps, drops a router;
* shortest paths use links both ends advertise; ties break by name;
* chain, ring and star: an event reaches exactly the routers with interest,
  once; routers without interest see no FORWARD; type filters across routers;
* a link that goes silent is routed around; a router whose adverts stop is
  forgotten with its interest (no ghost interest) and its restart (new epoch)
  replaces it; a second live router under a name in use is refused, whichever
  side dials;
* the lease barrier answers once every reachable router acknowledged;
* bad peer messages are answered with an error and change nothing; a client's
  HELLO on a peer endpoint is told where clients connect;
* a dialed peer that answers nothing is reported after 10 s (once a minute),
  one that refuses is not reported as silent.
"""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from psepr import wire
from psepr.wire import Kind
from registry.interest import APPLIED, GAP, OLD, InterestTable, LocalInterest, covers
from registry.linkstate import Advert, LinkState
from routers.config import RouterConfig
from routers.core import RouterCore
from routers.overlay import SeenCache
from tests.strategies import json_values
from tests.test_router_core import group, send_frames, unpack_deliver


# -- pure pieces --------------------------------------------------------------------

def test_local_interest_aggregates_covered_leases():
    li = LocalInterest()
    assert li.add("/a/b/", None) == ([("/a/b/", None)], [])
    assert li.add("/a/b/c/", "t") == ([], [])              # covered by /a/b/ any type
    assert li.add("/a/", "t") == ([("/a/", "t")], [])       # different type: not covering /a/b/
    added, removed = li.add("/a/", None)
    assert added == [("/a/", None)] and set(removed) == {("/a/", "t"), ("/a/b/", None)}
    assert li.advertised == {("/a/", None)}
    added, removed = li.remove("/a/", None)
    assert removed == [("/a/", None)]
    assert set(added) == {("/a/", "t"), ("/a/b/", None)}
    assert li.advertised == {("/a/", "t"), ("/a/b/", None)}
    assert li.add("/a/b/", None) == ([], [])               # a second lease: counted only
    assert li.remove("/a/b/", None) == ([], [])
    # /a/b/c/ of type t stays covered by /a/ of type t: nothing to re-advertise.
    assert li.remove("/a/b/", None) == ([], [("/a/b/", None)])
    assert li.advertised == {("/a/", "t")}


def test_inbox_leases_are_not_covered_by_broad_leases():
    li = LocalInterest()
    li.add("/x.org/", None)
    assert li.add("/x.org/_inbox/svc/i1/", None) == ([("/x.org/_inbox/svc/i1/", None)], [])
    assert not covers(("/x.org/", None), ("/x.org/_inbox/svc/i1/", None))
    assert covers(("/x.org/_inbox/svc/", None), ("/x.org/_inbox/svc/i1/", None))


def test_local_interest_matches_brute_force_under_random_churn():
    rng = random.Random(7)
    chans = ["/a/", "/a/b/", "/a/b/c/", "/a/d/", "/e/", "/e/f/", "/a/_inbox/p/", "/a/_inbox/p/q/"]
    types = [None, "t1", "t2"]
    li = LocalInterest()
    held: list = []
    for _ in range(2000):
        if held and rng.random() < 0.45:
            pair = held.pop(rng.randrange(len(held)))
            li.remove(*pair)
        else:
            pair = (rng.choice(chans), rng.choice(types))
            held.append(pair)
            li.add(*pair)
        # Invariant: every held pair is covered by (or is) an advertised pair, and
        # no advertised pair is covered by another one.
        adv = li.advertised
        assert all(p in adv or any(covers(a, p) for a in adv) for p in held)
        assert all(not any(covers(b, a) for b in adv if b != a) for a in adv)
        assert adv <= set(held)


def test_seen_cache_refuses_repeats_remembers_the_last_half_and_stays_bounded():
    seen = SeenCache(10)
    assert seen.add(("r1", 1, 0)) and not seen.add(("r1", 1, 0))
    for q in range(1, 1000):
        assert seen.add(("r1", 1, q))
        assert len(seen) <= 10
        # the last five (half the limit) are always remembered
        assert not any(seen.add(("r1", 1, k)) for k in range(max(0, q - 4), q + 1))
    assert seen.add(("r1", 1, 0)), "long forgotten: new again"
    assert seen.add(("r1", 2, 999)), "another epoch is another key"


def test_interest_table_sequences_gaps_and_drop():
    t = InterestTable()
    assert t.apply("r2", 5, 1, False, [("/a/", None)], []) == APPLIED
    assert t.match(("/", "/a/", "/a/b/"), "x") == {"r2"}
    assert t.apply("r2", 5, 1, False, [("/z/", None)], []) == OLD
    assert t.apply("r2", 5, 3, False, [("/z/", None)], []) == GAP
    assert t.apply("r2", 5, 2, False, [("/b/", "t")], [("/a/", None)]) == APPLIED
    assert t.match(("/", "/a/"), None) == set()
    assert t.match(("/", "/b/"), "t") == {"r2"} and t.match(("/", "/b/"), "u") == set()
    assert t.apply("r2", 6, 1, False, [("/c/", None)], []) == APPLIED     # restarted
    assert t.match(("/", "/b/"), "t") == set() and t.match(("/", "/c/"), None) == {"r2"}
    assert t.apply("r2", 6, 9, True, [("/d/", None)], []) == APPLIED      # a full summary
    assert t.full("r2") == (6, 9, [("/d/", None)])
    t.drop("r2")
    assert t.match(("/", "/d/"), None) == set() and t.seq("r2") is None


def test_linkstate_routes_use_two_way_links_and_break_ties_by_name():
    ls = LinkState("a")
    for name, links in {"a": {"b": 1, "c": 1}, "b": {"a": 1, "d": 1}, "c": {"a": 1, "d": 1},
                        "d": {"b": 1, "c": 1, "e": 1}, "e": {}}.items():
        assert ls.accept(Advert(name, 1, 1, links), 0.0)
    assert ls.routes() == {"b": "b", "c": "c", "d": "b"}     # e does not list d: no link
    assert not ls.accept(Advert("d", 1, 1, {}), 0.0)          # not newer
    ls.accept(Advert("b", 1, 2, {"a": 1}), 0.0)
    assert ls.routes() == {"b": "b", "c": "c", "d": "c"}
    assert ls.expire(100.0) == ["b", "c", "d", "e"] and ls.routes() == {}


# -- a cluster over an in-memory transport --------------------------------------------

class Net:
    """Routers by name, links by (dialer, listener), a manual clock."""

    def __init__(self, names, edges, preset="lan", **cfg):
        self.now = 0.0
        self.cores = {}
        for i, n in enumerate(names):
            config = RouterConfig.preset(preset, name=n, authority="x.org",
                                         peer_listen=(f"inproc://{n}",), **cfg)
            self.cores[n] = RouterCore(config, now=self.now, epoch=1000 + i, wall=lambda: 1.0)
        self.cut: set = set()
        self.held: dict = {}          # pair -> messages queued while it is held (in order)
        self.dead: set = set()
        self.sent: list = []          # (from, to, kind) of every peer message carried
        self.client_out: dict = {}    # (router, ident) -> [frames]
        for a, b in edges:
            self.cores[a].overlay.dialed(("d", b), self.now)
        self.pump()

    def _peer_of(self, src, link_id):
        return (link_id[1], ("l", src)) if link_id[0] == "d" else (link_id[1], ("d", src))

    def pump(self, rounds=200):
        for _ in range(rounds):
            moved = False
            for name, core in self.cores.items():
                core.flush(self._client_send(name))
                if name in self.dead:
                    core.overlay.take_out()
                    continue
                for link_id, frames in core.overlay.take_out():
                    dst, their_id = self._peer_of(name, link_id)
                    pair = frozenset((name, dst))
                    if dst in self.dead or pair in self.cut:
                        continue
                    if pair in self.held:     # a partition under a live TCP connection
                        self.held[pair].append((name, dst, their_id, frames))
                        continue
                    self.sent.append((name, dst, frames[0][0]))
                    self.cores[dst].overlay.on_message(their_id, frames, self.now)
                    moved = True
            if not moved:
                return
        raise AssertionError("the overlay did not settle")

    def heal(self, a, b):
        """End a held partition: what queued arrives first, in order, then live traffic."""
        for src, dst, their_id, frames in self.held.pop(frozenset((a, b))):
            self.sent.append((src, dst, frames[0][0]))
            self.cores[dst].overlay.on_message(their_id, frames, self.now)
        self.pump()

    def _client_send(self, router):
        def send(conn, frames):
            self.client_out.setdefault((router, conn.ident), []).append(frames)
            return True
        return send

    def advance(self, seconds, step=0.1):
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + step, 6)
            for name, core in self.cores.items():
                if name not in self.dead:
                    core.tick(self.now)
            self.pump()

    # client helpers
    def hello(self, router, ident, service="svc"):
        self.cores[router].handle(ident, wire.encode(Kind.HELLO, {"v": 1, "service": service,
                                                                  "instance": ident.decode()}),
                                  self.now)
        self.pump()

    def lease(self, router, ident, channel, typ=None, lid="L1", propagated=False):
        h = {"id": lid, "channel": channel, "type": typ, "duration": 600, "req": 1}
        if propagated:
            h["p"] = True
        self.cores[router].handle(ident, wire.encode(Kind.LEASE, h), self.now)
        self.pump()

    def send(self, router, ident, channel, ids, typ=None):
        frames = send_frames(group(channel, ids, [b'{"v":1}'] * len(ids), typ=typ))
        self.cores[router].handle(ident, frames, self.now)
        self.pump()

    def take(self, router, ident, kind=Kind.DELIVER):
        """Messages of ``kind`` the client got since the last take (decoded)."""
        got = self.client_out.pop((router, ident), [])
        keep = [f for f in got if f[0][0] != kind]
        if keep:
            self.client_out[(router, ident)] = keep
        return [wire.decode(f) for f in got if f[0][0] == kind]

    def delivered(self, router, ident):
        return [d.id for _, meta, rest in self.take(router, ident) for d in unpack_deliver(meta, rest)]


def _net_with_clients(names, edges, **kw):
    net = Net(names, edges, **kw)
    for n in names:
        net.hello(n, f"c-{n}".encode())
    net.take_all = lambda: {n: net.delivered(n, f"c-{n}".encode()) for n in names}
    return net


def test_chain_delivers_once_to_interested_routers_only():
    net = _net_with_clients(["a", "b", "c", "d"], [("b", "a"), ("c", "b"), ("d", "c")])
    net.lease("d", b"c-d", "/x.org/app/")
    net.lease("b", b"c-b", "/x.org/app/", typ="only-this")
    net.take_all()
    net.sent.clear()
    net.send("a", b"c-a", "/x.org/app/x/", ["e1", "e2"], typ="t")
    assert net.take_all() == {"a": [], "b": [], "c": [], "d": ["e1", "e2"]}
    forwards = [(s, d) for s, d, k in net.sent if k == Kind.FORWARD]
    assert forwards == [("a", "b"), ("b", "c"), ("c", "d")]
    net.send("d", b"c-d", "/x.org/app/y/", ["e3"], typ="only-this")
    assert net.take_all() == {"a": [], "b": ["e3"], "c": [], "d": ["e3"]}
    # The routers with no interest never see an event bound nowhere.
    net.sent.clear()
    net.send("a", b"c-a", "/x.org/elsewhere/", ["e4"])
    assert not [k for _, _, k in net.sent if k == Kind.FORWARD]


@pytest.mark.parametrize("shape", ["ring", "star", "mesh"])
def test_every_holder_gets_every_event_exactly_once(shape):
    rng = random.Random(3)
    names = [f"r{i}" for i in range(8)]
    if shape == "ring":
        edges = [(names[i], names[i - 1]) for i in range(len(names))]
    elif shape == "star":
        edges = [(n, names[0]) for n in names[1:]]
    else:
        edges = [(names[i], names[rng.randrange(i)]) for i in range(1, len(names))]
        edges += [(a, b) for a, b in (rng.sample(names, 2) for _ in range(6))
                  if (a, b) not in edges and (b, a) not in edges]
    net = _net_with_clients(names, edges)
    holders = {n for n in names if rng.random() < 0.5} | {names[3]}
    for n in holders:
        net.lease(n, f"c-{n}".encode(), "/x.org/app/")
    net.take_all()
    k = 0
    for src in names:
        for _ in range(3):
            k += 1
            net.send(src, f"c-{src}".encode(), f"/x.org/app/{k}/", [f"e{k}"])
    got = net.take_all()
    for n in names:
        want = sorted(f"e{i}" for i in range(1, k + 1)) if n in holders else []
        assert sorted(got[n]) == want, n


def test_silent_link_is_routed_around_and_dead_router_leaves_no_ghost_interest():
    net = _net_with_clients(["a", "b", "c", "d"], [("b", "a"), ("c", "b"), ("d", "c"), ("d", "a")])
    net.lease("c", b"c-c", "/x.org/app/")
    net.take_all()
    net.cut.add(frozenset(("b", "c")))
    net.advance(3.0)                       # > peer_dead_after (1.5 s)
    net.send("a", b"c-a", "/x.org/app/1/", ["e1"])
    assert net.take_all()["c"] == ["e1"]   # via d now
    assert net.cores["a"].overlay.linkstate.routes()["c"] == "d"
    # c dies: its neighbours notice; after lsa_max_age nobody holds its interest.
    net.dead.add("c")
    net.advance(2.0)
    assert "c" not in net.cores["a"].overlay.linkstate.routes()
    net.sent.clear()
    net.send("a", b"c-a", "/x.org/app/2/", ["e2"])
    assert not [k for _, _, k in net.sent if k == Kind.FORWARD]
    net.advance(40.0)
    assert net.cores["a"].overlay.interest.seq("c") is None


def test_a_stopping_router_says_goodbye_and_its_peers_let_it_go_at_once(caplog):
    # A stopped router's peers used to notice only after peer_dead_after of silence
    # (8 s on the wan preset), and logged the planned stop as a failure (WARNING).
    import logging
    net = _net_with_clients(["a", "b", "c"], [("b", "a"), ("c", "b")])
    a, c = net.cores["a"].overlay, net.cores["c"].overlay
    # A goodbye naming another run of b (a former one, say) changes nothing.
    link = a._link_for("b")
    a.on_message(link.id, wire.encode(Kind.PEER_BYE, {"router": "b", "epoch": link.epoch - 1}),
                 net.now)
    assert a._link_for("b") is link and link.up
    caplog.set_level(logging.INFO, logger="psepr.overlay")
    b = net.cores["b"].overlay
    assert b.goodbye() == [("l", "c")]     # c dialed b: its answer is awaited
    out = b.take_out()                     # what b's shell sends as it closes
    net.dead.add("b")
    assert [frames[0][0] for _, frames in out] == [Kind.PEER_BYE] * 2
    for link_id, frames in out:
        dst, their_id = net._peer_of("b", link_id)
        net.cores[dst].overlay.on_message(their_id, frames, net.now)
    net.pump()
    # No time has passed: both peers took their links down on the goodbye alone.
    assert a._link_for("b") is None and c._link_for("b") is None
    assert "b" not in a.linkstate.routes() and "b" not in c.linkstate.routes()
    downs = [r for r in caplog.records if "peer link to b down" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in downs] == [
        (logging.INFO, "peer link to b down: it is stopping (it said goodbye)")] * 2
    # A goodbye on a link that is down already is not answered.
    net.sent.clear()
    a.on_message(link.id, wire.encode(Kind.PEER_BYE, {"router": "b", "epoch": link.epoch}),
                 net.now)
    assert not a.take_out()


def test_restarted_router_replaces_its_former_self():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    net.lease("b", b"c-b", "/x.org/old/")
    assert net.cores["a"].overlay.interest.match(("/", "/x.org/", "/x.org/old/"), None) == {"b"}
    # b restarts: a new core with a larger epoch dials a again.
    config = net.cores["b"].config
    net.cores["b"] = RouterCore(config, now=net.now, epoch=5000, wall=lambda: 1.0)
    net.cores["b"].overlay.dialed(("d", "a"), net.now)
    net.pump()
    net.hello("b", b"c-b")
    net.lease("b", b"c-b", "/x.org/new/")
    a = net.cores["a"].overlay
    assert a.interest.match(("/", "/x.org/", "/x.org/old/"), None) == set()
    assert a.interest.match(("/", "/x.org/", "/x.org/new/"), None) == {"b"}
    net.take_all()
    net.send("a", b"c-a", "/x.org/new/1/", ["e1"])
    assert net.take_all()["b"] == ["e1"]


def _twin(net, key, name, epoch, dials):
    """A second live router called ``name`` (a copied configuration), known to the
    Net as ``key``, dialing ``dials``."""
    config = net.cores[name].config
    net.cores[key] = RouterCore(config, now=net.now, epoch=epoch, wall=lambda: 1.0)
    for d in dials:
        net.cores[key].overlay.dialed(("d", d), net.now)
    net.pump()


def test_a_second_live_router_with_a_taken_name_is_refused():
    net = _net_with_clients(["a", "b"], [("a", "b")])
    # A copy of a's configuration runs elsewhere: same name, a newer run, dials b too.
    # Its hello looks like a's restart, so b takes a's link down; a, alive, says
    # hello again, and b refuses it rather than holding two routers named a.
    _twin(net, "a2", "a", epoch=5000, dials=["b"])
    net.advance(3.0)
    b = net.cores["b"].overlay
    assert [(l.peer, l.epoch) for l in b.links.values() if l.up] == [("a", 5000)]
    assert b.peer_errors > 0
    assert not any(l.up for l in net.cores["a"].overlay.links.values())
    # The overlay has one router called a: the newer run, which gets b's events.
    net.hello("a2", b"c-a2")
    net.lease("a2", b"c-a2", "/x.org/app/")
    net.lease("a", b"c-a", "/x.org/app/")
    net.send("b", b"c-b", "/x.org/app/1/", ["e1"])
    assert net.delivered("a2", b"c-a2") == ["e1"]
    assert net.delivered("a", b"c-a") == []


def test_a_router_dialing_two_routers_of_one_name_links_the_newer_only():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    _twin(net, "a2", "a", epoch=5000, dials=[])
    net.cores["b"].overlay.dialed(("d", "a2"), net.now)
    net.pump()
    net.advance(3.0)
    b = net.cores["b"].overlay
    assert [(l.id, l.epoch) for l in b.links.values() if l.up] == [(("d", "a2"), 5000)]
    assert b.linkstate.routes() == {"a": "a"}


def test_restart_news_in_any_order_keeps_only_the_new_runs_interest():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    a = net.cores["a"].overlay
    link = next(l.id for l in a.links.values() if l.peer == "b")

    def feed(kind, h):
        a.on_message(link, wire.encode(kind, h), net.now)

    def wants(text):
        return a.interest.match(("/", text), None)

    feed(Kind.INTEREST, {"r": "zz", "e": 50, "q": 1, "full": False, "add": [["/old/", None]]})
    feed(Kind.LINKSTATE, {"r": "zz", "e": 50, "q": 1, "n": {}})
    assert wants("/old/") == {"zz"}
    # The restarted run's interest overtakes its link state (another path): kept.
    feed(Kind.INTEREST, {"r": "zz", "e": 99, "q": 1, "full": False, "add": [["/new/", None]]})
    feed(Kind.LINKSTATE, {"r": "zz", "e": 99, "q": 1, "n": {}})
    assert wants("/new/") == {"zz"} and wants("/old/") == set()
    # News of the former run arriving late changes nothing.
    feed(Kind.INTEREST, {"r": "zz", "e": 50, "q": 2, "full": False, "add": [["/late/", None]]})
    assert wants("/late/") == set() and wants("/new/") == {"zz"}


def test_lease_barrier_waits_for_every_reachable_router():
    net = _net_with_clients(["a", "b", "c"], [("b", "a"), ("c", "b")])
    net.lease("c", b"c-c", "/x.org/app/", propagated=True)
    [(_, h, _)] = net.take("c", b"c-c", Kind.LEASED)
    assert h["propagated"] is True and h["granted"] == 600
    assert net.cores["a"].overlay.interest.seq("c") is not None
    # a stops answering: the barrier waits; once b declares a dead (1.5 s), a is
    # unreachable and the barrier completes for every router still reachable.
    net.dead.add("a")
    net.lease("c", b"c-c", "/x.org/other/", lid="L2", propagated=True)
    assert net.take("c", b"c-c", Kind.LEASED) == []
    net.advance(1.8)
    [(_, h, _)] = net.take("c", b"c-c", Kind.LEASED)
    assert h["id"] == "L2" and h["propagated"] is True


def test_lease_barrier_times_out_naming_the_silent_routers():
    net = _net_with_clients(["a", "b", "c"], [("b", "a"), ("c", "b")], barrier_timeout=0.5)
    net.dead.add("a")
    net.lease("c", b"c-c", "/x.org/app/", propagated=True)
    assert net.take("c", b"c-c", Kind.LEASED) == []
    net.advance(0.6)
    [(_, h, _)] = net.take("c", b"c-c", Kind.LEASED)
    assert h["propagated"] is False and h["missing"] == ["a"]


def test_bad_peer_messages_are_answered_and_change_nothing():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    a = net.cores["a"].overlay
    before = dict(a.linkstate.adverts)
    link = ("l", "b")
    for frames in ([b"\x14", b"not json"], [bytes([Kind.LINKSTATE]), b'{"r": 5}'],
                   [bytes([Kind.INTEREST]), orjson.dumps({"r": "b", "e": 1, "q": 9, "full": True,
                                                          "add": [["no-slash", None]]})],
                   [bytes([Kind.FORWARD]), orjson.dumps({"o": "b", "e": 1, "h": 3, "d": ["a"],
                                                         "s": [["x", "y"]], "q": [1]})],
                   [bytes([99]), b"{}"]):
        a.on_message(link, frames, net.now)
    out = a.take_out()
    errors = [wire.decode(f)[1] for _, f in out if f[0][0] == Kind.ERROR]
    assert len(errors) == 5 and all(e["message"] for e in errors)
    assert a.linkstate.adverts == before and a.peer_errors == 5
    # A stranger (no hello) is asked to say hello; a wrong authority is refused.
    a.on_message(("l", "zz"), wire.encode(Kind.PEER_PING, {"t": 0}), net.now)
    a.on_message(("l", "yy"), wire.encode(Kind.PEER_HELLO, {"v": 1, "router": "y", "epoch": 1,
                                                             "authority": "other.org"}), net.now)
    msgs = [wire.decode(f)[1] for _, f in a.take_out()]
    assert msgs[0]["code"] == wire.E_NO_SESSION and "other.org" in msgs[1]["message"]


def test_a_dialed_peer_that_never_answers_is_reported_one_refusing_is_not(caplog):
    net = Net(["a", "b"], [])
    net.dead.add("b")                  # nothing answers at b's endpoint (or CURVE mismatch)
    net.cores["a"].overlay.dialed(("d", "b"), net.now)
    with caplog.at_level("WARNING", logger="psepr.overlay"):
        net.advance(9.5)
        assert "no answer" not in caplog.text
        net.advance(61.0)
    silent = [r.getMessage() for r in caplog.records if "no answer" in r.getMessage()]
    assert len(silent) == 2, silent     # at 10 s, then once a minute
    assert silent[0].startswith("peer b: no answer for 10 s") and "--curve" in silent[0]
    # A peer that refuses the link answers: its refusal is logged, not silence.
    caplog.clear()
    net = Net(["a", "c"], [])
    net.cores["c"].overlay.peer_allowed = lambda name, principal: False
    net.cores["a"].overlay.dialed(("d", "c"), net.now)
    with caplog.at_level("WARNING", logger="psepr.overlay"):
        net.advance(12.0)
    assert "not allowed" in caplog.text and "no answer" not in caplog.text


def test_a_client_saying_hello_on_the_peer_endpoint_is_told_where_clients_go():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    a = net.cores["a"].overlay
    a.on_message(("l", "client"), wire.encode(Kind.HELLO, {"v": 1, "service": "svc"}), net.now)
    [(link, frames)] = a.take_out()
    kind, h, _ = wire.decode(frames)
    assert (link, kind, h["code"]) == (("l", "client"), Kind.ERROR, wire.E_PROTOCOL)
    assert "peer endpoint" in h["message"] and "--listen" in h["message"]
    assert ("l", "client") not in a.links


_VALUES = json_values(["a", "b", "c", "x.org", "/x.org/app/"])
#: Every key some peer message reads, so that handlers get past their first look-up.
_PEER_KEYS = ["v", "router", "epoch", "authority", "t", "r", "e", "q", "n", "iq", "s", "a",
              "full", "add", "del", "ack", "by", "h", "o", "d", "code", "message"]
_PEER_KINDS = [Kind.ERROR, *(k for k in Kind if Kind.PEER_HELLO <= k <= Kind.SYNC)]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(st.tuples(
    st.sampled_from([("l", "b"), ("d", "b"), ("l", "stranger"), ("d", "a")]),
    st.sampled_from(_PEER_KINDS),
    st.dictionaries(st.sampled_from(_PEER_KEYS), _VALUES, max_size=8),
    st.lists(st.binary(max_size=20), max_size=4)), min_size=1, max_size=6))
def test_random_peer_messages_never_reach_the_internal_error_handler(msgs):
    # Every peer message kind with headers of random shape, on a live link, an
    # unknown one and a link that was never dialed, with ticks between: each is
    # refused (or applied) by the handlers' own checks; none raises into the
    # catch-all that keeps a router alive through its own bugs.
    import logging
    net = _net_with_clients(["a", "b"], [("b", "a")])
    a = net.cores["a"]
    records: list = []
    catch = logging.Handler()
    catch.emit = records.append
    logging.getLogger("psepr").addHandler(catch)
    try:
        for link, kind, header, rest in msgs:
            a.overlay.on_message(link, [bytes([kind]), orjson.dumps(header), *rest], net.now)
            net.now += 0.3
            a.tick(net.now)
            a.flush(net._client_send("a"))
            a.overlay.take_out()
    finally:
        logging.getLogger("psepr").removeHandler(catch)
    crashes = [r.getMessage() for r in records if r.exc_info]
    assert not crashes, crashes


@pytest.mark.parametrize("meta", [
    {"s": ["x"], "q": [1]},                     # a segment's sender is not a pair
    {"s": [["x"]], "q": [1]},
    {"s": [["x", 5]], "q": [1]},
    {"s": [["x", "y"]], "q": [[1]]},            # an unhashable sequence number
    {"s": [["x", "y"]], "q": [1], "d": [None]},
    {"s": [["x", "y"]], "q": [1, 2]},           # one q per segment
])
def test_malformed_forwards_are_refused_with_an_error(meta, caplog):
    net = _net_with_clients(["a", "b"], [("b", "a")])
    net.lease("a", b"c-a", "/x.org/app/")
    net.take_all()
    a = net.cores["a"].overlay
    hdr = orjson.dumps({"g": [["/x.org/app/x/", None, None, 1]], "i": ["e1"], "t": [1.0],
                        "f": [0], "l": [2]})
    a.on_message(("l", "b"), [bytes([Kind.FORWARD]),
                              orjson.dumps({"o": "b", "e": 1, "h": 3, "d": ["a"], **meta}),
                              hdr, b"{}"], net.now)
    errors = [wire.decode(f)[1] for _, f in a.take_out() if f[0][0] == Kind.ERROR]
    assert len(errors) == 1 and "forward from b" in errors[0]["message"]
    assert a.peer_errors == 1 and a.forwarded_in == 0
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    net.cores["a"].flush(net._client_send("a"))
    assert net.take("a", b"c-a", Kind.DELIVER) == []


def test_forwards_are_cut_like_delivers():
    net = _net_with_clients(["a", "b"], [("b", "a")])
    net.lease("b", b"c-b", "/x.org/big/")
    net.take_all()
    core = net.cores["a"]
    big = b"x" * 100_000
    for k in range(8):      # eight SEND messages in one turn, 100 kB each
        core.handle(b"c-a", send_frames(group("/x.org/big/", [f"e{k}"], [big])), net.now)
    net.sent.clear()
    sizes = []
    for link_id, frames in (core.flush(net._client_send("a")) or core.overlay.take_out()):
        if frames[0][0] == Kind.FORWARD:
            sizes.append(sum(len(f) for f in frames[3::2]))
            net.cores["b"].overlay.on_message(("d", "a"), frames, net.now)   # b dialed a
    cut = core.config.deliver_bytes
    assert len(sizes) > 1 and all(s <= max(cut, len(big)) for s in sizes), sizes
    net.pump()
    assert sorted(net.delivered("b", b"c-b")) == [f"e{k}" for k in range(8)]


@pytest.mark.parametrize("first_down", ["both", "dialer", "listener"])
def test_a_partition_that_queued_messages_heals_without_a_flap(first_down, caplog):
    # A partition under a live TCP connection: each side's pings, hellos and floods
    # queue, and arrive stale at the heal.  The link comes back once and stays up
    # (stale messages once made the dialer answer "say PEER_HELLO", which the
    # listener took as "your session is lost": a flap), and each side learns what
    # the other's clients leased meanwhile (the floods it dropped while down).
    net = _net_with_clients(["a", "b"], [("a", "b")])       # a dials b
    net.lease("b", b"c-b", "/x.org/app/")
    net.take_all()
    net.held[frozenset(("a", "b"))] = []
    if first_down == "both":
        net.advance(2.0)
    else:
        # One side notices first (its clock runs ahead): it declares the link down
        # while the other still holds it up.
        net.now += 2.0
        net.cores["a" if first_down == "dialer" else "b"].tick(net.now)
        net.pump()
    net.lease("b", b"c-b", "/x.org/new/", lid="L2")
    net.lease("a", b"c-a", "/x.org/back/")
    net.take_all()
    caplog.clear()
    net.heal("a", "b")
    net.advance(3.0)                  # well within lsa_refresh (10 s): no soft-state help
    assert [r.getMessage() for r in caplog.records if "down" in r.getMessage()] == []
    for me, peer in (("a", "b"), ("b", "a")):
        links = [l for l in net.cores[me].overlay.links.values() if l.peer == peer]
        assert [l.up for l in links] == [True], (me, links)
    net.send("a", b"c-a", "/x.org/new/1/", ["e1"])
    net.send("b", b"c-b", "/x.org/back/1/", ["e2"])
    assert net.take_all() == {"a": ["e2"], "b": ["e1"]}


def test_a_peer_that_lost_our_session_is_rejoined_or_given_up():
    err = wire.encode(Kind.ERROR, {"code": wire.E_NO_SESSION, "message": "say PEER_HELLO"})
    # Welcomed back: the link never goes down, and everything is sent again.
    net = _net_with_clients(["a", "b"], [("a", "b")])
    a = net.cores["a"].overlay
    link = a.links[("d", "b")]
    net.sent.clear()
    a.on_message(link.id, err, net.now)
    net.pump()
    assert link.up and link.rejoin is None
    kinds = [k for s, d, k in net.sent if s == "a"]
    assert kinds[0] == Kind.PEER_HELLO and Kind.LINKSTATE in kinds and Kind.INTEREST in kinds
    # Never welcomed (the peer only ever says "say PEER_HELLO"): down after
    # peer_dead_after, though the peer is not silent.
    net.cut.add(frozenset(("a", "b")))
    for _ in range(10):
        a.on_message(link.id, err, net.now)
        net.advance(0.2)
    assert not link.up
    # Refused: the answer to the hello is another error.
    net = _net_with_clients(["a", "b"], [("a", "b")])
    a = net.cores["a"].overlay
    link = a.links[("d", "b")]
    net.cut.add(frozenset(("a", "b")))
    a.on_message(link.id, err, net.now)
    a.on_message(link.id, wire.encode(Kind.ERROR, {"code": wire.E_DENIED, "message": "no"}),
                 net.now)
    assert not link.up
