"""Bounded resources (issue 2, acceptance 6), with real router processes on loopback.

What these tests prove:

* A client that leases a channel and then stops reading does not grow the
  router's memory without bound: while a flood several times larger than the
  bound goes to it, the router's RSS stays below a bound derived from
  ``RouterConfig`` (its ``conn_queue`` messages queued out to the slow client
  and in from the sender, one turn's ``max_bytes_per_turn``) plus slack; the
  excess is dropped and counted in the router's stats.
* The slow client is told: once it reads again, the ``"d"`` counts on DELIVER
  and PONG headers add up to exactly what the router dropped for it, and
  events received plus events reported dropped equal events sent.
* The SDK's per-lease queue is bounded too: beyond ``ClientConfig.lease_queue``
  events are dropped (newest first) and counted in ``lease.dropped``.
* Fairness: while one sender floods a channel, another sender/receiver pair on
  another channel still gets every one of its events.
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
import zmq

import psepr
from psepr import wire
from psepr.wire import Kind
from routers.config import RouterConfig

MiB = 1 << 20
_R = RouterConfig()
_BATCH = psepr.ClientConfig().batch_bytes
#: What the router may hold for this flood, from RouterConfig's documented bounds:
#: the slow connection's ZeroMQ queue (conn_queue DELIVER messages of about
#: deliver_bytes plus one SDK batch each), the sender's receive queue (conn_queue
#: SDK batches) and one loop turn's reading (max_bytes_per_turn).
HELD = _R.conn_queue * (_R.deliver_bytes + 2 * _BATCH) + _R.max_bytes_per_turn
#: Allowed RSS growth: that plus generous allocator/interpreter slack.  The flood
#: below is several times larger, so a router that queued it would fail.
RSS_BOUND = HELD + 64 * MiB
PAYLOAD = "x" * 4000                    # a JSON string: 4002 bytes on the wire
FLOOD_EVENTS = 100_000                  # 100k * ~4 KiB: ~400 MiB through the router
FLOOD_SECONDS = 30.0


def deliver_events(rest: list) -> int:
    """Events in a DELIVER message's (segment header, segment body) frame pairs."""
    return sum(len(orjson.loads(rest[k])["i"]) for k in range(0, len(rest), 2))


class SlowClient:
    """A raw DEALER client that says HELLO, leases a channel, then reads only when told."""

    def __init__(self, url: str, channel: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1)          # keep the backlog in the router
        self.sock.setsockopt(zmq.RCVBUF, 64 << 10)
        self.sock.connect(url)
        self.sock.send_multipart(wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION,
                                                          "service": "slow"}))
        kind, h, _ = self.recv()
        assert kind == Kind.WELCOME, h
        self.instance = h["instance"]
        self.sock.send_multipart(wire.encode(Kind.LEASE, {"id": "slow", "channel": channel,
                                                          "duration": 600}))
        kind, h, _ = self.recv()
        assert kind == Kind.LEASED, h

    def recv(self, timeout: float = 5.0):
        assert self.sock.poll(int(timeout * 1000)), "no message from the router"
        return wire.decode(self.sock.recv_multipart())

    def drain(self, deadline: float) -> tuple[int, int]:
        """Read everything until a PONG answers our PING; returns (events, told dropped)."""
        events = told = 0
        self.sock.send_multipart(wire.encode(Kind.PING, {"req": "drained"}))
        while time.monotonic() < deadline:
            kind, h, rest = self.recv(timeout=max(0.0, deadline - time.monotonic()))
            told += h.get("d", 0)
            if kind == Kind.DELIVER:
                events += deliver_events(rest)
            elif kind == Kind.PONG and h.get("req") == "drained":
                return events, told
        raise AssertionError("the router's backlog for the slow client did not drain in time")

    def close(self) -> None:
        self.sock.close(linger=0)


class Flooder(threading.Thread):
    """Sends up to ``limit`` events to ``channel`` (bounded in count and time), then flushes."""

    def __init__(self, url: str, channel: str, limit: int, seconds: float,
                 payload=PAYLOAD) -> None:
        super().__init__(daemon=True)
        self.con = psepr.connect(url, service="flooder")
        self.channel, self.limit, self.seconds, self.payload = channel, limit, seconds, payload
        self.sent = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.seconds
            send, ch, payload = self.con.send, self.channel, self.payload
            while self.sent < self.limit and not self.stop.is_set():
                for _ in range(1000):
                    send(ch, payload)
                self.sent += 1000
                if time.monotonic() > deadline:
                    break
            self.con.flush(timeout=30.0)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def finish(self, timeout: float = 60.0) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the flooder did not finish"
        self.con.close()
        assert self.error is None, repr(self.error)


@pytest.mark.slow
def test_slow_reader_does_not_grow_router_memory(router_proc):
    slow = SlowClient(router_proc.url, "/flood/")
    flood = None
    try:
        with psepr.connect(router_proc.url) as probe:   # also warms the router up
            assert probe.stats()["dropped"] == 0
            base = router_proc.rss()
            flood = Flooder(router_proc.url, "/flood/x/", FLOOD_EVENTS, FLOOD_SECONDS)
            flood.start()
            peak = base
            while flood.is_alive():
                peak = max(peak, router_proc.rss())
                flood.join(0.05)
            flood.finish()
            peak = max(peak, router_proc.rss())
            assert router_proc.alive()
            total_bytes = flood.sent * len(PAYLOAD)
            assert total_bytes > 2 * RSS_BOUND, "the flood is too small to prove anything"
            assert peak - base < RSS_BOUND, (
                f"router RSS grew by {(peak - base) / MiB:.0f} MiB (bound "
                f"{RSS_BOUND / MiB:.0f} MiB) for a {total_bytes / MiB:.0f} MiB flood")
            stats = probe.stats()
            assert stats["dropped"] > 0
            assert [c["instance"] for c in stats["slow_connections"]] == [slow.instance]
            dropped_for_slow = stats["slow_connections"][0]["dropped"]
            # Reading again: everything kept arrives, and the client is told of the rest.
            events, told = slow.drain(time.monotonic() + 30.0)
            print(f"flood {flood.sent} events, {total_bytes / MiB:.0f} MiB; router RSS "
                  f"+{(peak - base) / MiB:.1f} MiB; slow client got {events}, told of {told} "
                  f"dropped")
            assert told == dropped_for_slow > 0
            assert events + told == flood.sent
    finally:
        if flood is not None and flood.is_alive():
            flood.stop.set()
            flood.join(30.0)
        slow.close()


def test_sdk_lease_queue_is_bounded(router_proc):
    cfg = psepr.ClientConfig(lease_queue=100)
    with psepr.connect(router_proc.url, config=cfg) as rx, psepr.connect(router_proc.url) as tx:
        lease = rx.lease("/bounded/", duration=60)
        for i in range(1000):
            tx.send("/bounded/x/", i)
        tx.flush()
        deadline = time.monotonic() + 10.0
        while lease.pending() + lease.dropped < 1000:
            assert time.monotonic() < deadline, (lease.pending(), lease.dropped)
            time.sleep(0.01)   # polling with a deadline: the I/O thread fills the queue
        assert lease.pending() == 100
        assert lease.dropped == 900
        assert [lease.receive(timeout=1.0).payload for _ in range(100)] == list(range(100))
        # Room again: new events are queued once more.
        tx.send("/bounded/x/", "after")
        tx.flush()
        assert lease.receive(timeout=5.0).payload == "after"


@pytest.mark.slow
def test_flood_does_not_starve_another_channel(router_proc):
    slow = SlowClient(router_proc.url, "/flood/")     # the flood's holder never reads
    flood = Flooder(router_proc.url, "/flood/x/", 5_000_000, 60.0, payload="y" * 98)
    try:
        with psepr.connect(router_proc.url) as rx, psepr.connect(router_proc.url) as tx:
            lease = rx.lease("/calm/", duration=60)
            flood.start()
            deadline = time.monotonic() + 10.0
            while rx.stats()["events_in"] < 50_000:         # the flood is on
                assert time.monotonic() < deadline, "the flood did not start"
            for i in range(200):
                tx.send("/calm/x/", i)
            tx.flush(timeout=20.0)
            got = [lease.receive(timeout=20.0).payload for _ in range(200)]
            assert got == list(range(200))
            assert flood.is_alive(), "the flood ended before the calm pair finished"
    finally:
        flood.stop.set()
        flood.finish()
        slow.close()
    assert router_proc.alive()
