"""`psepr bench overlay`: events across several routers, each its own process.

Scenarios (100-byte JSON payloads, loopback, routers with the ``local`` preset):

* ``chain latency``  sender -> r0 -> r1 -> r2 -> holder at 5,000 events/s:
                     p50/p99 one-way latency.  Baselines measured in the same
                     run: a chain of three minimal raw pyzmq forwarders
                     (``psepr bench hop``'s, chained), and one PsEPR router.
* ``chain rate``     the same paths unpaced: delivered events/s.
* ``lease reach``    20 routers in a seeded random connected mesh: how long
                     ``lease(..., propagated=True)`` takes, i.e. until every
                     router has confirmed the new lease's interest (median and
                     max over leases taken at different routers).
* ``idle memory``    RSS of a router with 10,000 leases held by one client on
                     distinct channels, and of its peer that holds their
                     interest, next to the same routers with no leases.
* ``aged chain``     (``--aged EVENTS``) chain latency run after run on the same
                     three routers until EVENTS events have crossed them: state
                     that grows with traffic shows as later runs slower.

The sender and holder roles are :mod:`benchmarks.hop`'s, so the one-router
baseline is exactly ``psepr bench hop``'s path; like there, each figure comes
with the CPU all processes on the path used per delivered event, and the chain
and its two baselines run ``--rounds`` times (default 3), the rounds taking
turns, each scenario showing its median run with every round's figure printed
under the table.  Every run is bounded.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import hop



def start_overlay(n: int, edges,
                  preset: str = "local") -> tuple[list[subprocess.Popen], list[str]]:
    """Routers 0..n-1 linked by ``edges`` (router i dials j < i), running ``preset``;
    waits until converged."""
    dials: dict[int, set] = {i: set() for i in range(n)}
    for a, b in edges:
        dials[max(a, b)].add(min(a, b))
    procs, urls, peers = [], [], []
    try:
        for i in range(n):
            extra = [a for j in sorted(dials[i]) for a in ("--peer", peers[j])]
            p, url, peer = hop.start_router(f"r{i}", "--preset", preset, "--peer-listen",
                                            "tcp://127.0.0.1:0", *extra, quiet=True)
            procs.append(p)
            urls.append(url)
            peers.append(peer)
        wait_converged(urls)
    except BaseException:
        hop._stop(*procs)
        raise
    return procs, urls


def wait_converged(urls: list[str], timeout: float = 60.0) -> None:
    import psepr
    want = len(urls)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ok = True
        for url in urls:
            with psepr.connect(url, preset="local") as con:
                st = con.status(timeout=5.0)
            if sum(1 for r in st["routers"] if r["reachable"]) != want:
                ok = False
                break
        if ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"overlay of {want} routers did not converge in {timeout} s")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _mesh(n: int, extra: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    edges = [(i, rng.randrange(i)) for i in range(1, n)]
    while len(edges) < n - 1 + extra:
        a, b = rng.sample(range(n), 2)
        if (a, b) not in edges and (b, a) not in edges:
            edges.append((a, b))
    return edges


def _across(routers: list, urls: list, count: int, rate: int = 0) -> dict:
    """One sender at the chain's first router, one holder at its last."""
    return hop._run_roles("psepr-recv", "psepr-send", ["--url", urls[2]], ["--url", urls[0]],
                          count=count, conns=1, procs=1, leases=1, rate=rate, seconds=30.0,
                          mids=tuple(routers))


def _chain_runs(count: int, lat_n: int) -> dict:
    out = {}
    procs, urls = start_overlay(3, [(1, 0), (2, 1)])
    try:
        for title, kw in (("rate", dict(count=count)), ("latency", dict(count=lat_n, rate=5000))):
            out[f"chain {title}"] = _across(procs, urls, **kw)
    finally:
        hop._stop(*procs)
    for title, kw in (("rate", dict(count=count)), ("latency", dict(count=lat_n, rate=5000))):
        out[f"one router {title}"] = hop.run_psepr(**kw)
        out[f"raw chain {title}"] = _raw_chain(**kw)
    return out


def _chain_rounds(count: int, lat_n: int, rounds: int) -> dict:
    """:func:`_chain_runs` ``rounds`` times; per scenario the median run (by p99 for
    latency, by rate otherwise) with every round's figure in ``"rounds"``."""
    runs = []
    for k in range(rounds):
        print(f"  round {k + 1}/{rounds}: chain of 3 and one-router baselines ...",
              file=sys.stderr, flush=True)
        runs.append(_chain_runs(count, lat_n))
    return {key: hop._median_run([r[key] for r in runs], key.endswith("latency"))
            for key in runs[0]}


def _aged_chain(total: int, lat_n: int) -> list[dict]:
    """The chain's latency at 5,000 events/s, run after run on the same three routers,
    until ``total`` events have crossed them (paced sends leave one by one: one
    segment each).  Per-router state that grows with traffic (caches, tables)
    shows as later runs slower than the first: the seen-segment cache once cost
    33 us per segment, and p99s of 20-95 ms, after 100,000 segments.

    Returns:
        One ``{"before", "p50_us", "p99_us", "routers_cpu_us"}`` per run, in order.
    """
    procs, urls = start_overlay(3, [(1, 0), (2, 1)])
    runs: list[dict] = []
    try:
        while len(runs) * lat_n < total:
            print(f"  aged chain: run {len(runs) + 1}, {len(runs) * lat_n:,} events so far ...",
                  file=sys.stderr, flush=True)
            r = _across(procs, urls, lat_n, rate=5000)
            runs.append({"before": len(runs) * lat_n, "p50_us": r.get("p50_us", 0.0),
                         "p99_us": r.get("p99_us", 0.0),
                         "routers_cpu_us": r["cpu_us_by_role"]["routers"]})
    finally:
        hop._stop(*procs)
    return runs


def _raw_chain(count: int, rate: int = 0) -> dict:
    """The baseline: three minimal raw pyzmq forwarders in a chain (PUB/SUB, one message
    per event), with :mod:`benchmarks.hop`'s raw sender and receiver."""
    fwds: list[subprocess.Popen] = []
    try:
        first = last = None
        for _ in range(3):
            args = ["raw-fwd"] + (["--upstream", str(last)] if last is not None else [])
            fwds.append(hop._spawn(*args))
            ports = hop._line(fwds[-1], 15)
            first = ports["in"] if first is None else first
            last = ports["out"]
        time.sleep(0.3)   # SUB connections are asynchronous; no readiness signal exists
        return hop._run_roles("raw-recv", "raw-send", ["--port", str(last)],
                              ["--port", str(first)], count=count, conns=1, procs=1, leases=1,
                              rate=rate, seconds=30.0, mids=tuple(fwds))
    finally:
        hop._stop(*fwds)


def _lease_reach(n: int, leases: int) -> dict:
    import psepr
    edges = _mesh(n, n // 2, seed=20)
    procs, urls = start_overlay(n, edges)
    try:
        times = []
        rng = random.Random(1)
        for k in range(leases):
            url = urls[rng.randrange(n)]
            with psepr.connect(url, preset="local") as con:
                t0 = time.perf_counter()
                con.lease(f"/bench/reach/{k}/", propagated=True, timeout=10)
                times.append(time.perf_counter() - t0)
        # The barrier's promise, checked: a sender at every router reaches the last lease.
        with psepr.connect(urls[0], preset="local") as holder:
            lease = holder.lease("/bench/reach/check/", propagated=True)
            for url in urls:
                with psepr.connect(url, preset="local") as s:
                    s.send("/bench/reach/check/x/", {"from": url})
            got = 0
            while got < n:
                lease.receive(timeout=5)
                got += 1
    finally:
        hop._stop(*procs)
    return {"routers": n, "links": len(edges), "leases": leases,
            "median_ms": statistics.median(times) * 1000, "max_ms": max(times) * 1000}


def _idle_memory(leases: int) -> dict:
    import psepr
    procs, urls = start_overlay(2, [(1, 0)])
    try:
        time.sleep(1.0)
        base = [rss_kib(p.pid) for p in procs]
        con = psepr.connect(urls[0], preset="local")
        t0 = time.monotonic()
        for k in range(leases):
            con.lease(f"/bench/mem/c{k}/", duration=600)
        con.lease("/bench/mem/last/", propagated=True, timeout=60)
        took = time.monotonic() - t0
        time.sleep(2.0)
        after = [rss_kib(p.pid) for p in procs]
        con.close()
    finally:
        hop._stop(*procs)
    return {"leases": leases, "register_s": took,
            "holder_router_kib": after[0], "holder_router_base_kib": base[0],
            "peer_router_kib": after[1], "peer_router_base_kib": base[1]}


def main(args) -> int:
    """Run the overlay scenarios; print a table (and JSON with --json)."""
    quick = args.quick
    rounds = args.rounds if args.rounds is not None else (1 if quick else 3)
    count = 30_000 if quick else 200_000
    # Latency over 10 s at 5,000/s, as `psepr bench hop`: a 3 s run's p99 is set by one
    # or two scheduling stalls.  The aged chain keeps 3 s runs (its figure is the drift).
    lat_n = 2_000 if quick else 50_000
    aged_n = 2_000 if quick else 15_000
    n_routers = 6 if quick else 20
    res: dict = {}
    res.update(_chain_rounds(count, lat_n, rounds))
    print(f"  running lease reach on {n_routers} routers ...", file=sys.stderr, flush=True)
    res["lease reach"] = _lease_reach(n_routers, 10 if quick else 30)
    print("  running idle memory with 10,000 leases ...", file=sys.stderr, flush=True)
    res["idle memory"] = _idle_memory(1_000 if quick else 10_000)
    if args.aged:
        res["aged chain"] = _aged_chain(args.aged, aged_n)

    print(f"\npsepr bench overlay  ({os.cpu_count()} cores, 100-byte JSON payloads, loopback, "
          f"each router and client its own process; chain and baselines: median of {rounds} "
          f"round{'s' if rounds > 1 else ''})\n")
    cols = [("chain", "3-router chain"), ("raw chain", "raw pyzmq chain of 3"),
             ("one router", "one psepr router")]
    print(f"{'scenario':<26} " + " ".join(f"{t:>24}" for _, t in cols))
    print(f"{'latency @5k/s p50 / p99':<26} " + " ".join(
        f"{res[k + ' latency']['p50_us']:>12.0f} / {res[k + ' latency']['p99_us']:>6.0f} us"
        for k, _ in cols))
    print(f"{'  CPU us per event':<26} " + " ".join(
        f"{res[k + ' latency']['cpu_us']:>24.1f}" for k, _ in cols))
    print(f"{'throughput events/s':<26} " + " ".join(
        f"{res[k + ' rate']['rate']:>22,.0f}/s" for k, _ in cols))
    print(f"{'  CPU us per event':<26} " + " ".join(
        f"{res[k + ' rate']['cpu_us']:>24.1f}" for k, _ in cols))
    c = res["chain rate"]
    if c["dropped"]:
        print(f"  (the psepr chain dropped {c['dropped']} events)")
    if rounds > 1:
        for k, title in cols:
            print(f"  {title} rounds: latency p99 (us) "
                  + " / ".join(f"{x:,.0f}" for x in res[k + " latency"]["rounds"])
                  + "; events/s " + " / ".join(f"{x:,.0f}" for x in res[k + " rate"]["rounds"]))
    r = res["lease reach"]
    print(f"\nlease reach: {r['routers']} routers, {r['links']} links; propagated lease "
          f"returned after median {r['median_ms']:.1f} ms, max {r['max_ms']:.1f} ms "
          f"({r['leases']} leases)")
    m = res["idle memory"]
    print(f"idle memory: {m['leases']:,} leases registered in {m['register_s']:.2f} s; "
          f"holder's router RSS {m['holder_router_kib'] / 1024:.1f} MiB "
          f"(empty {m['holder_router_base_kib'] / 1024:.1f} MiB), peer router "
          f"{m['peer_router_kib'] / 1024:.1f} MiB (empty {m['peer_router_base_kib'] / 1024:.1f} MiB)")
    if args.aged:
        print("\naged chain at 5,000 events/s (the same three routers, run after run):")
        print(f"{'events before the run':>24} {'p50 / p99 us':>20} {'routers CPU us/event':>22}")
        for run in res["aged chain"]:
            print(f"{run['before']:>24,} {run['p50_us']:>11.0f} / {run['p99_us']:>6.0f} "
                  f"{run['routers_cpu_us']:>22.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
