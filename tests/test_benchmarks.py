"""The benchmarks keep working: they run end to end on small counts.

They assert what a benchmark must get right (every event counted, every row
printed), never a speed: speed targets live in the benchmarks, not in tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.core import _measure
from tests.conftest import ROOT


def test_bench_core_measures_both_cores():
    r = _measure(channels=10, holders=2, events=4000, reps=1)
    assert r["router_us_per_delivery"] > 0 and r["client_us_per_event"] > 0


@pytest.mark.slow
def test_bench_hop_quick_prints_every_scenario_for_every_system():
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "hop", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("1->1 events/s", "latency @5k/s", "fan-out x10 deliveries/s",
                "1000 leases events/s", "1->1 asyncio clients events/s"):
        assert row in table
    assert "raw-pyzmq" in table and "libzmq-proxy" in table
    # Every PsEPR scenario received everything it was sent (no loss in a quick run).
    assert table.count("dropped 0") == 5, table


def test_bench_idle_runs():
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "idle", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "client process CPU" in out.stdout and "router process CPU" in out.stdout


@pytest.mark.slow
def test_bench_overlay_quick_prints_every_scenario():
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "overlay", "--quick",
                          "--aged", "4000", "--rounds", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("latency @5k/s p50 / p99", "throughput events/s", "lease reach: 6 routers",
                "idle memory: 1,000 leases", "aged chain at 5,000 events/s", "median of 2 rounds"):
        assert row in table, table
    # Every round's figure of the chain and of both baselines, beside the median.
    rounds = [line for line in table.splitlines() if " rounds: latency p99 (us) " in line]
    assert len(rounds) == 3, table
    assert all(line.count(" / ") == 2 for line in rounds), rounds     # 2 + 2 figures
    # --aged 4000 in runs of 2,000 (quick): a run with none before it, one after 2,000
    aged = table.split("aged chain at 5,000 events/s")[1].splitlines()
    assert [line.split()[0] for line in aged[2:4]] == ["0", "2,000"], table


@pytest.mark.slow
def test_bench_pldb_quick_prints_every_scenario():
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "pldb", "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("ingest, offered 50,000/s", "ingest, offered 75,000/s", "ingest, unpaced",
                "query one tuple p50 / p99", "query subtree p50 / max", "merging 3 answers",
                "database on disk, MiB"):
        assert row in table, table
    # the subtree answer holds every tuple: 1,000 nodes x 20 fields, and the run's sentinel
    assert "20,001" in table and "lost 0)" in table, table


@pytest.mark.slow
def test_bench_failure_quick_detects_every_victim(tmp_path):
    out_json = tmp_path / "failure.json"
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "failure", "--quick",
                          "--nodes", "20", "--victims", "2", "--load-seconds", "3",
                          "--preset", "local", "--json", str(out_json)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout
    for row in ("detection, SIGKILL -> failed, p50", "one-hop event latency p50 / p99, steady",
                "false failures, whole run", "detector CPU d1/d2/d3 %, steady",
                "detector CPU d1/d2/d3 %, under load"):
        assert row in table, table
    import json
    res = json.loads(out_json.read_text())
    d = res["detection"]
    assert len(res["victims"]) == 2 and d["undetected"] == [], (d, out.stderr[-2000:])
    # local preset: t_fail 1 s; a failure shows well inside 10 s, never before the kill
    assert all(0 < t < 10 for t in d["times_s"].values()), d
    assert 0 < d["p50_s"] <= d["p99_s"] <= d["max_s"] < 10
    assert res["probe"]["steady"]["n"] > 0 and res["probe"]["steady"]["p50_ms"] > 0
    assert set(res["cpu_steady"]) == {"d1", "d2", "d3", "r0", "r1", "r2"}
    assert all(c["seconds"] >= 0 for c in res["cpu_steady"].values())
    assert res["load"]["busy_loops"] >= 1 and res["load"]["seconds"] >= 3
    assert isinstance(res["false_failures_total"], int)


@pytest.mark.slow
def test_bench_stages_matches_every_event_at_every_boundary(tmp_path):
    out = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", "stages", "--quick",
                          "--chain", "--json", str(tmp_path / "s.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "s.json").read_text())
    assert set(res) == {"one hop", "chain of 3"}
    assert set(res["one hop"]) == {"psepr", "psepr, min receiver", "raw pyzmq"}
    for title, paths in res.items():
        for name, stages in paths.items():
            # Every event crossed every boundary in order (no event lost, no note missing).
            assert stages["total"]["n"] == 2000, (title, name)
            hops = ["r0", "r1", "r2"] if title == "chain of 3" else ["router"]
            # A PsEPR router's stage is followed by how much of it the router ran.
            on_cpu = {h: [f"{h} on CPU"] if name != "raw pyzmq" else [] for h in hops}
            assert [k for k in stages if k not in ("total", "cpu_us", "threads_us")] == [
                "send call", *[s for h in hops for s in (f"to {h}", h, *on_cpu[h])],
                "to receiver", "receiver"]
            assert all(stages[k]["n"] == 2000 for k in stages if k not in ("cpu_us", "threads_us"))
            if os.path.exists("/proc/self/task/%d/schedstat" % os.getpid()):
                # Every process's main thread and ZeroMQ I/O thread ran during the
                # sampled window, and what each waited for a CPU is a time, not a guess.
                threads = stages["threads_us"]
                for proc in ("sender", *hops, "receiver"):
                    for kind in ("main", "ZMQ I/O"):
                        assert threads[f"{proc} {kind}"]["cpu"] > 0, (title, name, proc, kind)
                        assert threads[f"{proc} {kind}"]["wait"] >= 0
            assert set(stages["cpu_us"]) == {"sender", *hops, "receiver"}
            for h in hops:
                if on_cpu[h]:
                    # Event by event the thread ran no longer than the stage lasted.
                    assert 0 < stages[f"{h} on CPU"]["p50_us"] <= stages[h]["p50_us"] + 1
                    assert stages[f"{h} on CPU"]["p99_us"] <= stages[h]["p99_us"] + 1


@pytest.mark.parametrize("args, says", [
    (["hop", "--events", "0"], "argument --events: must be a whole number of at least 1"),
    (["overlay", "--rounds", "-1"], "argument --rounds: must be a whole number of at least 1"),
    (["overlay", "--aged", "x"], "argument --aged: must be a whole number of at least 1"),
    (["failure", "--nodes", "0"], "argument --nodes: must be a whole number of at least 1"),
    (["failure", "--load-seconds", "nan"], "argument --load-seconds: must be a positive number"),
    (["failure", "--victims", "30", "--nodes", "10"],
     "--victims (30) must be fewer than --nodes (10)"),
])
def test_bench_arguments_out_of_range_fail_in_one_line_before_starting_anything(args, says):
    # `--events 0` ran a whole benchmark of nothing; `failure --nodes 0` ended in a
    # ValueError traceback.
    r = subprocess.run([sys.executable, "-m", "psepr.cli", "bench", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    line, = r.stderr.strip().splitlines()
    assert line.startswith("psepr bench: error: ") and says in line
