"""`psepr bench pldb`: tuples through an overlay into three monitors, and queries.

Set-up: three routers in a chain (r0 - r1 - r2, ``local`` preset), one PLDB
monitor process on each (``psepr pldb monitor``, SQLite files in a temporary
directory), the sender on r1 and the querying client on r0; every role is its
own process.

Scenarios:

* ``ingest``     1,000 simulated nodes x 20 fields (20,000 tuples a round) sent
                 as fast as one sender can, several rounds; the rate is the
                 tuples every one of the three monitors has stored, over the
                 time from the first send until the slowest monitor has them
                 all (monitors announce their counters every 0.5 s: a bounded
                 error on a run of many seconds).
* ``query one``  ``psepr.pldb.query`` of one (channel, field): p50/p99 over
                 many queries, each answered by all three monitors.
* ``subtree``    the whole subtree of 20,000 current tuples: p50/max.
* ``memory``     each monitor's RSS, and its database size on disk.

Baselines measured in the same run, in this process: the same tuples written
straight into one :class:`~pldb.store.TupleStore` (the storage floor of one
monitor), and the same one-tuple and subtree reads straight from it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import hop
from benchmarks.overlay import rss_kib, start_overlay

ROOT = Path(__file__).resolve().parent.parent
AUTH = "bench.example.com"
NODES, FIELDS = 1000, 20


def _channel(i: int) -> str:
    return f"/{AUTH}/node/n{i:04}/"


# -- the sender role -----------------------------------------------------------------------------

def role_send(a) -> None:
    import psepr
    from psepr.channel import parse
    psepr.tune_gc()
    con = psepr.connect(a.url, preset="local")
    channels = [parse(_channel(i)) for i in range(NODES)]
    fields = [f"f{j:02}" for j in range(FIELDS)]
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()                       # go
    send, attr = con.send, psepr.ATTRIBUTE
    t0 = time.monotonic()
    cpu0 = time.process_time()
    for r in range(a.rounds):
        for ch in channels:
            for f in fields:
                send(ch, {"field": f, "value": r + 0.5, "expire": 3600}, type=attr)
    con.flush(timeout=120)
    out = {"sent": a.rounds * NODES * FIELDS, "seconds": time.monotonic() - t0,
           "cpu": time.process_time() - cpu0}
    con.close()
    print(json.dumps(out), flush=True)


# -- the driver ----------------------------------------------------------------------------------

def _start_monitor(url: str, data_dir: str, host: str) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "psepr.cli", "pldb", "monitor", "--channel",
                          f"/{AUTH}/node/", "--host", host, "--data-dir", data_dir,
                          "--preset", "local", "--router", url], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if " ready:" in line:
            return p, line.split()[1]
    hop._stop(p)
    raise RuntimeError(f"monitor on {host} did not become ready")


class _Census:
    """The monitors' announcements (``stored`` counters), read by the driver."""

    def __init__(self, con) -> None:
        from psepr.pldb import ANNOUNCE, monitors_channel
        self.lease = con.lease(monitors_channel(AUTH), type=ANNOUNCE, propagated=True)
        self.stored: dict[str, int] = {}

    def poll(self, seconds: float) -> None:
        import psepr
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.lease.receive(timeout=left)
            except psepr.TimeoutError:
                return
            p = ev.payload
            self.stored[p["monitor"]] = p.get("stored", 0)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _baseline(rounds: int, queries: int) -> dict:
    """One TupleStore in this process: the storage floor."""
    from psepr.channel import parse
    from psepr.pldb import Query, Tuple
    from pldb.store import TupleStore
    with tempfile.TemporaryDirectory() as d:
        store = TupleStore(Path(d) / "base.sqlite")
        n = 0
        t0 = time.perf_counter()
        for r in range(rounds):
            batch = [Tuple(_channel(i), f"f{j:02}", r + 0.5, time.time(), 3600.0, "s/i",
                           f"id{n + i * FIELDS + j}") for i in range(NODES) for j in range(FIELDS)]
            for k in range(0, len(batch), 5000):
                store.apply(batch[k:k + 5000])
            n += len(batch)
        rate = n / (time.perf_counter() - t0)
        rng = random.Random(1)
        lat = []
        for _ in range(queries):
            q = Query(parse(_channel(rng.randrange(NODES))), f"f{rng.randrange(FIELDS):02}")
            t = time.perf_counter()
            store.query(q, time.time())
            lat.append(time.perf_counter() - t)
        sub = []
        for _ in range(5):
            t = time.perf_counter()
            got = store.query(Query(parse(f"/{AUTH}/node/")), time.time())
            sub.append(time.perf_counter() - t)
        store.close()
    return {"rate": rate, "one_p50_ms": _pct(lat, 0.5) * 1e3, "one_p99_ms": _pct(lat, 0.99) * 1e3,
            "subtree_p50_ms": _pct(sub, 0.5) * 1e3, "subtree_tuples": len(got)}


def run(rounds: int, queries: int) -> dict:
    import psepr
    from psepr import pldb
    procs: list[subprocess.Popen] = []
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        try:
            routers, urls = start_overlay(3, [(0, 1), (1, 2)])
            procs += routers
            mons = []
            for i, url in enumerate(urls):
                p, mid = _start_monitor(url, str(Path(d) / f"h{i}"), f"h{i}")
                procs.append(p)
                mons.append((p, mid))
            sender = subprocess.Popen([sys.executable, "-m", "benchmarks.pldb", "send", urls[1],
                                       "--rounds", str(rounds)], cwd=ROOT, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True,
                                      env={**os.environ, "PYTHONPATH": str(ROOT)})
            procs.append(sender)
            hop._line(sender, 30)
            con = psepr.connect(urls[0], preset="local")
            census = _Census(con)
            total = rounds * NODES * FIELDS
            cpu0 = {p.pid: hop.cpu_seconds(p.pid) for p, _ in mons}
            t0 = time.monotonic()
            sender.stdin.write("go\n")
            sender.stdin.flush()
            deadline = t0 + 60 + total / 2_000
            while time.monotonic() < deadline:
                census.poll(0.1)
                if len(census.stored) == 3 and min(census.stored.values()) >= total:
                    break
            done = time.monotonic()
            sent = hop._line(sender, 120)
            stored = dict(census.stored)
            res["ingest"] = {"tuples": total, "seconds": done - t0,
                             "rate": min(stored.values(), default=0) / (done - t0),
                             "stored": stored, "sender_rate": sent["sent"] / sent["seconds"],
                             "monitor_cpu_us": statistics.mean(
                                 (hop.cpu_seconds(p.pid) - cpu0[p.pid]) * 1e6 / total
                                 for p, _ in mons)}
            rng = random.Random(2)
            lat = []
            for _ in range(queries):
                ch, f = _channel(rng.randrange(NODES)), f"f{rng.randrange(FIELDS):02}"
                t = time.perf_counter()
                got = pldb.query(con, ch, f, timeout=5.0)
                lat.append(time.perf_counter() - t)
                assert len(got) == 1, (ch, f, got)
            sub = []
            for _ in range(5):
                t = time.perf_counter()
                got = pldb.query(con, f"/{AUTH}/node/", timeout=30.0)
                sub.append(time.perf_counter() - t)
            res["query"] = {"one_p50_ms": _pct(lat, 0.5) * 1e3, "one_p99_ms": _pct(lat, 0.99) * 1e3,
                            "queries": queries, "subtree_p50_ms": _pct(sub, 0.5) * 1e3,
                            "subtree_max_ms": max(sub) * 1e3, "subtree_tuples": len(got)}
            res["memory"] = {"monitor_rss_mib": [rss_kib(p.pid) / 1024 for p, _ in mons],
                             "db_mib": [sum(f.stat().st_size for f in (Path(d) / f"h{i}").iterdir())
                                        / 2**20 for i in range(3)]}
            con.close()
        finally:
            hop._stop(*procs)
    return res


def main(args) -> int:
    """Run the PLDB scenarios and the in-process baseline; print a table (JSON with --json)."""
    rounds = 2 if args.quick else 10
    queries = 200 if args.quick else 2000
    print(f"  baseline: {rounds * NODES * FIELDS:,} tuples straight into one SQLite store ...",
          file=sys.stderr, flush=True)
    base = _baseline(rounds, queries)
    print(f"  3 routers, 3 monitors, {rounds * NODES * FIELDS:,} tuples through the overlay ...",
          file=sys.stderr, flush=True)
    res = run(rounds, queries)
    res["baseline"] = base
    ing, q, m = res["ingest"], res["query"], res["memory"]
    print(f"\npsepr bench pldb  ({os.cpu_count()} cores; {NODES:,} nodes x {FIELDS} fields; "
          f"3 routers in a chain, a monitor on each; loopback)\n")
    print(f"{'scenario':<34} {'through PLDB':>22} {'one TupleStore, in process':>28}")
    print(f"{'ingest, tuples/s (each monitor)':<34} {ing['rate']:>20,.0f}/s {base['rate']:>26,.0f}/s")
    print(f"{'  sender alone, tuples/s':<34} {ing['sender_rate']:>20,.0f}/s")
    print(f"{'  monitor CPU per tuple':<34} {ing['monitor_cpu_us']:>19.1f} us")
    print(f"{'query one tuple p50 / p99':<34} {q['one_p50_ms']:>10.2f} / {q['one_p99_ms']:>6.2f} ms "
          f"{base['one_p50_ms']:>14.3f} / {base['one_p99_ms']:>6.3f} ms")
    print(f"{'query subtree p50 / max':<34} {q['subtree_p50_ms']:>10.0f} / {q['subtree_max_ms']:>6.0f} ms "
          f"{base['subtree_p50_ms']:>14.0f} ms (p50)")
    print(f"{'  tuples in the subtree':<34} {q['subtree_tuples']:>22,} {base['subtree_tuples']:>28,}")
    print(f"{'monitor RSS, MiB':<34} {' / '.join(f'{x:.1f}' for x in m['monitor_rss_mib']):>22}")
    print(f"{'database on disk, MiB':<34} {' / '.join(f'{x:.1f}' for x in m['db_mib']):>22}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _role_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pldb")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send")
    s.add_argument("url")
    s.add_argument("--rounds", type=int, default=1)
    a = p.parse_args(argv)
    role_send(a)


if __name__ == "__main__":
    _role_main(sys.argv[1:])
