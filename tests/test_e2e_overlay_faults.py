"""Overlay faults with real router processes: kill, restart, partition, fail-over.

* A ring of 6 under steady load loses a router (SIGKILL): after the overlay
  re-converges every holder gets every new event; the test prints the outage
  window each holder saw.  The router restarts on the same ports: the holder
  that used it alone gets its lease back; nothing is ever delivered twice.
* Two links of the ring are cut through TCP proxies (a partition into two
  halves): each half keeps delivering its own events, honestly without the
  other's; healed, everything flows again, exactly once.
* A client given three routers loses its router: it fails over, its lease
  resumes; the time is measured (target under 3 s with default settings).

Loads are bounded in events and seconds.
"""

from __future__ import annotations

import threading
import time

import pytest

import psepr
from tests.conftest import start_overlay, wait_converged
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.slow

RATE = 300          # events per second of the steady load
CH = "/t.org/load/"


class Load:
    """One sender at a steady rate, numbering its events; bounded by ``limit`` seconds."""

    def __init__(self, url: str, name: str, limit: float = 30.0) -> None:
        self.con = psepr.connect(url, preset="local", service=name)
        self.sent: list[tuple[int, float]] = []     # (k, monotonic send time)
        self._stop = threading.Event()
        self._limit = limit
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        k = 0
        while not self._stop.is_set() and time.monotonic() - t0 < self._limit:
            now = time.monotonic()
            self.con.send(f"{CH}{k}/", {"k": k, "t": now}, type="load")
            self.sent.append((k, now))
            k += 1
            time.sleep(max(0.0, t0 + k / RATE - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._t.join(10)
        self.con.flush(timeout=10)
        self.con.close()


class Holder:
    """A lease on ``CH`` collecting (sender, k) in a background thread."""

    def __init__(self, urls, name: str) -> None:
        self.con = psepr.connect(urls, preset="local", service=name)
        self.lease = self.con.lease(CH, duration=300, propagated=True)
        self.got: list[tuple[str, int, float]] = []   # (sender, k, arrival)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                e = self.lease.receive(timeout=0.1)
            except psepr.TimeoutError:
                continue
            except psepr.PseprError:
                return
            self.got.append((e.from_service, e.payload["k"], time.monotonic()))

    def stop(self) -> None:
        time.sleep(0.5)                 # let the last events arrive
        self._stop.set()
        self._t.join(5)
        self.con.close()

    def ks(self, sender: str) -> list[int]:
        return [k for s, k, _ in self.got if s == sender]


def _outage(load: Load, got: set, after: float = 0.0) -> float:
    """Seconds between the first and the last lost event sent after ``after``."""
    lost = [t for k, t in load.sent if k not in got and t >= after]
    return (max(lost) - min(lost) + 1.0 / RATE) if lost else 0.0


def test_ring_kill_and_restart_under_load(start_router):
    routers = start_overlay(start_router, 6, [(i, (i + 1) % 6) for i in range(6)])
    # The load enters at r2; r3 is on the shortest path from r2 to r4.
    holders = {i: Holder(routers[i].url, f"h{i}") for i in (0, 1, 4, 5)}
    h3 = Holder([routers[3].url], "h3")           # knows only r3
    load = Load(routers[2].url, "src")
    try:
        time.sleep(1.0)
        t_kill = time.monotonic()
        r3 = routers[3]
        r3_args = ["--preset", "local", "--listen", r3.url, "--peer-listen", r3.peer_url,
                   "--peer", routers[2].peer_url]          # as start_overlay linked it
        r3.stop(9)
        took = wait_converged([r for r in routers if r.name != "r3"],
                              expect=["r0", "r1", "r2", "r4", "r5"])
        t_conv = time.monotonic()
        print(f"\nring of 6: r3 killed; the others re-converged {t_conv - t_kill:.2f} s later "
              f"({took:.2f} s of it polling status)")
        time.sleep(1.0)
        t_restart = time.monotonic()
        # Restart r3 on the same ports, with the same peers.
        routers[3] = start_router(*r3_args, name="r3")
        wait_converged(routers)
        # h3 comes back: its session re-registers the lease on the new r3.
        deadline = time.monotonic() + 15
        n3 = len(h3.got)
        while len(h3.got) == n3 and time.monotonic() < deadline:
            time.sleep(0.05)
        t_back = time.monotonic()
        assert len(h3.got) > n3, "h3's lease did not come back after r3 restarted"
        print(f"r3 restarted; h3 received again {t_back - t_kill:.2f} s after the kill")
        time.sleep(1.0)
    finally:
        load.stop()
        for h in (*holders.values(), h3):
            h.stop()
    sent = {k for k, _ in load.sent}
    for n, h in holders.items():
        ks = h.ks("src")
        assert len(ks) == len(set(ks)), f"h{n} got duplicates"
        got = set(ks)
        assert got <= sent
        # Everything sent once the overlay had re-converged arrived (until the
        # restart, whose own convergence may lose a few in flight: measured).
        # After re-convergence (and until r3's return reshapes the routes again)
        # every event arrives; and again once r3 is back and its holder too.
        settled = [k for k, t in load.sent if t_conv + 0.2 <= t < t_restart]
        late = [k for k, t in load.sent if t >= t_back + 0.5]
        print(f"h{n}: {len(got)}/{len(sent)} events, outage window "
              f"{_outage(load, got):.3f} s; after re-convergence {len(settled)} sent, "
              f"{sum(k in got for k in settled)} received")
        assert settled and all(k in got for k in settled), \
            f"h{n} lost events sent after re-convergence"
        assert late and all(k in got for k in late), f"h{n} lost events after r3 came back"
    ks3 = h3.ks("src")
    assert len(ks3) == len(set(ks3)), "h3 got duplicates"
    late3 = [k for k, t in load.sent if t >= t_back + 0.5]
    lost3 = [(k, round(t - t_back, 3)) for k, t in load.sent if t >= t_back + 0.5
             and k not in set(ks3)]
    assert late3 and not lost3, \
        f"h3 lost {len(lost3)} of {len(late3)} events after it came back: (k, s after) {lost3[:10]}"


def test_partition_and_heal(start_router):
    proxies: dict = {}

    def dial(i, j, url):
        if {i, j} in ({0, 1}, {3, 4}):
            proxies[(i, j)] = TcpProxy(int(url.rsplit(":", 1)[1]))
            return proxies[(i, j)].url
        return url

    routers = start_overlay(start_router, 6, [(i, (i + 1) % 6) for i in range(6)], dial=dial)
    try:
        cons = [psepr.connect(r.url, preset="local", service=f"c{i}")
                for i, r in enumerate(routers)]
        leases = [c.lease(CH, duration=300, propagated=True) for c in cons]

        def burst(tag: str, senders, n: int = 40) -> None:
            for s in senders:
                for k in range(n):
                    cons[s].send(f"{CH}{tag}/", {"k": k}, type=tag)
                cons[s].flush(timeout=10)

        def collect(lease, want: int) -> list:
            got = []
            while True:
                try:
                    got.append(lease.receive(timeout=1.0 if len(got) < want else 0.3))
                except psepr.TimeoutError:
                    return got

        side_a, side_b = [1, 2, 3], [4, 5, 0]
        for p in proxies.values():
            p.cut()
        t0 = time.monotonic()
        wait_converged([routers[i] for i in side_a], expect=[f"r{i}" for i in side_a])
        wait_converged([routers[i] for i in side_b], expect=[f"r{i}" for i in side_b])
        print(f"\npartition seen by both halves after {time.monotonic() - t0:.2f} s")
        burst("split", [1, 4])
        for i in range(6):
            got = collect(leases[i], 40)
            senders = {e.from_service for e in got}
            want = "c1" if i in side_a else "c4"
            assert senders == {want} and len(got) == 40 and len({e.id for e in got}) == 40, \
                (i, senders, len(got))
        for p in proxies.values():
            p.heal()
        t0 = time.monotonic()
        wait_converged(routers)
        print(f"healed: whole again after {time.monotonic() - t0:.2f} s")
        burst("whole", [1, 4])
        for i in range(6):
            got = collect(leases[i], 80)
            assert len(got) == 80 and len({e.id for e in got}) == 80, (i, len(got))
            assert {e.from_service for e in got} == {"c1", "c4"}
        for c in cons:
            c.close()
    finally:
        for p in proxies.values():
            p.close()


def test_client_fails_over_to_another_router_quickly(start_router):
    routers = start_overlay(start_router, 3, [(1, 0), (2, 1), (2, 0)])
    holder = psepr.connect([r.url for r in routers])      # default settings
    sender = psepr.connect(routers[2].url, preset="local")
    try:
        lease = holder.lease("/t.org/fo/", propagated=True)
        stop = threading.Event()

        def pump():
            k = 0
            t0 = time.monotonic()
            while not stop.is_set() and time.monotonic() - t0 < 20:
                sender.send("/t.org/fo/x/", {"k": k, "t": time.monotonic()})
                k += 1
                time.sleep(0.002)

        t = threading.Thread(target=pump, daemon=True)
        t.start()
        lease.receive(timeout=5)
        assert holder.welcome["router"] == "r0"
        t_kill = time.monotonic()
        routers[0].proc.kill()
        while True:
            e = lease.receive(timeout=10)
            if e.payload["t"] > t_kill:
                break
        took = time.monotonic() - t_kill
        stop.set()
        t.join(5)
        print(f"\nclient fail-over after its router was killed: {took:.3f} s "
              f"(now on {holder.welcome['router']})")
        assert holder.welcome["router"] in ("r1", "r2")
        assert took < 3.0
    finally:
        holder.close()
        sender.close()


def test_a_router_stopped_gracefully_is_let_go_at_once(start_router):
    # On the wan preset a peer waits 8 s of silence before it takes a link down.
    # A router stopped with SIGTERM says goodbye on its links: its peers drop it
    # at once, and log a stop (INFO), not the failure a crash is (WARNING).
    r0, r1, r2 = start_overlay(start_router, 3, [(1, 0), (2, 1)], preset="wan")
    t0 = time.monotonic()
    r1.stop()
    wait_converged([r0], timeout=30.0, expect=["r0"])
    wait_converged([r2], timeout=30.0, expect=["r2"])
    took = time.monotonic() - t0
    print(f"\ngraceful stop: both peers let r1 go {took:.2f} s after SIGTERM")
    assert took < 4.0, f"the peers took {took:.1f} s to let r1 go (peer_dead_after is 8 s)"
    for r in (r0, r2):
        assert "peer link to r1 down" not in "".join(r.output), r.output
