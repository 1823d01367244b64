"""`psepr bench pldb`: tuples through an overlay into three monitors, and queries.

Set-up: three routers in a chain (r0 - r1 - r2, ``local`` preset), one PLDB
monitor process on each (``psepr pldb monitor``, SQLite files in a temporary
directory), the sender on r1 and the querying client on r0; every role is its
own process.

Scenarios:

* ``ingest``     1,000 simulated nodes x 20 fields (20,000 tuples a round),
                 several rounds, offered at 50,000 tuples/s (the target), at
                 75,000/s, and as fast as one sender can.  The rate is the
                 tuples the slowest of the three monitors stored, over the time
                 from the first send until every monitor holds the run's last
                 tuple (a sentinel the driver polls for with queries every
                 20 ms); tuples lost (dropped at a full lease queue) are counted
                 from the monitors' announced counters.
* ``query one``  ``psepr.pldb.query`` of one (channel, field): p50/p99 over
                 many queries, each answered by all three monitors.
* ``subtree``    the whole subtree of 20,000 current tuples: p50/max.
* ``memory``     each monitor's RSS after each run, and its database size on disk.

Baselines measured in the same run, in this process: the same tuples written
straight into one :class:`~pldb.store.TupleStore` (the storage floor of one
monitor), and the same one-tuple and subtree reads straight from it; and the
asker's merge of three monitors' answers for that subtree
(:meth:`psepr.pldb.Replies.tuples`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
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
    """Reads ``RATE ROUNDS RUN`` lines; sends that many rounds (RATE 0 = unpaced) and a sentinel."""
    import psepr
    from psepr.channel import parse
    psepr.tune_gc()
    con = psepr.connect(a.url, preset="local")
    channels = [parse(_channel(i)) for i in range(NODES)]
    fields = [f"f{j:02}" for j in range(FIELDS)]
    print(json.dumps({"ready": True}), flush=True)
    send, attr = con.send, psepr.ATTRIBUTE
    for line in sys.stdin:
        rate, rounds, run = (int(x) for x in line.split())
        t0 = time.monotonic()
        cpu0 = time.process_time()
        n = 0
        for r in range(rounds):
            for ch in channels:
                if rate and n % 1000 == 0:         # pace in slices of 1,000 tuples
                    ahead = n / rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
                for f in fields:
                    send(ch, {"field": f, "value": r + 0.5, "expire": 3600}, type=attr)
                n += FIELDS
        send(channels[0], {"field": "end", "value": run, "expire": None}, type=attr)
        con.flush(timeout=120)
        print(json.dumps({"sent": n, "seconds": time.monotonic() - t0,
                          "cpu": time.process_time() - cpu0}), flush=True)
    con.close()


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


def _holders_of_end(con, run: int) -> set[str]:
    """The monitors whose answer already holds the sentinel of ``run``."""
    from psepr.pldb import QUERY
    replies = con.request_all(_channel(0), {"field": "end"}, type=QUERY, timeout=2.0,
                              done=lambda rs: len(rs) >= 3)
    return {ev.payload["monitor"] for ev in replies
            if any(row[2] == run for row in ev.payload.get("tuples", ()))}


def _stored(con) -> dict[str, int]:
    """Each monitor's ``stored`` counter, from one round of announcements."""
    from psepr.pldb import ANNOUNCE, monitors_channel
    import psepr
    lease = con.lease(monitors_channel(AUTH), type=ANNOUNCE)
    seen: dict[str, int] = {}
    deadline = time.monotonic() + 2.0
    try:
        while len(seen) < 3 and time.monotonic() < deadline:
            try:
                p = lease.receive(timeout=0.5).payload
            except psepr.TimeoutError:
                continue
            seen[p["monitor"]] = p["stored"]
    finally:
        lease.release()
    return seen


def _ingest(con, sender, monitors, rate: int, rounds: int, run: int) -> dict:
    """One ingest run: offered ``rate`` (0 = as fast as the sender can)."""
    total = rounds * NODES * FIELDS
    before = _stored(con)
    cpu0 = {p.pid: hop.cpu_seconds(p.pid) for p, _ in monitors}
    t0 = time.monotonic()
    sender.stdin.write(f"{rate} {rounds} {run}\n")
    sender.stdin.flush()
    done_at: dict[str, float] = {}
    deadline = t0 + 30 + total / 5_000
    sent = None
    while len(done_at) < 3 and time.monotonic() < deadline:
        for mon in _holders_of_end(con, run) - done_at.keys():
            done_at[mon] = time.monotonic()
        if sent is None and select.select([sender.stdout], [], [], 0)[0]:
            sent = hop._line(sender, 1)
            # a monitor whose queue overflowed may have lost the sentinel: 5 s more at most
            deadline = min(deadline, time.monotonic() + 5)
        time.sleep(0.02)
    if sent is None:
        sent = hop._line(sender, 120)
    time.sleep(1.2)                     # two announcement periods: the counters are current
    after = _stored(con)
    per = {m: after.get(m, 0) - before.get(m, 0) - 1 for m in after}   # minus the sentinel
    slowest = max(done_at.values(), default=time.monotonic()) - t0
    return {"offered": rate or None, "tuples": total, "seconds": slowest,
            "rate": min(per.values()) / slowest if per else 0.0,
            "lost": {m: total - n for m, n in per.items()},
            "sender_rate": sent["sent"] / sent["seconds"],
            "monitor_cpu_us": statistics.mean((hop.cpu_seconds(p.pid) - cpu0[p.pid]) * 1e6 / total
                                              for p, _ in monitors)}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _baseline(rounds: int, queries: int) -> dict:
    """One TupleStore in this process: the storage floor."""
    from psepr.channel import parse
    from psepr.pldb import Query, Replies, Tuple
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
    # The asker's share of a subtree query: merging three monitors' answers (the
    # rows checked, the newest version of each key kept, Tuples built, sorted).
    rows = [t.row() for t in got]
    merge = []
    for _ in range(5):
        replies = Replies()
        for m in ("m1", "m2", "m3"):
            replies.add({"monitor": m, "part": 0, "last": True, "peers": [], "tuples": rows})
        t = time.perf_counter()
        replies.tuples()
        merge.append(time.perf_counter() - t)
    return {"rate": rate, "one_p50_ms": _pct(lat, 0.5) * 1e3, "one_p99_ms": _pct(lat, 0.99) * 1e3,
            "subtree_p50_ms": _pct(sub, 0.5) * 1e3, "subtree_tuples": len(got),
            "merge_p50_ms": _pct(merge, 0.5) * 1e3}


def run(rounds: int, queries: int, rate: int) -> dict:
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
            sender = subprocess.Popen([sys.executable, "-m", "benchmarks.pldb", "send", urls[1]],
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            procs.append(sender)
            hop._line(sender, 30)
            con = psepr.connect(urls[0], preset="local")
            res["ingest"] = []
            for run_no, offered in enumerate((rate, rate * 3 // 2, 0), 1):
                res["ingest"].append(_ingest(con, sender, mons, offered, rounds, run_no))
                res["ingest"][-1]["monitor_rss_mib"] = [rss_kib(p.pid) / 1024 for p, _ in mons]
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
    rounds = 3 if args.quick else 15
    queries = 200 if args.quick else 2000
    rate = 50_000
    print(f"  baseline: {rounds * NODES * FIELDS:,} tuples straight into one SQLite store ...",
          file=sys.stderr, flush=True)
    base = _baseline(rounds, queries)
    print(f"  3 routers, 3 monitors, {rounds * NODES * FIELDS:,} tuples through the overlay at "
          f"{rate:,}/s, at {rate * 3 // 2:,}/s, then unpaced ...", file=sys.stderr, flush=True)
    res = run(rounds, queries, rate)
    res["baseline"] = base
    q, m = res["query"], res["memory"]
    print(f"\npsepr bench pldb  ({os.cpu_count()} cores; {NODES:,} nodes x {FIELDS} fields; "
          f"3 routers in a chain, a monitor on each; loopback)\n")
    print(f"{'scenario':<36} {'through PLDB':>24} {'one TupleStore, in process':>28}")
    for i, ing in enumerate(res["ingest"]):
        offered = f"offered {ing['offered']:,}/s" if ing["offered"] else "unpaced"
        lost = sum(ing["lost"].values())
        print(f"{'ingest, ' + offered:<36} {ing['rate']:>20,.0f}/s" +
              (f" {base['rate']:>26,.0f}/s" if i == 0 else ""))
        print(f"{'  stored by each of 3 monitors in':<36} {ing['seconds']:>20.2f} s "
              f"   (sender {ing['sender_rate']:,.0f}/s; lost {lost:,})")
        print(f"{'  monitor CPU per tuple, RSS after':<36} {ing['monitor_cpu_us']:>19.1f} us "
              f"   ({' / '.join(f'{x:.0f}' for x in ing['monitor_rss_mib'])} MiB)")
    print(f"{'query one tuple p50 / p99':<36} {q['one_p50_ms']:>11.2f} / {q['one_p99_ms']:>6.2f} ms "
          f"{base['one_p50_ms']:>14.3f} / {base['one_p99_ms']:>6.3f} ms")
    print(f"{'query subtree p50 / max':<36} {q['subtree_p50_ms']:>11.0f} / {q['subtree_max_ms']:>6.0f} ms "
          f"{base['subtree_p50_ms']:>14.0f} ms (p50)")
    print(f"{'  tuples in the subtree':<36} {q['subtree_tuples']:>24,} {base['subtree_tuples']:>28,}")
    print(f"{'  merging 3 answers of them, p50':<36} {'':>24} {base['merge_p50_ms']:>25.0f} ms")
    print(f"{'monitor RSS at the end, MiB':<36} {' / '.join(f'{x:.1f}' for x in m['monitor_rss_mib']):>24}")
    print(f"{'database on disk, MiB':<36} {' / '.join(f'{x:.1f}' for x in m['db_mib']):>24}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _role_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pldb")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send")
    s.add_argument("url")
    a = p.parse_args(argv)
    role_send(a)


if __name__ == "__main__":
    _role_main(sys.argv[1:])
