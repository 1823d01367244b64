"""`psepr bench failure`: how fast and how reliably the failure detectors work.

Set-up (every role its own process, loopback): three routers in a full mesh
(r0, r1, r2), a detector on each (``psepr detector``, d1 on r0, d2 on r1, d3 on
r2; d1 leads while healthy), and 200 simulated nodes: 190 of them in five
``psepr agent`` processes (38 hosts each, without sensors), and 10 *victims*
drawn with a seeded :class:`random.Random`, each alone in its own agent process
so that one SIGKILL kills exactly one node.  Agents, detectors and the
subscriber are spread over the three routers, so beats, opinions and
membership events all cross the overlay.  Routers, detectors and agents run
the chosen preset (``lan`` by default).

A subscriber in this process leases ``/example.com/farm/membership/`` (type
``membership``) on r2 and records the arrival time (CLOCK_MONOTONIC) of every
change event the leader publishes.  Once the view holds every node ``alive``:

* ``steady``     a quiet window: the CPU each detector (and each router) uses
                 while 200 nodes beat, the traffic (TCP bytes, from the
                 kernel's per-socket counters) each node sends and each
                 detector receives and sends, and the baseline below.
* ``detection``  the victims are SIGKILLed one at a time at random moments
                 (0.1-0.6 s apart); for each, the time from the kill to the
                 first ``failed`` event for it at the subscriber: p50/p99/max,
                 and the time to the first ``suspect``.  A ``failed`` event for
                 any other node is a *false failure*.
* ``load``       one busy-loop process per core (``python -c "while True:
                 pass"``) for ``--load-seconds`` (60): the ``failed`` (false
                 failures) and ``suspect`` (false suspicions) events for live
                 nodes during it and for a settle time after it, the highest
                 local health score of each detector (Lifeguard: a starved
                 detector doubts itself before it accuses anyone), and the
                 detectors' CPU under load.

Baselines, measured in the same run: the one-hop event latency through the
overlay (a probe event sent ten times a second on r0, where the leader sits,
to the subscriber on r2 -- the path a membership event takes), in the steady
window and under load; and the detection window the preset implies: a node
dies at a random moment of its beat period, so a detector suspects it
``t_fail - t_gossip`` to ``t_fail`` after the kill, plus up to a tick for the
suspicion and another for the leader to count the second vote (plus the hops).
Targets (``lan``): p99 detection at most 3 s, zero false failures.

Every wait is bounded in time; only processes started here are stopped, by
their own pids, at the end.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks import hop
from benchmarks.overlay import start_overlay
from benchmarks.pldb import _pct

ROOT = Path(__file__).resolve().parent.parent
AUTH = "example.com"
AGENT_PROCS = 5                      # processes sharing the non-victim nodes
PROBE_CHANNEL = f"/{AUTH}/bench/probe/"
PROBE_TYPE = "bench-probe"
TARGET_P99_S = 3.0                   # the lan preset's targets
TARGET_FALSE = 0


# -- processes -----------------------------------------------------------------------------------

def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    """``python -m psepr.cli ARGS`` with stdout piped (for "(ready)") and stderr to ``log``."""
    with open(log, "w") as err:
        return subprocess.Popen([sys.executable, "-m", "psepr.cli", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=err, text=True)


def _tail(log: Path, lines: int = 8) -> str:
    try:
        return "\n".join(log.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def _await_ready(p: subprocess.Popen, log: Path, what: str, deadline: float) -> None:
    """Wait for the line ending "(ready)" on ``p``'s stdout, until ``deadline``."""
    while time.monotonic() < deadline:
        r, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        line = p.stdout.readline()
        if not line:
            break                                   # it exited
        if line.rstrip().endswith("(ready)"):
            return
    raise RuntimeError(f"{what} did not become ready (exit code {p.poll()}):\n{_tail(log)}")


def _cpu(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    return {name: hop.cpu_seconds(p.pid) for name, p in procs.items()}


def _io(procs: dict[str, subprocess.Popen]) -> dict[str, tuple[int, int]]:
    """Per process: TCP payload bytes (received, sent) so far over its open sockets.

    Read from the kernel's per-socket counters (``ss -tinp``: bytes_received,
    bytes_sent), so it is what really crossed the loopback, ZMTP framing included.

    Raises:
        FileNotFoundError: ``ss`` (iproute2) is not installed.
    """
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=30).stdout
    by_pid: dict[int, list[int]] = {}
    pid = None
    for line in out.splitlines():
        m = re.search(r"pid=(\d+),", line)
        if m:
            pid = int(m.group(1))
            continue
        if pid is not None:
            got = by_pid.setdefault(pid, [0, 0])
            for i, key in enumerate(("bytes_received", "bytes_sent")):
                m = re.search(key + r":(\d+)", line)
                got[i] += int(m.group(1)) if m else 0
            pid = None
    return {name: tuple(by_pid.get(p.pid, (0, 0))) for name, p in procs.items()}


def _traffic(before: dict, after: dict, seconds: float) -> dict:
    """Per process: bytes per second in and out between two :func:`_io` readings."""
    return {name: {"in": (after[name][0] - before[name][0]) / seconds,
                   "out": (after[name][1] - before[name][1]) / seconds} for name in before}


def _cpu_use(before: dict[str, float], after: dict[str, float], seconds: float) -> dict:
    """Per process: CPU seconds used, and that as a percentage of one core."""
    return {name: {"seconds": after[name] - before[name],
                   "percent": 100.0 * (after[name] - before[name]) / seconds}
            for name in before}


# -- the subscriber and the prober --------------------------------------------------------------

class Recorder:
    """The subscriber: membership changes and probes, with their arrival times.

    One connection, driven by one thread; ``changes`` holds ``(arrival,
    payload)`` and ``probes`` ``(arrival, latency, phase)``.  The leases are
    propagated: once this returns, events from any router reach it.
    """

    def __init__(self, url: str, preset: str) -> None:
        import psepr
        from services.membership import CHANGE, membership_channel
        self.con = psepr.connect(url, preset=preset, service="bench-subscriber")
        self.con.lease(membership_channel(AUTH), type=CHANGE, propagated=True, timeout=10)
        self.con.lease(PROBE_CHANNEL, type=PROBE_TYPE, propagated=True, timeout=10)
        self.changes: list[tuple[float, dict]] = []
        self.probes: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-recorder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psepr
        receive, monotonic = self.con.receive, time.monotonic
        while not self._stop.is_set():
            try:
                ev = receive(timeout=0.2)
            except psepr.TimeoutError:
                continue
            except psepr.ClosedError:
                return
            except psepr.PseprError:       # ConnectionLost: the SDK reconnects
                continue
            now = monotonic()
            p = ev.payload
            if ev.type == PROBE_TYPE:
                self.probes.append((now, now - p["t"], p["phase"]))
            elif isinstance(p, dict):
                self.changes.append((now, p))

    def events(self, state: str, since: float = 0.0, until: float = float("inf")):
        """``(arrival, host)`` of every change to ``state`` that arrived in [since, until]."""
        return [(t, p.get("host")) for t, p in list(self.changes)
                if p.get("state") == state and since <= t <= until]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.con.close()


class Prober:
    """Sends a probe event (carrying its send time) every ``period`` seconds, tagged
    with the current ``phase``; nothing is sent while ``phase`` is None."""

    def __init__(self, url: str, preset: str, period: float = 0.1) -> None:
        import psepr
        self.con = psepr.connect(url, preset=preset, service="bench-prober")
        self.period = period
        self.phase: str | None = None
        self.sent: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psepr
        while not self._stop.wait(self.period):
            phase = self.phase
            if phase is None:
                continue
            try:
                self.con.send(PROBE_CHANNEL, {"t": time.monotonic(), "phase": phase},
                              type=PROBE_TYPE)
                self.sent[phase] = self.sent.get(phase, 0) + 1
            except psepr.PseprError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self.con.close()


def _probe_figures(rec: Recorder, prober: Prober, phase: str) -> dict:
    lat = [x for _, x, ph in list(rec.probes) if ph == phase]
    if not lat:
        return {"n": 0, "sent": prober.sent.get(phase, 0)}
    return {"n": len(lat), "sent": prober.sent.get(phase, 0), "p50_ms": _pct(lat, 0.5) * 1e3,
            "p99_ms": _pct(lat, 0.99) * 1e3, "max_ms": max(lat) * 1e3}


def _statuses(con, timeout: float = 2.0) -> list[dict]:
    """Every detector's answer to a ``members`` query (its view, health, leader)."""
    from services.membership import QUERY, membership_channel
    import psepr
    try:
        replies = con.request_all(membership_channel(AUTH), {}, type=QUERY, timeout=timeout,
                                  settle=0.3, done=lambda rs: len(rs) >= 3)
    except psepr.PseprError:
        return []
    return [r.payload for r in replies if isinstance(r.payload, dict)]


def _wait_all_alive(con, hosts: list[str], timeout: float) -> dict:
    """Until the newest view holds every host ``alive`` and all 3 detectors answer healthy."""
    from services.membership import View, best_answer
    deadline = time.monotonic() + timeout
    shown = 0.0
    alive, answers = 0, []
    while time.monotonic() < deadline:
        answers = _statuses(con)
        best = best_answer(SimpleNamespace(payload=a) for a in answers)
        view = best[0] if best else View()
        alive = sum(1 for h in hosts
                    if h in view.members and view.members[h].state == "alive")
        if alive == len(hosts) and len(answers) == 3 and all(a.get("healthy") for a in answers):
            return {"view": view.number, "leader": view.leader}
        if time.monotonic() - shown > 3.0:
            shown = time.monotonic()
            print(f"  {alive}/{len(hosts)} nodes alive in view {view.number}, "
                  f"{len(answers)} detectors answering ...", file=sys.stderr, flush=True)
        time.sleep(0.5)
    raise RuntimeError(f"only {alive}/{len(hosts)} nodes alive, {len(answers)} detectors "
                       f"answering after {timeout:.0f} s")


# -- the run -------------------------------------------------------------------------------------

def run(nodes: int = 200, victims: int = 10, load_seconds: float = 60.0, preset: str = "lan",
        seed: int = 1, steady_seconds: float = 10.0) -> dict:
    """Set up, measure the three phases, tear down.  Returns the figures (see the module doc).

    Raises:
        PseprError: ``ss`` (iproute2), which reads the traffic counters, is missing.
    """
    import shutil
    if shutil.which("ss") is None:
        from psepr.errors import PseprError
        raise PseprError("psepr bench failure reads TCP counters with `ss`: install iproute2 "
                         "(apt-get install -y iproute2; `make test` does)")
    import psepr
    from services.detection import DetectionConfig
    cfg = DetectionConfig.preset(preset)
    if victims >= nodes:
        from psepr.errors import UsageError
        raise UsageError(f"--victims ({victims}) must be fewer than --nodes ({nodes}): at least "
                         f"one node lives to be watched")
    rng = random.Random(seed)
    hosts = [f"n{i:03}" for i in range(nodes)]
    doomed = sorted(rng.sample(hosts, victims))
    living = [h for h in hosts if h not in set(doomed)]
    per = -(-len(living) // AGENT_PROCS)
    groups = [living[i:i + per] for i in range(0, len(living), per)]

    res: dict = {"preset": preset, "nodes": nodes, "victims": doomed, "seed": seed,
                 "agent_processes": len(groups) + victims, "hosts_per_process": per,
                 "t_gossip": cfg.t_gossip, "t_fail": cfg.t_fail, "tick": cfg.tick}
    procs: list[subprocess.Popen] = []          # everything started here, stopped in finally
    busy: list[subprocess.Popen] = []
    rec = prober = ctl = None

    def say(text: str) -> None:
        print(f"  {text}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="psepr-bench-failure-") as tmp:
        logs = Path(tmp)
        try:
            say(f"3 routers in a mesh ({preset}) ...")
            # The routers run the chosen preset too: the local preset's 0.75 s peer
            # timeout is not what a lan farm runs under load.
            routers, urls = start_overlay(3, [(0, 1), (0, 2), (1, 2)], preset)
            procs += routers
            common = ["--authority", AUTH, "--preset", preset]
            dets = {}
            for i, url in enumerate(urls):
                name = f"d{i + 1}"
                dets[name] = _spawn(["detector", *common, "--name", name, "--router", url],
                                    logs / f"{name}.log")
                procs.append(dets[name])
            for name, p in dets.items():
                _await_ready(p, logs / f"{name}.log", f"detector {name}", time.monotonic() + 30)
            rec = Recorder(urls[2], preset)            # subscribed before any node exists
            prober = Prober(urls[0], preset)
            ctl = psepr.connect(urls[1], preset=preset, service="bench-control")

            say(f"{nodes} nodes: {len(living)} in {len(groups)} agent processes, "
                f"{victims} victims alone ...")
            agents: dict[str, subprocess.Popen] = {}   # label -> process
            victim_proc: dict[str, subprocess.Popen] = {}
            for k, names in enumerate([*groups, *([v] for v in doomed)]):
                label = f"agent{k}" if k < len(groups) else names[0]
                args = ["agent", *common, "--no-sensors", "--router", urls[k % 3]]
                p = _spawn(args + [a for h in names for a in ("--host", h)], logs / f"{label}.log")
                procs.append(p)
                agents[label] = p
                if k >= len(groups):
                    victim_proc[names[0]] = p
            deadline = time.monotonic() + 60
            for label, p in agents.items():
                _await_ready(p, logs / f"{label}.log", f"agent {label}", deadline)
            say("waiting until the view holds every node alive ...")
            t_ready0 = time.monotonic()
            ready = _wait_all_alive(ctl, hosts, timeout=60 + nodes * 0.1)
            res["all_alive_s"] = time.monotonic() - t_ready0
            res["leader"] = ready["leader"]
            t_start = time.monotonic()

            # -- steady: CPU of detectors and routers, and the probe baseline -------------
            say(f"steady window, {steady_seconds:g} s ...")
            watched = {**dets, **{f"r{i}": p for i, p in enumerate(routers)}}
            live_agents = {k: p for k, p in agents.items() if k not in victim_proc}
            prober.phase = "steady"
            io0 = _io({**dets, **live_agents})
            cpu0, a0, t0 = _cpu(watched), _cpu(live_agents), time.monotonic()
            time.sleep(steady_seconds)
            cpu1, a1, t1 = _cpu(watched), _cpu(live_agents), time.monotonic()
            io1 = _io({**dets, **live_agents})
            prober.phase = None
            res["cpu_steady"] = _cpu_use(cpu0, cpu1, t1 - t0)
            res["agent_cpu_steady_pct"] = 100.0 * (sum(a1.values()) - sum(a0.values())) / (t1 - t0)
            res["window_s"] = t1 - t0
            traffic = _traffic(io0, io1, t1 - t0)
            res["traffic_detectors"] = {n: traffic[n] for n in dets}
            res["traffic_per_node_out"] = sum(traffic[n]["out"] for n in live_agents) / (
                nodes - victims)

            # -- detection: SIGKILL the victims one at a time ------------------------------
            say(f"SIGKILL of {victims} victims at random moments ...")
            killed: dict[str, float] = {}
            order = list(doomed)
            rng.shuffle(order)
            for v in order:
                time.sleep(rng.uniform(0.1, 0.6))
                victim_proc[v].kill()
                killed[v] = time.monotonic()
            last_kill = max(killed.values())
            deadline = last_kill + 10 * (cfg.t_fail + cfg.tick) + 10
            detected: dict[str, float] = {}
            while time.monotonic() < deadline and len(detected) < victims:
                for t, h in rec.events("failed", since=t_start):
                    if h in killed and h not in detected and t >= killed[h]:
                        detected[h] = t - killed[h]
                time.sleep(0.05)
            suspected: dict[str, float] = {}
            for state in ("suspect", "failed"):
                for t, h in rec.events(state, since=t_start):
                    if h in killed and t >= killed[h]:
                        suspected[h] = min(suspected.get(h, 1e9), t - killed[h])
            times = sorted(detected.values())
            res["detection"] = {
                "times_s": {h: detected.get(h) for h in order},
                "undetected": [h for h in order if h not in detected],
                "p50_s": _pct(times, 0.5) if times else None,
                "p99_s": _pct(times, 0.99) if times else None,
                "max_s": max(times) if times else None,
                "min_s": min(times) if times else None,
                "suspect_p50_s": (statistics.median(suspected.values()) if suspected else None)}
            res["model_s"] = [cfg.t_fail - cfg.t_gossip, cfg.t_fail + 2 * cfg.tick]
            say(f"detected {len(detected)}/{victims}"
                + (f", p50 {res['detection']['p50_s']:.2f} s, max {max(times):.2f} s"
                   if times else ""))

            # -- load: one busy loop per core ------------------------------------------------
            ncpu = os.cpu_count() or 1
            say(f"full CPU load: {ncpu} busy loops for {load_seconds:g} s ...")
            health_max = {name: 0 for name in dets}
            leaders: set = set()
            prober.phase = "load"
            cpu0, t_load0 = _cpu(watched), time.monotonic()
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(ncpu)]
            next_say = t_load0 + 10
            while time.monotonic() - t_load0 < load_seconds:
                for a in _statuses(ctl, timeout=1.0):
                    if a.get("detector") in health_max:
                        health_max[a["detector"]] = max(health_max[a["detector"]],
                                                        int(a.get("health") or 0))
                    if a.get("leader"):
                        leaders.add(a["leader"])
                if time.monotonic() > next_say:
                    next_say += 10
                    say(f"  load {time.monotonic() - t_load0:.0f} s; false suspicions so far "
                        f"{sum(1 for _, h in rec.events('suspect', since=t_load0) if h not in killed)}")
                time.sleep(max(0.0, min(1.0, load_seconds - (time.monotonic() - t_load0))))
            hop._stop(*busy)
            cpu1, t_load1 = _cpu(watched), time.monotonic()
            prober.phase = None
            busy = []
            settle = cfg.t_fail + 4 * cfg.tick + 1.0  # a suspicion the load caused shows by then
            time.sleep(settle)
            t_end = time.monotonic()
            res["cpu_load"] = _cpu_use(cpu0, cpu1, t_load1 - t_load0)
            res["load"] = {
                "seconds": t_load1 - t_load0, "busy_loops": ncpu, "settle_s": settle,
                "false_failures": sum(1 for _, h in rec.events("failed", t_load0, t_end)
                                      if h not in killed),
                "false_suspicions": sum(1 for _, h in rec.events("suspect", t_load0, t_end)
                                        if h not in killed),
                "health_max": health_max, "leaders_seen": sorted(leaders)}
            res["false_failures_total"] = sum(1 for _, h in rec.events("failed") if h not in killed)
            res["false_suspicions_total"] = sum(1 for _, h in rec.events("suspect")
                                                if h not in killed)
            res["probe"] = {ph: _probe_figures(rec, prober, ph) for ph in ("steady", "load")}
        finally:
            for c in (prober, rec, ctl):
                if c is not None:
                    try:
                        c.close()
                    except Exception:       # teardown goes on whatever a client does
                        pass
            hop._stop(*busy)
            hop._stop(*reversed(procs))     # agents first, then detectors, then routers
    return res


# -- the report ----------------------------------------------------------------------------------

def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


def _fmt_probe(p: dict) -> str:
    if not p.get("n"):
        return f"none of {p.get('sent', 0)} arrived"
    return f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} ms"


def report(res: dict) -> None:
    d, load, pr = res["detection"], res["load"], res["probe"]
    lan = res["preset"] == "lan"
    print(f"\npsepr bench failure  ({os.cpu_count()} cores; {res['nodes']} simulated nodes in "
          f"{res['agent_processes']} agent processes ({res['hosts_per_process']} hosts each, "
          f"{len(res['victims'])} victims alone); 3 routers in a mesh, a detector on each; "
          f"preset {res['preset']}: beat every {res['t_gossip']:g} s, t_fail {res['t_fail']:g} s, "
          f"tick {res['tick']:g} s; loopback; seed {res['seed']})\n")
    w = 44
    print(f"{'figure':<{w}} {'measured':>22}   baseline (same run)")
    lo, hi = res["model_s"]
    print(f"{'detection, SIGKILL -> failed, p50':<{w}} {_fmt_s(d['p50_s']):>22}   "
          f"model: {lo:.2f} .. {hi:.2f} s + 2 overlay hops")
    target = (f"   target <= {TARGET_P99_S:g} s: "
              f"{'met' if d['p99_s'] is not None and d['p99_s'] <= TARGET_P99_S else 'MISSED'}"
              if lan else "")
    print(f"{'  p99 / max':<{w}} {_fmt_s(d['p99_s']) + ' / ' + _fmt_s(d['max_s']):>22}{target}")
    print(f"{'  min; first suspicion p50':<{w}} "
          f"{_fmt_s(d['min_s']) + '; ' + _fmt_s(d['suspect_p50_s']):>22}")
    found = f"{len(d['times_s']) - len(d['undetected'])} of {len(d['times_s'])}"
    print(f"{'  victims detected':<{w}} {found:>22}"
          + (f"   undetected: {', '.join(d['undetected'])}" if d["undetected"] else ""))
    print(f"{'one-hop event latency p50 / p99, steady':<{w}} {_fmt_probe(pr['steady']):>22}   "
          f"(probe r0 -> r2: the leader's path to the subscriber)")
    print(f"{'  under full CPU load':<{w}} {_fmt_probe(pr['load']):>22}")
    target = (f"   target {TARGET_FALSE}: "
              f"{'met' if res['false_failures_total'] <= TARGET_FALSE else 'MISSED'}" if lan else "")
    print(f"{'false failures, whole run':<{w}} {res['false_failures_total']:>22}{target}")
    print(f"{'  during %g s of full load (+%g s)' % (round(load['seconds']), load['settle_s']):<{w}} "
          f"{load['false_failures']:>22}   ({load['busy_loops']} busy loops)")
    print(f"{'false suspicions, whole run; under load':<{w}} "
          f"{str(res['false_suspicions_total']) + '; ' + str(load['false_suspicions']):>22}")
    print(f"{'highest detector health score under load':<{w}} "
          f"{' / '.join(str(v) for v in load['health_max'].values()):>22}   "
          f"(0 = healthy; leaders seen: {', '.join(load['leaders_seen']) or '-'})")
    for phase, title in (("cpu_steady", f"steady {res['window_s']:.0f} s"),
                         ("cpu_load", f"under load {load['seconds']:.0f} s")):
        cpu = res[phase]
        dets = [f"{cpu[n]['percent']:.1f}" for n in sorted(cpu) if n.startswith("d")]
        routers = [f"{cpu[n]['percent']:.1f}" for n in sorted(cpu) if n.startswith("r")]
        secs = "/".join(f"{cpu[n]['seconds']:.2f}" for n in sorted(cpu) if n.startswith("d"))
        print(f"{'detector CPU d1/d2/d3 %, ' + title:<{w}} {' / '.join(dets):>22}   "
              f"({secs} s); routers {' / '.join(routers)} %")
    print(f"{'all agent processes CPU %, steady':<{w}} {res['agent_cpu_steady_pct']:>22.1f}")
    td = res["traffic_detectors"]
    ins = " / ".join(f"{td[n]['in'] / 1e3:.0f}" for n in sorted(td))
    outs = " / ".join(f"{td[n]['out'] / 1e3:.1f}" for n in sorted(td))
    print(f"{'traffic per node out, bytes/s, steady':<{w}} "
          f"{res['traffic_per_node_out']:>22.0f}   (heartbeats, TCP bytes sent)")
    print(f"{'traffic per detector in, kB/s, steady':<{w}} {ins:>22}   out {outs} kB/s")
    print(f"\n(CPU % is of one core.  Leader at the start: {res['leader']}; all {res['nodes']} "
          f"nodes alive in the view {res['all_alive_s']:.1f} s after the agents were ready.)")


def main(args) -> int:
    """``psepr bench failure``: run, print the table (and JSON with --json)."""
    quick = args.quick
    nodes = args.nodes if args.nodes is not None else (20 if quick else 200)
    victims = args.victims if args.victims is not None else (2 if quick else 10)
    load = args.load_seconds if args.load_seconds is not None else (3.0 if quick else 60.0)
    seed = args.seed if args.seed is not None else 1
    preset = args.preset or "lan"
    res = run(nodes=nodes, victims=victims, load_seconds=load, preset=preset, seed=seed,
              steady_seconds=3.0 if quick else 10.0)
    report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0
