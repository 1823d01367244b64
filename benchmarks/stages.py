"""`psepr bench stages`: where one event's latency goes, stage by stage.

``psepr bench hop`` and ``psepr bench overlay`` give one latency per path; this
benchmark splits it.  Events are paced at 5,000/s (their latency scenario) and
every process on the path notes CLOCK_MONOTONIC, which all processes of a host
share, at its boundaries: a process handing a message to ZeroMQ notes the time
just before the call (so a note never comes after the next process has the
message), a process taking one notes it once the message is in hand, and the
receiver notes when the payload is decoded.  An event's time at a boundary is
the first time noted there at or after its time at the boundary before (events
travel in order; a batch shares one time).  The stages are the differences:

* ``send call``      the payload is built and ``send`` runs (encoding, queueing)
                     up to the hand-off to ZeroMQ;
* ``to <router>``    the ZeroMQ send call, the sender's ZeroMQ I/O thread, TCP,
                     the next process's I/O thread, that process waking up and
                     reading the message;
* ``<router>``       from the message in hand to the hand-off of its delivery;
  ``<router> on CPU`` is how much of that its thread spent running (equal to
  the stage: the router was working, not waiting for a CPU);
* ``to receiver``    as ``to <router>``, into the receiving process;
* ``receiver``       from the message in hand to the payload decoded.

Paths, one hop: PsEPR (SDK sender, router, SDK receiver); PsEPR with a
*minimal receiver* that speaks the wire protocol with no SDK at all (HELLO,
LEASE, then poll, receive, decode: the floor any client library could reach);
and ``psepr bench hop``'s raw pyzmq forwarder path.  With ``--chain``, PsEPR
across three routers beside a chain of three raw forwarders.  Beside the stages:
the CPU each process used per event (all its threads), over the run; and, per
thread (main, ZeroMQ I/O, the rest), the time it ran and the time it was ready
to run but waited for a CPU (Linux's ``/proc/<pid>/task/<tid>/schedstat``),
sampled over the middle of the paced run.  On two cores shared by six threads
or more, the waiting is where extra CPU per event turns into latency.

Timestamps are taken by wrapping the router's and the SDK's internal functions
inside this benchmark's own processes; nothing in the product is changed.
Every run is bounded in events and seconds.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import hop

RATE = 5000
CHANNEL = "/bench/stages/"


# -- roles (each its own process; each writes its notes to --out) ------------------------

def _save(path: str, notes: dict) -> None:
    Path(path).write_text(json.dumps(notes))


def _paced(count: int, send_one) -> float:
    """Call ``send_one(payload)`` ``count`` times at RATE per second (sleeping, never
    spinning); each payload carries the time it was made.  Returns the CPU used."""
    mono = time.monotonic
    print(json.dumps({"pacing": True}), flush=True)     # the threads' sampling starts now
    cpu0 = time.process_time()
    t0 = mono()
    for i in range(count):
        delay = t0 + i / RATE - mono()
        if delay > 0:
            time.sleep(delay)
        send_one({"i": i, "t": mono(), "p": "x" * 56})
    return time.process_time() - cpu0


def role_router(a) -> None:
    """A PsEPR router with notes at client input, peer input and both outputs."""
    from psepr.config import tune_gc
    from psepr.wire import KIND_BYTES, Kind
    from routers import router as R
    from routers.config import RouterConfig
    from routers.core import RouterCore
    from routers.overlay import OverlayCore
    fwd, dlv = KIND_BYTES[Kind.FORWARD], KIND_BYTES[Kind.DELIVER]
    mono, cpu = time.monotonic, time.thread_time
    # Each boundary keeps the time and, beside it, the CPU time of the router's
    # thread (its main thread: ZeroMQ's I/O thread is not counted).
    notes: dict = {k: [] for k in ("in", "peer_in", "out", "peer_out", "in_cpu",
                                   "peer_in_cpu", "out_cpu", "peer_out_cpu")}
    handle, on_message, send_frames = RouterCore.handle, OverlayCore.on_message, R.send_frames

    def note(boundary: str) -> None:
        notes[boundary].append(mono())
        notes[boundary + "_cpu"].append(cpu())

    def noted_handle(self, *args, **kw):
        note("in")
        return handle(self, *args, **kw)

    def noted_on_message(self, lid, frames, *args, **kw):
        if frames and frames[0] == fwd:
            note("peer_in")
        return on_message(self, lid, frames, *args, **kw)

    def noted_send(sock, frames, *args):
        if frames[0] == dlv:
            note("out")
        elif frames[0] == fwd:
            note("peer_out")
        send_frames(sock, frames, *args)

    RouterCore.handle, OverlayCore.on_message = noted_handle, noted_on_message
    R.send_frames = noted_send
    # Peer links only in a chain: `psepr bench hop`'s router has no overlay either.
    cfg = RouterConfig.preset("local", name=a.name, listen=("tcp://127.0.0.1:0",),
                              peer_listen=("tcp://127.0.0.1:0",) if a.overlay else (),
                              peers=tuple(a.peer))
    router = R.Router(cfg)
    tune_gc()
    signal.signal(signal.SIGTERM, lambda *_: router.stop())
    print(json.dumps({"url": router.endpoints[0],
                      "peer": (router.peer_endpoints or [None])[0]}), flush=True)
    router.run()
    _save(a.out, notes)


def role_psepr_send(a) -> None:
    import psepr
    import psepr.client
    from psepr.config import tune_gc
    tune_gc()
    mono = time.monotonic
    sent: list = []
    send_frames = psepr.client.send_frames

    def noted_send(sock, frames, *args):
        sent.append(mono())
        send_frames(sock, frames, *args)

    psepr.client.send_frames = noted_send
    con = psepr.connect(a.url, preset="local")
    del sent[:]                                  # the handshake is not an event
    send = con.send
    cpu = _paced(a.count, lambda payload: send(CHANNEL, payload))
    con.flush(timeout=30)
    con.close()
    _save(a.out, {"sent": sent, "cpu": cpu})
    print(json.dumps({"done": True}), flush=True)


def _receive_loop(a, next_payload, notes: dict) -> None:
    """Receive ``a.count`` payloads (or stop after 3 s of silence); note t and got."""
    mono = time.monotonic
    cpu0 = None
    while len(notes["t"]) < a.count:
        p = next_payload()
        if p is None:
            break
        notes["got"].append(mono())
        notes["t"].append(p["t"])
        if cpu0 is None:
            cpu0 = time.process_time()
    notes["cpu"] = time.process_time() - (cpu0 or 0.0)
    _save(a.out, notes)
    print(json.dumps({"received": len(notes["t"])}), flush=True)


def role_psepr_recv(a) -> None:
    import psepr
    import psepr.client
    from psepr.config import tune_gc
    tune_gc()
    mono = time.monotonic
    notes: dict = {"recv": [], "t": [], "got": []}
    recv_frames = psepr.client.recv_frames

    def noted_recv(sock):
        frames = recv_frames(sock)
        notes["recv"].append(mono())
        return frames

    psepr.client.recv_frames = noted_recv
    con = psepr.connect(a.url, preset="local")
    lease = con.lease(CHANNEL, duration=600, propagated=True)
    del notes["recv"][:]
    print(json.dumps({"ready": True}), flush=True)

    def next_payload():
        try:
            return lease.receive(timeout=3.0).payload
        except psepr.TimeoutError:
            return None

    _receive_loop(a, next_payload, notes)
    con.close()


def role_min_recv(a) -> None:
    """The wire protocol with no SDK: HELLO, LEASE, then poll, receive, decode."""
    import orjson
    import zmq
    from psepr import wire
    from psepr.config import tune_gc
    from psepr.wire import Kind
    tune_gc()
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(a.url)
    sock.send_multipart(wire.encode(Kind.HELLO, {"v": 1}))
    for kind, header in ((Kind.WELCOME, None),
                         (Kind.LEASED, {"id": "L1", "channel": CHANNEL, "duration": 600,
                                        "req": 1})):
        if header is not None:
            sock.send_multipart(wire.encode(Kind.LEASE, header))
        if not sock.poll(5000) or sock.recv_multipart()[0] != wire.KIND_BYTES[kind]:
            raise RuntimeError(f"the router did not answer with {kind.name}")
    print(json.dumps({"ready": True}), flush=True)
    mono = time.monotonic
    notes: dict = {"recv": [], "t": [], "got": []}
    deliver = wire.KIND_BYTES[Kind.DELIVER]
    pending: list = []

    def next_payload():
        while not pending:
            if not sock.poll(3000):
                return None
            frames = sock.recv_multipart()
            notes["recv"].append(mono())
            if frames[0] != deliver:
                continue
            for k in range(2, len(frames), 2):
                body, off = frames[k + 1], 0
                for n in orjson.loads(frames[k])["l"]:
                    pending.append(body[off:off + n])
                    off += n
        return orjson.loads(pending.pop(0))

    _receive_loop(a, next_payload, notes)


def role_raw_fwd(a) -> None:
    """``psepr bench hop``'s raw forwarder (SUB -> PUB, one message per event), noted."""
    import zmq
    from psepr.config import tune_gc
    tune_gc()
    sub, pub = hop.raw_fwd_sockets(a.upstream)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    mono = time.monotonic
    notes: dict = {"in": [], "out": []}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        if not sub.poll(100):
            continue
        frames = sub.recv_multipart()
        notes["in"].append(mono())
        notes["out"].append(mono())
        pub.send_multipart(frames)
    _save(a.out, notes)


def role_raw_send(a) -> None:
    import orjson
    import zmq
    from psepr.config import tune_gc
    tune_gc()
    sock = zmq.Context().socket(zmq.PUB)
    sock.connect(f"tcp://127.0.0.1:{a.port}")
    time.sleep(0.3)          # PUB connects asynchronously
    mono = time.monotonic
    sent: list = []
    topic = CHANNEL.encode()

    def send_one(payload) -> None:
        frames = [topic, orjson.dumps(payload)]
        sent.append(mono())
        sock.send_multipart(frames)

    cpu = _paced(a.count, send_one)
    time.sleep(0.3)
    _save(a.out, {"sent": sent, "cpu": cpu})
    print(json.dumps({"done": True}), flush=True)


def role_raw_recv(a) -> None:
    import orjson
    import zmq
    from psepr.config import tune_gc
    tune_gc()
    sock = zmq.Context().socket(zmq.SUB)
    sock.connect(f"tcp://127.0.0.1:{a.port}")
    sock.setsockopt(zmq.SUBSCRIBE, CHANNEL.encode())
    time.sleep(0.5)          # SUB subscriptions propagate asynchronously
    print(json.dumps({"ready": True}), flush=True)
    mono = time.monotonic
    notes: dict = {"recv": [], "t": [], "got": []}

    def next_payload():
        if not sock.poll(3000):
            return None
        frames = sock.recv_multipart()
        notes["recv"].append(mono())
        return orjson.loads(frames[1])

    _receive_loop(a, next_payload, notes)


ROLES = {"router": role_router, "psepr-send": role_psepr_send, "psepr-recv": role_psepr_recv,
         "min-recv": role_min_recv, "raw-fwd": role_raw_fwd, "raw-send": role_raw_send,
         "raw-recv": role_raw_recv}


# -- orchestration ---------------------------------------------------------------------

def _spawn(role: str, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.stages", role, "--out", str(out),
                             *args], cwd=hop.ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(hop.ROOT)})


def _stop_and_wait(procs: list) -> None:
    """SIGTERM the middle processes and wait for them to write their notes."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def thread_times(pid: int) -> dict[str, tuple[int, int]]:
    """``{"main" | "ZMQ I/O" | "other": (ns on CPU, ns waiting for a CPU)}`` of a live
    process, summed over its threads (``/proc/<pid>/task/*/schedstat``; empty where
    the kernel does not keep it, or once the process is gone)."""
    out: dict[str, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait = map(int, f.read().split()[:2])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read()
        except (OSError, ValueError):
            continue              # the thread ended meanwhile
        kind = "main" if tid == str(pid) else "ZMQ I/O" if comm.startswith("ZMQbg/IO") \
            else "other"
        r0, w0 = out.get(kind, (0, 0))
        out[kind] = (r0 + run, w0 + wait)
    return out


def _threads_split(pids: dict[str, int], window: float) -> dict[str, tuple[float, float]]:
    """Sample :func:`thread_times` of every process twice, ``window`` seconds apart.

    Returns:
        ``{"<process> <thread>": (us on CPU, us waiting for a CPU) per event}`` at
        ``RATE`` events per second; threads that ran less than 0.1 us per event
        are left out.
    """
    before = {name: thread_times(pid) for name, pid in pids.items()}
    time.sleep(window)
    events = RATE * window
    out = {}
    for name, pid in pids.items():
        for kind, (run, wait) in thread_times(pid).items():
            r0, w0 = before[name].get(kind, (run, wait))
            if (run - r0) / events >= 100:
                out[f"{name} {kind}"] = ((run - r0) / events / 1e3, (wait - w0) / events / 1e3)
    return out


def _run_path(tmp: Path, tag: str, count: int, mids: list[tuple[str, list]],
              recv: tuple[str, callable], send: tuple[str, callable]) -> dict:
    """Start the middle processes, then the receiver, then the sender; collect the notes.

    Args:
        mids: ``(role, args)`` of the routers or forwarders, in path order.  Routers
            dial the previous one; raw forwarders take the previous one's output.
        recv, send: ``(role, args_of)``: ``args_of(info)`` gives the role's address
            arguments from what the last (receiver) or first (sender) middle process
            printed when it started.

    Returns:
        ``{"mids": [notes...], "send": notes, "recv": notes, "cpu": {process: us/event},
        "threads": {"<process> <thread>": (us on CPU, us waiting for a CPU) per event}}``.
    """
    procs: list[subprocess.Popen] = []
    infos: list[dict] = []
    try:
        for k, (role, args) in enumerate(mids):
            extra = list(args)
            if k and role == "router":
                extra += ["--peer", infos[-1]["peer"]]
            if k and role == "raw-fwd":
                extra += ["--upstream", str(infos[-1]["out"])]
            procs.append(_spawn(role, tmp / f"{tag}-m{k}.json", *extra))
            infos.append(hop._line(procs[-1], 20))
        if mids[0][0] == "router" and len(mids) > 1:
            from benchmarks.overlay import wait_converged
            wait_converged([i["url"] for i in infos])
        if mids[0][0] == "raw-fwd" and len(mids) > 1:
            time.sleep(0.3)      # chained SUB connections are asynchronous
        r = _spawn(recv[0], tmp / f"{tag}-recv.json", *recv[1](infos[-1]), "--count", str(count))
        procs.append(r)
        hop._line(r, 30)
        mid0 = [hop.cpu_seconds(p.pid) for p in procs[:len(mids)]]
        s = _spawn(send[0], tmp / f"{tag}-send.json", *send[1](infos[0]), "--count",
                   str(count))
        procs.append(s)
        hop._line(s, 60)        # connected and pacing
        # Every process's threads, sampled over the middle 60 % of the paced run.
        names = [f"r{k}" if len(mids) > 1 else "router" for k in range(len(mids))]
        seconds = count / RATE
        time.sleep(0.2 * seconds)
        threads = _threads_split({"sender": s.pid, **dict(zip(names, (p.pid for p in procs))),
                                  "receiver": r.pid}, 0.6 * seconds)
        hop._line(s, count / RATE + 60)
        hop._line(r, 30)
        mid1 = [hop.cpu_seconds(p.pid) for p in procs[:len(mids)]]
        _stop_and_wait(procs[:len(mids)])
        res = {"mids": [json.loads((tmp / f"{tag}-m{k}.json").read_text())
                        for k in range(len(mids))],
               "send": json.loads((tmp / f"{tag}-send.json").read_text()),
               "recv": json.loads((tmp / f"{tag}-recv.json").read_text())}
        n = max(1, len(res["recv"]["t"]))
        res["threads"] = threads
        res["cpu"] = {"sender": res["send"]["cpu"] / n * 1e6,
                      **{name: (b - a) / n * 1e6 for name, a, b in zip(names, mid0, mid1)},
                      "receiver": res["recv"]["cpu"] / n * 1e6}
        return res
    finally:
        hop._stop(*procs)


def split(res: dict) -> dict:
    """Per-stage latencies (seconds) of every event that crossed every boundary.

    A router's stage also gives ``"<router> on CPU"``: how much of that stage its
    thread spent running (its CPU time between the two boundaries).  Equal to the
    stage, the router was working all along; less, it waited for a CPU.

    Returns:
        ``{stage name: sorted list of durations}``, in path order, plus ``total``.
    """
    mids = res["mids"]
    n = len(mids)
    # (stage ending at this boundary, times, thread CPU times or None); every list
    # is in time order, as noted.
    bounds: list[tuple[str, list, list | None]] = [("send call", res["send"]["sent"], None)]
    routers = []
    for k, m in enumerate(mids):
        name = f"r{k}" if n > 1 else "router"
        if "in_cpu" in m:       # a PsEPR router (a raw forwarder notes no CPU times)
            routers.append(name)
        first = "in" if k == 0 or "peer_in" not in m else "peer_in"
        last = "out" if k == n - 1 or "peer_out" not in m else "peer_out"
        bounds += [(f"to {name}", m[first], m.get(first + "_cpu")),
                   (name, m[last], m.get(last + "_cpu"))]
    bounds += [("to receiver", res["recv"]["recv"], None)]
    names = [b[0] for b in bounds] + ["receiver", "total"]
    out: dict = {}
    for name in names:
        out[name] = []
        if name in routers:
            out[f"{name} on CPU"] = []
    for t, got in zip(res["recv"]["t"], res["recv"]["got"]):
        pts, at = [t], []
        for _, arr, _ in bounds:
            i = bisect.bisect_left(arr, pts[-1])
            if i == len(arr) or arr[i] > got:
                break
            pts.append(arr[i])
            at.append(i)
        else:
            pts.append(got)
            for name, a, b in zip(names, pts, pts[1:]):
                out[name].append(b - a)
            for j in range(1, len(bounds)):
                if bounds[j][0] in routers:     # both boundaries are that router's
                    cpu_from, cpu_to = bounds[j - 1][2], bounds[j][2]
                    out[f"{bounds[j][0]} on CPU"].append(cpu_to[at[j]] - cpu_from[at[j - 1]])
            out["total"].append(got - t)
    return {k: sorted(v) for k, v in out.items()}


def _pct(v: list, q: float) -> float:
    return v[min(len(v) - 1, int(len(v) * q))] * 1e6 if v else float("nan")


def _table(title: str, paths: dict) -> None:
    splits = {name: split(r) for name, r in paths.items()}
    stages: list[str] = []
    for s in splits.values():
        stages += [k for k in s if k not in stages and k != "total"]
    stages.append("total")
    print(f"\n{title}: p50 / p99 in us per stage (events matched: "
          + ", ".join(f"{n} {len(s['total'])}" for n, s in splits.items()) + ")\n")
    print(f"{'stage':<14} " + " ".join(f"{n:>22}" for n in splits))
    for st in stages:
        cells = []
        for s in splits.values():
            v = s.get(st)
            cells.append(f"{_pct(v, 0.5):8.0f} / {_pct(v, 0.99):6.0f}" if v else "-")
        print(f"{st:<14} " + " ".join(f"{c:>22}" for c in cells))
    print(f"\n{'CPU us/event':<14} " + " ".join(f"{n:>22}" for n in splits))
    procs: list[str] = []
    for r in paths.values():
        procs += [k for k in r["cpu"] if k not in procs]
    for p in procs:
        print(f"{p:<14} " + " ".join(
            f"{r['cpu'][p]:>22.1f}" if p in r["cpu"] else f"{'-':>22}" for r in paths.values()))
    threads: list[str] = []
    for r in paths.values():
        threads += [k for k in r["threads"] if k not in threads]
    if not threads:
        return      # no schedstat on this kernel
    print(f"\n{'threads: us/event on CPU / waiting for a CPU':<22}")
    totals = [(sum(v[0] for v in r["threads"].values()), sum(v[1] for v in r["threads"].values()))
              for r in paths.values()]
    for t in [*threads, "total"]:
        cells = [totals[i] if t == "total" else r["threads"].get(t)
                 for i, r in enumerate(paths.values())]
        print(f"{t:<22}" + " ".join(f"{c[0]:>14.1f} / {c[1]:>5.1f}" if c else f"{'-':>22}"
                                    for c in cells))


def main(args) -> int:
    """Run the one-hop paths (and with ``--chain`` the three-router chains); print tables."""
    count = 2_000 if args.quick else 15_000
    url = lambda info: ["--url", info["url"]]          # noqa: E731
    port_in = lambda info: ["--port", str(info["in"])]    # noqa: E731
    port_out = lambda info: ["--port", str(info["out"])]  # noqa: E731
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="psepr-stages-") as d:
        tmp = Path(d)
        runs = {"one hop": {
            "psepr": ([("router", ["--name", "r"])], ("psepr-recv", url), ("psepr-send", url)),
            "psepr, min receiver": ([("router", ["--name", "r"])], ("min-recv", url),
                                    ("psepr-send", url)),
            "raw pyzmq": ([("raw-fwd", [])], ("raw-recv", port_out), ("raw-send", port_in))}}
        if args.chain:
            runs["chain of 3"] = {
                "psepr": ([("router", ["--name", f"r{k}", "--overlay"]) for k in range(3)],
                          ("psepr-recv", url), ("psepr-send", url)),
                "raw pyzmq": ([("raw-fwd", [])] * 3, ("raw-recv", port_out),
                              ("raw-send", port_in))}
        for title, paths in runs.items():
            results[title] = {}
            for name, (mids, recv, send) in paths.items():
                print(f"  running {title}: {name} ...", file=sys.stderr, flush=True)
                tag = f"{title}-{name}".replace(" ", "_").replace(",", "")
                results[title][name] = _run_path(tmp, tag, count, mids, recv, send)
    print(f"\npsepr bench stages  ({os.cpu_count()} cores, {count:,} events at {RATE:,}/s, "
          f"100-byte JSON payloads, loopback)")
    for title, paths in results.items():
        _table(title, paths)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {t: {n: {k: {"p50_us": _pct(v, 0.5), "p99_us": _pct(v, 0.99), "n": len(v)}
                     for k, v in split(r).items()}
                 | {"cpu_us": r["cpu"], "threads_us": {k: {"cpu": c, "wait": w}
                                                       for k, (c, w) in r["threads"].items()}}
                 for n, r in paths.items()} for t, paths in results.items()}, indent=2))
    return 0


def _role_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--out", required=True)
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--name", default="r")
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--upstream", type=int)
    p.add_argument("--overlay", action="store_true", help="router: listen for peers")
    p.add_argument("--count", type=int, default=15_000)
    a = p.parse_args(argv)
    ROLES[a.role](a)


if __name__ == "__main__":
    _role_main(sys.argv[1:])
