"""`psepr bench core`: the pure router and client cores, in one process, no sockets.

Measures the CPU cost the router core (:class:`routers.core.RouterCore`) and
the client's decoder (:class:`psepr.session.Session`) spend per event, for the
shapes of ``psepr bench hop``: one channel (large groups), fan-out to 10
connections, and 10,000 channels (one event per group).  Messages are built
with the SDK's own encoder, 2,000 events each, 100-byte JSON payloads.

It also measures what a wake-up costs the same code: one single-event SEND
through the router core (``handle`` + ``flush``), and one ``orjson.dumps`` of
the payload, back to back and after sleeping 0.2 ms (5,000 events/s) or 1 ms,
as a process does between sparse events.  On a machine whose caches and clock
go cold while a process sleeps, the sparse case is what latency pays.
"""

from __future__ import annotations

import time

from psepr import channel as _channel
from psepr import wire
from psepr.config import ClientConfig, tune_gc
from psepr.session import READY, Session, make_entry
from psepr.wire import Kind
from routers.config import RouterConfig
from routers.core import RouterCore


class _Sink:
    def __init__(self) -> None:
        self.events = 0
        self.full_ids: set = set()

    def deliver(self, batches) -> None:
        self.events += sum(len(events) for _, events in batches)

    def __getattr__(self, name):          # every other report is ignored here
        return lambda *a, **k: None


def _measure(channels: int, holders: int, events: int, reps: int = 3) -> dict:
    items = [make_entry(f"/bench/core/c{i % channels}/", {"i": i, "t": 0.0, "p": "x" * 56})
             for i in range(events)]
    msgs = [wire.encode_send(items[i:i + 2000]) for i in range(0, events, 2000)]
    core = RouterCore(RouterConfig())
    core.handle(b"S", wire.encode(Kind.HELLO, {"v": 1}), 0.0)
    session = Session(ClientConfig(), ["inproc://none"], _Sink(), 0.0)
    session.state = READY
    for h in range(holders):
        ident = b"H%d" % h
        core.handle(ident, wire.encode(Kind.HELLO, {"v": 1}), 0.0)
        for k in range(channels):
            core.handle(ident, wire.encode(Kind.LEASE, {"id": f"L{k}", "channel":
                                                        f"/bench/core/c{k}/"}), 0.0)
    for k in range(channels):
        session.lease(f"L{k}", _channel(f"/bench/core/c{k}/"), None, 3600.0, 0.0)
    core.flush(lambda conn, frames: True)
    best_route = best_decode = float("inf")
    for _ in range(reps):
        out: list = []
        t0 = time.perf_counter()
        for m in msgs:
            core.handle(b"S", m, 1.0)
        core.flush(lambda conn, frames: out.append(frames) or True)
        t1 = time.perf_counter()
        mine = out[:len(out) // holders] if holders > 1 else out
        for frames in mine:
            session.on_message(frames, 1.0)
        t2 = time.perf_counter()
        best_route = min(best_route, (t1 - t0) / (events * holders))
        best_decode = min(best_decode, (t2 - t1) / events)
    return {"router_us_per_delivery": best_route * 1e6, "client_us_per_event": best_decode * 1e6}


def _cold(n: int) -> list[tuple]:
    """``[(sleep_s, route_p50_us, route_p99_us, dumps_p50_us, dumps_p99_us), ...]``."""
    import orjson
    payload = {"i": 1, "t": 0.0, "p": "x" * 56}
    msg = wire.encode_send([make_entry("/bench/core/cold/", payload)])
    core = RouterCore(RouterConfig())
    core.handle(b"S", wire.encode(Kind.HELLO, {"v": 1}), 0.0)
    core.handle(b"H", wire.encode(Kind.HELLO, {"v": 1}), 0.0)
    core.handle(b"H", wire.encode(Kind.LEASE, {"id": "L", "channel": "/bench/core/"}), 0.0)
    sink = lambda conn, frames: True  # noqa: E731
    core.flush(sink)
    rows = []
    for pause in (0.0, 0.0002, 0.001):
        route, dumps = [], []
        for _ in range(n):
            if pause:
                time.sleep(pause)
            t0 = time.perf_counter()
            core.handle(b"S", msg, 1.0)
            core.flush(sink)
            t1 = time.perf_counter()
            orjson.dumps(payload)
            t2 = time.perf_counter()
            route.append(t1 - t0)
            dumps.append(t2 - t1)
        route.sort()
        dumps.sort()
        rows.append((pause, route[n // 2] * 1e6, route[int(n * 0.99)] * 1e6,
                     dumps[n // 2] * 1e6, dumps[int(n * 0.99)] * 1e6))
    return rows


def main(args) -> int:
    """Print the per-event costs of the cores (best of 3 repetitions) and of a wake-up."""
    # As every process of the other benchmarks (and a router) does.  With CPython's
    # default thresholds the 10,000-channel decode measured 2.9 us per event instead
    # of 1.0: frequent full collections rescanning every live object (leases,
    # caches, the prepared messages).
    tune_gc()
    n = 20_000 if args.quick else 100_000
    rows = [("1 channel, 1 holder", 1, 1), ("1 channel, 10 holders", 1, 10),
            ("10,000 channels, 1 holder", 10_000, 1)]
    print(f"psepr bench core  ({n} events of 100 bytes, batches of 2,000, best of 3, "
          f"psepr.tune_gc())\n")
    print(f"{'shape':<28} {'router us/delivery':>20} {'client decode us/event':>24}")
    for title, channels, holders in rows:
        r = _measure(channels, holders, n)
        print(f"{title:<28} {r['router_us_per_delivery']:>20.2f} "
              f"{r['client_us_per_event']:>24.2f}")
    n_cold = 500 if args.quick else 3000
    print(f"\nafter a sleep ({n_cold} single events; p50 / p99 in us)\n")
    print(f"{'sleep before each':<28} {'router handle+flush':>20} {'orjson.dumps 100 B':>24}")
    for pause, r50, r99, d50, d99 in _cold(n_cold):
        label = "none (back to back)" if not pause else f"{pause * 1000:g} ms"
        print(f"{label:<28} {r50:>10.1f} / {r99:>7.1f} {d50:>14.2f} / {d99:>7.2f}")
    return 0
