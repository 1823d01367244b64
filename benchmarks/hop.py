"""`psepr bench hop`: one hop through a router, each role its own process.

Scenarios (100-byte JSON payloads, loopback):

* ``1->1``      one sender -> router -> one lease holder: delivered events/s.
* ``latency``   the same path paced at 5,000 events/s: p50/p99 one-way latency
                (sender and receiver share CLOCK_MONOTONIC on one host).
* ``fanout``    one sender -> router -> 10 holders (10 processes, one
                connection each): deliveries/s summed over the holders.
* ``10k``       one connection holding 10,000 leases on distinct channels; the
                sender cycles through those channels: delivered events/s.
* ``1->1 aio``  as ``1->1``, sender and lease holder asyncio clients
                (``psepr.aio``; the baselines' ``zmq.asyncio`` sockets).

Every client role, PsEPR's and the baselines' alike, runs with
``psepr.tune_gc()`` (as the router does); see its docstring.

Each scenario is measured for PsEPR and, in the same run, for a minimal raw
pyzmq forwarder (PUB -> Python loop SUB/PUB -> SUB, one message per event;
topics stand in for channels) and for libzmq's C proxy (``zmq.proxy``,
XSUB/XPUB).  Receivers decode every payload, so all columns pay for the same
work.  Every run is bounded in events and seconds.

The machine is shared and noisy (a run's rate can move 10-15 % from one run to
the next), so every scenario runs ``--rounds`` times (default 3), the rounds
taking turns, and the table shows each scenario's median run; every round's
figure is printed under the table (and kept in ``--json`` as ``"rounds"``).

Beside each figure: the CPU every process on the path (sender, router or
forwarder, receivers; all their threads) used per delivered event over the
run, so that throughput and latency can be read against what they cost.

Roles run as ``python -m benchmarks.hop ROLE ...`` and print one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAD = 100


def _payload(i: int, t: float = 0.0) -> dict:
    # {"i":123456,"t":12345.123456,"p":"xxxx..."} -> about 100 bytes of JSON
    return {"i": i, "t": t, "p": "x" * 56}


# -- roles -------------------------------------------------------------------------

def _count(next_payload, a) -> dict:
    """Receive until ``a.count`` payloads, ``a.seconds``, or 2 s of silence.

    Args:
        next_payload: returns the next decoded payload, or None after 2 s of silence.
        a: the role's arguments (count, seconds, latency).

    Returns:
        ``{"n", "first", "last", "lat", "dropped"}`` (times from CLOCK_MONOTONIC).
    """
    lats: list = []
    n = 0
    first = last = None
    monotonic = time.monotonic
    deadline = monotonic() + a.seconds
    while n < a.count:
        p = next_payload()
        if p is None:
            break
        now = monotonic()
        if first is None:
            first = now
        last = now
        n += 1
        if a.latency:
            lats.append(now - p["t"])
        elif now > deadline:
            break
    return {"n": n, "first": first, "last": last, "lat": lats, "dropped": 0}


async def _acount(next_payload, a) -> dict:
    """:func:`_count` for an asyncio receiver: ``next_payload`` is awaited.

    A twin rather than a shared helper: a call per event in the sync receivers'
    loop would add to what every sync column measures.
    """
    lats: list = []
    n = 0
    first = last = None
    monotonic = time.monotonic
    deadline = monotonic() + a.seconds
    while n < a.count:
        p = await next_payload()
        if p is None:
            break
        now = monotonic()
        if first is None:
            first = now
        last = now
        n += 1
        if a.latency:
            lats.append(now - p["t"])
        elif now > deadline:
            break
    return {"n": n, "first": first, "last": last, "lat": lats, "dropped": 0}


def role_psepr_recv(a) -> None:
    import psepr
    cons = [psepr.connect(a.url, preset="local") for _ in range(a.conns)]
    leases = []
    for con in cons:
        if a.leases == 1:
            # propagated: through an overlay (psepr bench overlay) the sender's router
            # must know of this lease before the sender starts.
            leases.append(con.lease(a.channel, duration=600, propagated=True))
        else:
            for k in range(a.leases):
                con.lease(f"{a.channel}c{k}/", duration=600, timeout=30)
    print(json.dumps({"ready": True}), flush=True)
    cpu0 = time.process_time()
    import threading
    results = [None] * len(cons)

    def consume(idx: int, con) -> None:
        receive = con.receive

        def next_payload():
            try:
                return receive(timeout=2.0).payload
            except psepr.TimeoutError:
                return None

        results[idx] = _count(next_payload, a)
        results[idx]["dropped"] = con.dropped_by_router + sum(l.dropped for l in leases)

    threads = [threading.Thread(target=consume, args=(i, c)) for i, c in enumerate(cons)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for con in cons:
        con.close()
    print(json.dumps({"results": results, "cpu": time.process_time() - cpu0}), flush=True)


def role_psepr_aio_recv(a) -> None:
    """One asyncio connection (``psepr.aio``) holding one lease."""
    import asyncio

    import psepr.aio

    async def run() -> None:
        async with psepr.aio.connect(a.url, preset="local") as con:
            lease = await con.lease(a.channel, duration=600, propagated=True)
            print(json.dumps({"ready": True}), flush=True)
            cpu0 = time.process_time()

            async def next_payload():
                try:
                    return (await lease.receive(timeout=2.0)).payload
                except psepr.TimeoutError:
                    return None

            res = await _acount(next_payload, a)
            res["dropped"] = con.dropped_by_router + lease.dropped
            cpu = time.process_time() - cpu0
        print(json.dumps({"results": [res], "cpu": cpu}), flush=True)

    asyncio.run(run())


def role_psepr_send(a) -> None:
    import psepr
    con = psepr.connect(a.url, preset="local")
    chans = [a.channel] if a.leases == 1 else [f"{a.channel}c{k}/" for k in range(a.leases)]
    nch = len(chans)
    send = con.send
    cpu0 = time.process_time()
    t0 = time.monotonic()
    if a.rate:
        period = 1.0 / a.rate
        for i in range(a.count):
            # Sleep (never spin): a spinning thread would hold the GIL that the
            # client's I/O thread needs, which measures the spin, not PsEPR.
            delay = t0 + i * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            send(chans[i % nch], _payload(i, time.monotonic()))
    else:
        for i in range(a.count):
            send(chans[i % nch], _payload(i))
    con.flush(timeout=60)
    t1 = time.monotonic()
    con.close()
    print(json.dumps({"sent": a.count, "seconds": t1 - t0, "cpu": time.process_time() - cpu0}),
          flush=True)


def role_psepr_aio_send(a) -> None:
    """``a.count`` events as fast as ``await con.send()`` goes (``psepr.aio``), then a flush."""
    import asyncio

    import psepr.aio
    if a.rate or a.leases != 1:
        sys.exit("psepr-aio-send sends unpaced to one channel (no --rate, --leases 1)")

    async def run() -> None:
        async with psepr.aio.connect(a.url, preset="local") as con:
            send, channel = con.send, a.channel
            cpu0 = time.process_time()
            t0 = time.monotonic()
            for i in range(a.count):
                await send(channel, _payload(i))
            await con.flush(timeout=60)
            t1 = time.monotonic()
        print(json.dumps({"sent": a.count, "seconds": t1 - t0,
                          "cpu": time.process_time() - cpu0}), flush=True)

    asyncio.run(run())


def raw_fwd_sockets(upstream: int | None, cproxy: bool = False) -> tuple:
    """The raw forwarder's sockets, bound (or chained after ``upstream``); prints its ports.

    Returns:
        ``(sub, pub)``: SUB/PUB, or XSUB/XPUB for libzmq's proxy.
    """
    import zmq
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB if cproxy else zmq.SUB)
    xpub = ctx.socket(zmq.XPUB if cproxy else zmq.PUB)
    for s in (xsub, xpub):
        s.setsockopt(zmq.SNDHWM, 200_000)
        s.setsockopt(zmq.RCVHWM, 200_000)
    if upstream:
        # Chained after another forwarder (the raw chains of bench overlay and stages).
        xsub.connect(f"tcp://127.0.0.1:{upstream}")
        pin = None
    else:
        pin = xsub.bind_to_random_port("tcp://127.0.0.1")
    pout = xpub.bind_to_random_port("tcp://127.0.0.1")
    print(json.dumps({"in": pin, "out": pout}), flush=True)
    return xsub, xpub


def role_raw_fwd(a) -> None:
    import zmq
    xsub, xpub = raw_fwd_sockets(a.upstream, a.cproxy)
    if a.cproxy:
        zmq.proxy(xsub, xpub)
        return
    xsub.setsockopt(zmq.SUBSCRIBE, b"")
    recv = xsub.recv_multipart
    send = xpub.send_multipart
    while True:
        send(recv())


def role_raw_recv(a) -> None:
    import orjson
    import zmq
    ctx = zmq.Context()
    socks = []
    for _ in range(a.conns):
        s = ctx.socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 200_000)
        s.connect(f"tcp://127.0.0.1:{a.port}")
        topics = [a.channel] if a.leases == 1 else [f"{a.channel}c{k}/" for k in range(a.leases)]
        for t in topics:
            s.setsockopt(zmq.SUBSCRIBE, t.encode())
        socks.append(s)
    time.sleep(0.5)  # SUB subscriptions propagate asynchronously; no readiness signal exists
    print(json.dumps({"ready": True}), flush=True)
    cpu0 = time.process_time()
    import threading
    results = [None] * len(socks)

    def consume(idx, s):
        poller = zmq.Poller()
        poller.register(s, zmq.POLLIN)

        def next_payload():
            if not poller.poll(2000):
                return None
            return orjson.loads(s.recv_multipart()[1])

        results[idx] = _count(next_payload, a)

    threads = [threading.Thread(target=consume, args=(i, s)) for i, s in enumerate(socks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"results": results, "cpu": time.process_time() - cpu0}), flush=True)
    os._exit(0)


def role_raw_aio_recv(a) -> None:
    """A ``zmq.asyncio`` SUB socket: the asyncio baseline for ``psepr-aio-recv``."""
    import asyncio

    import orjson
    import zmq
    import zmq.asyncio

    async def run() -> None:
        s = zmq.asyncio.Context().socket(zmq.SUB)
        s.setsockopt(zmq.RCVHWM, 200_000)
        # zmq.asyncio times a receive out by RCVTIMEO (raising Again), and sets
        # a timer only when it has to wait: no asyncio.wait_for task per event.
        s.setsockopt(zmq.RCVTIMEO, 2000)
        s.connect(f"tcp://127.0.0.1:{a.port}")
        s.setsockopt(zmq.SUBSCRIBE, a.channel.encode())
        await asyncio.sleep(0.5)  # SUB subscriptions propagate asynchronously
        print(json.dumps({"ready": True}), flush=True)
        cpu0 = time.process_time()

        async def next_payload():
            try:
                frames = await s.recv_multipart()
            except zmq.Again:
                return None
            return orjson.loads(frames[1])

        res = await _acount(next_payload, a)
        print(json.dumps({"results": [res], "cpu": time.process_time() - cpu0}), flush=True)

    asyncio.run(run())
    os._exit(0)


def role_raw_send(a) -> None:
    import orjson
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.setsockopt(zmq.SNDHWM, 200_000)
    s.connect(f"tcp://127.0.0.1:{a.port}")
    time.sleep(0.3)  # PUB connects asynchronously
    chans = [a.channel] if a.leases == 1 else [f"{a.channel}c{k}/" for k in range(a.leases)]
    topics = [c.encode() for c in chans]
    nch = len(topics)
    cpu0 = time.process_time()
    t0 = time.monotonic()
    send = s.send_multipart
    for i in range(a.count):
        if a.rate:
            delay = t0 + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            send([topics[i % nch], orjson.dumps(_payload(i, time.monotonic()))])
        else:
            send([topics[i % nch], orjson.dumps(_payload(i))])
    t1 = time.monotonic()
    time.sleep(0.5)
    s.close(linger=5000)
    print(json.dumps({"sent": a.count, "seconds": t1 - t0, "cpu": time.process_time() - cpu0}),
          flush=True)


def role_raw_aio_send(a) -> None:
    """A ``zmq.asyncio`` PUB socket: the asyncio baseline for ``psepr-aio-send``."""
    import asyncio

    import orjson
    import zmq
    import zmq.asyncio
    if a.rate or a.leases != 1:
        sys.exit("raw-aio-send sends unpaced to one topic (no --rate, --leases 1)")

    async def run() -> None:
        s = zmq.asyncio.Context().socket(zmq.PUB)
        s.setsockopt(zmq.SNDHWM, 200_000)
        s.connect(f"tcp://127.0.0.1:{a.port}")
        await asyncio.sleep(0.3)  # PUB connects asynchronously
        send, topic = s.send_multipart, a.channel.encode()
        cpu0 = time.process_time()
        t0 = time.monotonic()
        for i in range(a.count):
            await send([topic, orjson.dumps(_payload(i))])
        t1 = time.monotonic()
        await asyncio.sleep(0.5)
        s.close(linger=5000)
        print(json.dumps({"sent": a.count, "seconds": t1 - t0,
                          "cpu": time.process_time() - cpu0}), flush=True)

    asyncio.run(run())


ROLES = {"psepr-recv": role_psepr_recv, "psepr-aio-recv": role_psepr_aio_recv,
         "psepr-send": role_psepr_send, "psepr-aio-send": role_psepr_aio_send,
         "raw-fwd": role_raw_fwd, "raw-recv": role_raw_recv, "raw-aio-recv": role_raw_aio_recv,
         "raw-send": role_raw_send, "raw-aio-send": role_raw_aio_send}


# -- orchestration -------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.hop", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _line(p: subprocess.Popen, timeout: float) -> dict:
    import select
    r, _, _ = select.select([p.stdout], [], [], timeout)
    if not r:
        raise RuntimeError(f"benchmark role {p.args[3]} gave no answer within {timeout} s")
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark role {p.args[3]} exited (rc={p.wait()})")
    return json.loads(line)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def start_router(name: str = "bench", *extra: str,
                 quiet: bool = False) -> tuple[subprocess.Popen, str, str | None]:
    """Start ``psepr router`` on an ephemeral loopback port and wait until it is ready.

    Args:
        name: the router name.
        extra: more ``psepr router`` arguments (e.g. ``--peer-listen``, ``--peer``).
        quiet: discard what the router writes to stderr.

    Returns:
        ``(process, client url, peer url or None)``.
    """
    p = subprocess.Popen([sys.executable, "-m", "psepr.cli", "router", "--name", name,
                          "--listen", "tcp://127.0.0.1:0", *extra], cwd=ROOT,
                         stdout=subprocess.PIPE, text=True,
                         stderr=subprocess.DEVNULL if quiet else None)
    url = peer = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            url = line.split("listening on")[1].split()[0]
        if "peers on" in line:
            peer = line.split("peers on")[1].split()[0]
        if " ready " in line and url is not None:
            return p, url, peer
    _stop(p)
    raise RuntimeError(f"router {name} did not start")


def _start_router() -> tuple[subprocess.Popen, str]:
    p, url, _ = start_router()
    return p, url


def cpu_seconds(pid: int) -> float:
    """CPU (user + system, every thread) a live process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summarise(recv_out: list[dict], conns_total: int) -> dict:
    res = [r for out in recv_out for r in out["results"]]
    n = sum(r["n"] for r in res)
    firsts = [r["first"] for r in res if r["first"] is not None]
    lasts = [r["last"] for r in res if r["last"] is not None]
    span = (max(lasts) - min(firsts)) if firsts else 0.0
    lats = sorted(x for r in res for x in r["lat"])
    out = {"received": n, "seconds": span, "rate": n / span if span > 0 else 0.0,
           "dropped": sum(r["dropped"] for r in res)}
    if lats:
        out["p50_us"] = statistics.median(lats) * 1e6
        out["p99_us"] = lats[min(len(lats) - 1, int(len(lats) * 0.99))] * 1e6
    return out


def _run_roles(recv_role: str, send_role: str, recv_at: list[str], send_at: list[str],
               count: int, conns: int, procs: int, leases: int, rate: int,
               seconds: float, mids: tuple = ()) -> dict:
    """Start the receivers, wait until they are ready, run the sender, collect results.

    ``mids`` are the processes in between (routers, forwarders): their CPU over
    the run is added to the senders' and receivers' own (each role reports the
    CPU it used while measuring), giving ``cpu_us`` per delivered event, every
    process and thread of the path included.
    """
    recvs: list[subprocess.Popen] = []
    try:
        common = ["--channel", "/bench/hop/", "--leases", str(leases), "--count", str(count),
                  "--seconds", str(seconds)]
        lat = ["--latency"] if rate else []
        for _ in range(procs):
            recvs.append(_spawn(recv_role, *common, *recv_at, "--conns", str(conns // procs),
                                *lat))
        for r in recvs:
            _line(r, 60)
        mid0 = [cpu_seconds(p.pid) for p in mids]
        sender = _spawn(send_role, *common, *send_at, "--rate", str(rate))
        outs = [_line(r, seconds + 60) for r in recvs]
        sent = _line(sender, 60)
        mid1 = [cpu_seconds(p.pid) for p in mids]
        _stop(sender)
        out = _summarise(outs, conns)
        parts = {"sender": sent["cpu"], "routers": sum(b - a for a, b in zip(mid0, mid1)),
                 "receivers": sum(o["cpu"] for o in outs)}
        n = out["received"]
        out["cpu_us"] = sum(parts.values()) / n * 1e6 if n else 0.0
        # Per role ("routers": the forwarder for raw pyzmq).  A single process whose
        # CPU per event times the rate nears one second per second bounds the rate.
        out["cpu_us_by_role"] = {k: v / n * 1e6 if n else 0.0 for k, v in parts.items()}
        return out
    finally:
        _stop(*recvs)


def run_psepr(count: int, conns: int = 1, procs: int = 1, leases: int = 1, rate: int = 0,
              seconds: float = 30.0, aio: bool = False) -> dict:
    router, url = _start_router()
    try:
        return _run_roles("psepr-aio-recv" if aio else "psepr-recv",
                          "psepr-aio-send" if aio else "psepr-send", ["--url", url],
                          ["--url", url], count, conns, procs, leases, rate, seconds,
                          mids=(router,))
    finally:
        _stop(router)


def run_raw(count: int, conns: int = 1, procs: int = 1, leases: int = 1, rate: int = 0,
            seconds: float = 30.0, cproxy: bool = False, aio: bool = False) -> dict:
    fwd = _spawn("raw-fwd", *(["--cproxy"] if cproxy else []))
    try:
        ports = _line(fwd, 15)
        return _run_roles("raw-aio-recv" if aio else "raw-recv",
                          "raw-aio-send" if aio else "raw-send", ["--port", str(ports["out"])],
                          ["--port", str(ports["in"])], count, conns, procs, leases, rate,
                          seconds, mids=(fwd,))
    finally:
        _stop(fwd)


def _median_run(runs: list[dict], latency: bool) -> dict:
    """The middle run of a scenario's rounds (by p99 for latency, else by rate), with
    every round's figure beside it (``"rounds"``)."""
    key = (lambda r: r.get("p99_us", 0.0)) if latency else (lambda r: r["rate"])
    mid = dict(sorted(runs, key=key)[(len(runs) - 1) // 2])
    mid["rounds"] = [key(r) for r in runs]
    return mid


def main(args) -> int:
    """Run every scenario for PsEPR, the raw Python forwarder and libzmq's proxy; print a table.

    Every scenario runs ``--rounds`` times (default 3, quick 1); the rounds take turns
    scenario by scenario, so that the machine's drift reaches every column alike,
    and the table shows each scenario's median run.
    """
    n = 30_000 if args.quick else args.events
    # 10 s at 5,000/s: the p99 of a 3 s round was set by one or two scheduling stalls
    # (2026-11-25: rounds of 770 to 2,655 us on one code), a 10 s round's by a dozen.
    lat_n = 2_000 if args.quick else 50_000
    k10 = 1_000 if args.quick else 10_000
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    scen = [
        ("1->1 events/s", dict(count=n)),
        ("latency @5k/s", dict(count=lat_n, rate=5000)),
        ("fan-out x10 deliveries/s", dict(count=n // 2, conns=10, procs=10)),
        (f"{k10} leases events/s", dict(count=n, leases=k10)),
        ("1->1 asyncio clients events/s", dict(count=n, aio=True)),
    ]
    systems = [("psepr", run_psepr), ("raw-pyzmq", run_raw),
               ("libzmq-proxy", lambda **kw: run_raw(cproxy=True, **kw))]
    runs: dict = {}
    for rnd in range(rounds):
        for title, kw in scen:
            for sysname, fn in systems:
                print(f"  round {rnd + 1}/{rounds}: running {title:<28} {sysname} ...",
                      file=sys.stderr, flush=True)
                runs.setdefault(title, {}).setdefault(sysname, []).append(fn(**kw))
    results = {title: {s: _median_run(rs, "rate" in kw) for s, rs in runs[title].items()}
               for title, kw in scen}
    print(f"\npsepr bench hop  ({os.cpu_count()} cores, 100-byte JSON payloads, loopback, "
          f"every process with psepr.tune_gc(); median of {rounds} "
          f"round{'s' if rounds > 1 else ''})\n")
    print(f"{'scenario':<28} " + " ".join(f"{s:>22}" for s, _ in systems))
    for title, _ in scen:
        row = results[title]
        cells = []
        for s, _ in systems:
            r = row[s]
            if "p50_us" in r:
                cells.append(f"p50 {r['p50_us']:6.0f} p99 {r['p99_us']:6.0f} us")
            else:
                cells.append(f"{r['rate']:>12,.0f}/s" + (f" d{r['dropped']}" if r["dropped"]
                                                          else ""))
        print(f"{title:<28} " + " ".join(f"{c:>22}" for c in cells))
        print(f"{'  CPU us per event':<28} " + " ".join(
            f"{row[s]['cpu_us']:>22.1f}" for s, _ in systems))
    single = results[scen[0][0]]["psepr"]["rate"]
    many = results[scen[3][0]]["psepr"]["rate"]
    per_round = [m["rate"] / o["rate"] if o["rate"] else 0.0
                 for o, m in zip(runs[scen[0][0]]["psepr"], runs[scen[3][0]]["psepr"])]
    print(f"\n{k10} leases / single lease rate: {many / single if single else 0:.2f}x"
          + (f" (round by round: {', '.join(f'{x:.2f}' for x in per_round)})"
             if rounds > 1 else ""))
    for title, kw in scen:
        r = results[title]["psepr"]
        roles = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_us_by_role"].items())
        unit = "p99 us" if "rate" in kw else "events/s"
        every = " / ".join(f"{x:,.0f}" for x in r["rounds"])
        print(f"  psepr {title}: received {r['received']} in {r['seconds']:.2f} s, "
              f"dropped {r['dropped']}; CPU us per event by role: {roles}"
              + (f"; rounds ({unit}): {every}" if rounds > 1 else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _role_main(argv: list[str]) -> None:
    # Every role of every system gets the same collector tuning (see psepr.tune_gc).
    from psepr.config import tune_gc
    tune_gc()
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=sorted(ROLES))
    p.add_argument("--url")
    p.add_argument("--port", type=int)
    p.add_argument("--channel", default="/bench/hop/")
    p.add_argument("--leases", type=int, default=1)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--rate", type=int, default=0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--cproxy", action="store_true")
    p.add_argument("--upstream", type=int, help="raw-fwd: connect to this port, do not bind")
    a = p.parse_args(argv)
    ROLES[a.role](a)


if __name__ == "__main__":
    _role_main(sys.argv[1:])
