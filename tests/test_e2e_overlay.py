"""The overlay end to end: real router processes linked on loopback.

Every router is a `psepr router` child process with ephemeral client and peer
ports; one SDK connection per router.  Proves, with counts asserted (not
sampled):

* chain of 5, ring of 6, star of 6 and a seeded random connected mesh of 12:
  every event sent at any router reaches every matching lease holder exactly
  once, and nobody else;
* events never travel to a router with no interest (a star's idle leaves
  receive no FORWARD);
* ``propagated=True`` leases: a sender anywhere reaches them at once;
* ``psepr status`` shows every router, its links and their round-trip times.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest

import psepr
from tests.conftest import ROOT, start_overlay

pytestmark = pytest.mark.slow


def _shapes():
    rng = random.Random(12)
    mesh = [(i, rng.randrange(i)) for i in range(1, 12)]        # a random spanning tree
    while len(mesh) < 18:                                        # plus random chords
        a, b = rng.sample(range(12), 2)
        if (a, b) not in mesh and (b, a) not in mesh:
            mesh.append((a, b))
    return {
        "chain5": (5, [(i, i - 1) for i in range(1, 5)]),
        "ring6": (6, [(i, (i + 1) % 6) for i in range(6)]),
        "star6": (6, [(i, 0) for i in range(1, 6)]),
        "mesh12": (12, mesh),
    }


SHAPES = _shapes()


def _drain(lease, want: int, timeout: float) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            got.append(lease.receive(timeout=max(0.01, deadline - time.monotonic())))
        except psepr.TimeoutError:
            break
    # Anything beyond `want` would be a duplicate: wait a little for stragglers.
    try:
        got.append(lease.receive(timeout=0.3))
    except psepr.TimeoutError:
        pass
    return got


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_holder_gets_every_event_exactly_once(start_router, shape):
    n, edges = SHAPES[shape]
    routers = start_overlay(start_router, n, edges)
    rng = random.Random(shape)
    holders = sorted(rng.sample(range(n), max(2, n // 3)))
    cons = [psepr.connect(r.url, preset="local", service=f"c{i}") for i, r in enumerate(routers)]
    try:
        leases = {}
        for i in holders:
            leases[i] = cons[i].lease("/t.org/app/", duration=120, propagated=True)
        # Everyone else holds a lease elsewhere: it must stay silent.
        others = {i: cons[i].lease("/t.org/other/", duration=120, propagated=True)
                  for i in range(n) if i not in holders}
        per_router = 25
        for i, con in enumerate(cons):
            for k in range(per_router):
                con.send(f"/t.org/app/r{i}/", {"k": k}, type="count")
        for con in cons:
            con.flush(timeout=10)
        total = n * per_router
        for i, lease in leases.items():
            got = _drain(lease, total, timeout=20)
            ids = [e.id for e in got]
            assert len(ids) == total and len(set(ids)) == total, \
                f"router {i}: {len(ids)} events ({len(set(ids))} distinct), want {total}"
            by_sender = {}
            for e in got:
                by_sender.setdefault(e.from_service, []).append(e.payload["k"])
            # Per sender, events arrive in the order they were sent.
            assert all(v == list(range(per_router)) for v in by_sender.values()), i
            assert len(by_sender) == n
        for i, lease in others.items():
            with pytest.raises(psepr.TimeoutError):
                lease.receive(timeout=0.2)
    finally:
        for con in cons:
            con.close()


def test_events_never_travel_to_routers_without_interest(start_router):
    routers = start_overlay(start_router, 5, [(i, 0) for i in range(1, 5)])   # star
    with psepr.connect(routers[3].url, preset="local") as holder, \
            psepr.connect(routers[1].url, preset="local") as sender:
        lease = holder.lease("/t.org/only3/", propagated=True)
        for k in range(50):
            sender.send("/t.org/only3/x/", {"k": k})
        sender.flush()
        assert len(_drain(lease, 50, 10)) == 50
    counters = {}
    for r in routers:
        with psepr.connect(r.url, preset="local") as con:
            counters[r.name] = con.status()["counters"]
    # The sender's router forwards to the hub, the hub to r3; r2 and r4 see nothing.
    assert counters["r2"]["forwarded_in"] == 0 and counters["r4"]["forwarded_in"] == 0
    assert counters["r0"]["forwarded_in"] > 0 and counters["r3"]["forwarded_in"] > 0
    assert all(c["duplicates"] == 0 and c["no_route"] == 0 for c in counters.values())


def test_status_command_shows_routers_links_and_rtt(start_router):
    routers = start_overlay(start_router, 3, [(1, 0), (2, 1)])
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "status", "--router",
                          routers[1].url], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "overlay seen from router r1" in text
    for name in ("r0", "r1", "r2"):
        assert f"\n  {name} " in text
    assert text.count(" up ") >= 2 and "rtt" in text and " ms" in text
    js = subprocess.run([sys.executable, "-m", "psepr.cli", "status", "--json", "--router",
                         routers[0].url], cwd=ROOT, capture_output=True, text=True, timeout=30)
    import json
    st = json.loads(js.stdout)
    assert {r["router"]: r["reachable"] for r in st["routers"]} == \
        {"r0": True, "r1": True, "r2": True}
    [link] = st["links"]
    assert link["peer"] == "r1" and link["up"] and link["rtt_ms"] is not None


async def test_aio_propagated_lease_and_status_across_routers(start_router):
    import psepr.aio
    routers = start_overlay(start_router, 2, [(1, 0)])
    async with psepr.aio.connect(routers[1].url, preset="local") as holder, \
            psepr.aio.connect(routers[0].url, preset="local") as sender:
        lease = await holder.lease("/t.org/aio/", propagated=True)
        await sender.send("/t.org/aio/x/", {"k": 1})
        await sender.flush()
        ev = await lease.receive(timeout=5)
        assert ev.payload == {"k": 1} and ev.from_service is not None
        st = await holder.status()
        assert {r["router"]: r["reachable"] for r in st["routers"]} == {"r0": True, "r1": True}
