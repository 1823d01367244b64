"""End to end: a real `psepr router` process and real SDK connections (issue 2, acceptance 3).

Proves, over ZeroMQ on loopback, that the router
* grants leases, capped at its maximum (default 3600 s, or --max-lease);
* renews a lease when the same id is registered again (no second lease);
* stops delivering on a released lease;
* expires an unrenewed lease and tells the holder (``LeaseExpired``);
* applies type filters and directed delivery (to_service / to_instance);
* delivers an event once per overlapping lease of one connection, naming them all;
* stamps ``from.service`` with the session's principal, which a client cannot forge
  (neither through the SDK's Event fields nor with a raw wire message).

Ordering trick used below instead of waiting for "nothing": events from one sender
through one router reach each receiver in order, so when a receiver's next event is
a later *sentinel*, the earlier event was not delivered to it.
"""

from __future__ import annotations

import pytest
import zmq

import psepr
from psepr import wire
from psepr.wire import Kind

CH = "/e2e.example.com/router/"


def _connect(url: str, **kw) -> psepr.Connection:
    return psepr.connect(url, preset="local", **kw)


# -- grants ------------------------------------------------------------------------------

def test_lease_grant_is_capped_at_router_max(start_router):
    r = start_router("--max-lease", "5")
    with _connect(r.url) as con:
        lease = con.lease(CH, duration=100)
        assert lease.granted == 5.0
        assert con.welcome["max_lease"] == 5.0


def test_default_router_max_lease_is_one_hour(router_proc):
    with _connect(router_proc.url) as con:
        assert con.lease(CH, duration=100_000).granted == 3600.0
        assert con.lease(CH + "short/", duration=7).granted == 7.0


def test_lease_receives_events_on_and_below_its_channel_only(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url) as pub:
        lease = sub.lease(CH + "a/")
        pub.send(CH + "ab/", {"n": 0})          # sibling, not below /a/
        pub.send(CH + "a/", {"n": 1})
        pub.send(CH + "a/b/c/", {"n": 2})
        pub.flush()
        assert lease.receive(timeout=5).payload == {"n": 1}
        assert lease.receive(timeout=5).payload == {"n": 2}
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=0.3)


# -- renewal, release, expiry ------------------------------------------------------------

def test_reregistering_the_same_id_renews_the_lease(start_router):
    r = start_router("--max-lease", "30")
    with _connect(r.url) as sub, _connect(r.url) as pub:
        control = sub.lease(CH + "control/", duration=1.0, renew=False)
        lease = sub.lease(CH, duration=1.0, id="mine", renew=False)
        again = sub.lease(CH, duration=20.0, id="mine", renew=False)
        assert again is lease and lease.granted == 20.0
        assert sub.stats()["leases"] == 2          # renewed, not a second lease
        # The control lease (same first grant, not renewed) expiring proves the
        # first grant of "mine" has run out too.
        with pytest.raises(psepr.LeaseExpired):
            control.receive(timeout=5)
        pub.send(CH + "x/", {"after": "renewal"})
        pub.flush()
        assert lease.receive(timeout=5).payload == {"after": "renewal"}


def test_released_lease_gets_no_more_events(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url) as pub:
        gone = sub.lease(CH)
        kept = sub.lease(CH)
        pub.send(CH, {"n": 1})
        pub.flush()
        assert set(gone.receive(timeout=5).leases) == {gone.id, kept.id}
        assert kept.receive(timeout=5).payload == {"n": 1}
        gone.release()
        assert sub.stats()["leases"] == 1
        pub.send(CH, {"n": 2})
        pub.flush()
        ev = kept.receive(timeout=5)
        assert ev.payload == {"n": 2} and ev.leases == (kept.id,)   # the router left gone out
        assert gone.pending() == 0
        with pytest.raises(psepr.ClosedError):
            gone.receive(timeout=0.5)


def test_unrenewed_lease_expires_with_notice_to_holder(start_router):
    r = start_router("--max-lease", "1")
    with _connect(r.url) as sub, _connect(r.url) as pub:
        lease = sub.lease(CH, duration=60, renew=False)
        assert lease.granted == 1.0
        with pytest.raises(psepr.LeaseExpired) as info:
            lease.receive(timeout=5)
        assert info.value.channel == CH and info.value.ref == lease.id
        assert isinstance(info.value, psepr.RemoteError)
        assert sub.stats()["leases"] == 0
        pub.send(CH, {"late": True})
        pub.flush()
        with pytest.raises(psepr.LeaseExpired):
            lease.receive(timeout=0.3)


# -- filters and directed delivery ---------------------------------------------------------

def test_type_filter_passes_only_that_type(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url) as pub:
        hb = sub.lease(CH, type="heartbeat")
        anything = sub.lease(CH)
        pub.send(CH + "h/", {"n": 1}, type="other")
        pub.send(CH + "h/", {"n": 2})                       # untyped
        pub.send(CH + "h/", {"n": 3}, type="heartbeat")
        pub.flush()
        ev = hb.receive(timeout=5)
        assert (ev.payload, ev.type) == ({"n": 3}, "heartbeat")
        assert [anything.receive(timeout=5).payload["n"] for _ in range(3)] == [1, 2, 3]


def test_directed_delivery_by_to_service(router_proc):
    url = router_proc.url
    with _connect(url, service="alpha") as a, _connect(url, service="beta") as b, \
            _connect(url, service="sender") as pub:
        la, lb = a.lease(CH), b.lease(CH)
        pub.send(CH, {"for": "alpha"}, to_service="alpha")
        pub.send(CH, {"for": "everyone"})
        pub.flush()
        ev = la.receive(timeout=5)
        assert ev.payload == {"for": "alpha"} and ev.to_service == "alpha"
        assert la.receive(timeout=5).payload == {"for": "everyone"}
        assert lb.receive(timeout=5).payload == {"for": "everyone"}   # skipped the directed one


def test_directed_delivery_by_to_instance(router_proc):
    url = router_proc.url
    with _connect(url, service="svc") as a, _connect(url, service="svc") as b, \
            _connect(url) as pub:
        assert a.instance != b.instance
        la, lb = a.lease(CH), b.lease(CH)
        pub.send(CH, {"for": "b"}, to_instance=b.instance)
        pub.send(CH, {"for": "everyone"})
        pub.flush()
        assert lb.receive(timeout=5).payload == {"for": "b"}
        assert lb.receive(timeout=5).payload == {"for": "everyone"}
        assert la.receive(timeout=5).payload == {"for": "everyone"}


def test_overlapping_leases_on_one_connection_each_get_the_event(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url) as pub:
        wide = sub.lease(CH)
        narrow = sub.lease(CH + "x/")
        typed = sub.lease(CH + "x/", type="t")
        pub.send(CH + "x/y/", {"n": 1}, type="t")
        pub.flush()
        evs = [lease.receive(timeout=5) for lease in (wide, narrow, typed)]
        assert len({e.id for e in evs}) == 1
        assert set(evs[0].leases) == {wide.id, narrow.id, typed.id}
        assert sub.stats()["events_out"] == 1      # one delivery to the connection, three leases


# -- from.service stamping -------------------------------------------------------------------

def test_router_stamps_sender_principal_and_instance(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url, service="alice") as pub, \
            _connect(router_proc.url) as anon:
        assert pub.principal == "alice"
        lease = sub.lease(CH)
        pub.send(CH, {"n": 1})
        pub.flush()
        anon.send(CH, {"n": 2})
        anon.flush()
        ev = lease.receive(timeout=5)
        assert (ev.from_service, ev.from_instance) == ("alice", pub.instance)
        ev = lease.receive(timeout=5)
        assert (ev.from_service, ev.from_instance) == ("anonymous", anon.instance)


def test_client_cannot_forge_from_service_with_an_event(router_proc):
    with _connect(router_proc.url) as sub, _connect(router_proc.url, service="alice") as pub:
        lease = sub.lease(CH)
        forged = psepr.Event(CH, {"x": 1}, from_service="root", from_instance="router-1")
        pub.send(forged)
        pub.flush()
        ev = lease.receive(timeout=5)
        assert ev.id == forged.id
        assert (ev.from_service, ev.from_instance) == ("alice", pub.instance)


def test_client_cannot_forge_from_service_on_the_wire(router_proc):
    """A hand-made SEND entry with a 'from' option is refused, not delivered."""
    with _connect(router_proc.url) as sub:
        lease = sub.lease(CH)
        ctx = zmq.Context.instance()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.setsockopt(zmq.RCVTIMEO, 5000)
        try:
            raw.connect(router_proc.url)
            raw.send_multipart(wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION,
                                                         "service": "mallory"}))
            assert raw.recv_multipart()[0] == bytes([Kind.WELCOME])
            body = b'{"x":1}'
            # (id, channel, type, time, fmt, opts, payload): a 'from' option is not
            # part of the protocol, and the honest event carries no 'from' at all.
            raw.send_multipart(wire.encode_send([
                ("forged-1", CH, None, 0.0, wire.FMT_JSON, {"fs": "root"}, body),
                ("honest-1", CH, None, 0.0, wire.FMT_JSON, None, body)]))
            kind, header, _ = wire.decode(raw.recv_multipart())
            assert kind == Kind.ERROR and header["ref"] == "forged-1"
            assert header["code"] == wire.E_BAD_EVENT
        finally:
            raw.close(linger=0)
        ev = lease.receive(timeout=5)
        assert ev.id == "honest-1" and ev.from_service == "mallory"
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=0.3)


def test_inbox_replies_reach_only_the_inbox_owner(router_proc):
    """A broad lease (/example.com/, /) does not see replies sent to someone's inbox."""
    with psepr.connect(router_proc.url, service="asker") as asker, \
            psepr.connect(router_proc.url, service="echo") as echo, \
            psepr.connect(router_proc.url, service="snoop") as snoop:
        broad = snoop.lease("/example.com/")
        root = snoop.lease("/")
        service = echo.lease("/example.com/echo/")
        import threading

        def answer():
            req = service.receive(timeout=5)
            echo.reply(req, {"secret": 42})

        t = threading.Thread(target=answer)
        t.start()
        reply = asker.request("/example.com/echo/", {"q": 1}, timeout=5)
        t.join(5)
        assert reply.payload == {"secret": 42}
        assert reply.channel.parts[1] == "_inbox"
        # The snoop saw the request on both leases, and nothing else.
        seen = []
        while True:
            try:
                seen.append(snoop.receive(timeout=0.5))
            except psepr.TimeoutError:
                break
        assert [e.channel.text for e in seen] == ["/example.com/echo/"] * 2
        assert broad.pending() == 0 and root.pending() == 0


@pytest.mark.parametrize("listens", [1, 2])
def test_router_serves_and_stops_promptly_with_one_socket_or_several(start_router, listens):
    # One listen address: the router waits inside ZeroMQ's receive, its RCVTIMEO
    # bounded by the next deadline; two: it sleeps in select.poll on both
    # sockets' descriptors.  Either way a client of each socket is served, and
    # an idle router stops soon after SIGTERM (its loop wakes within 0.25 s).
    import signal
    import time
    extra = [a for _ in range(listens) for a in ("--listen", "tcp://127.0.0.1:0")]
    r = start_router(*extra)
    assert len(r.urls) == listens
    with psepr.connect(r.urls[0]) as sub:
        lease = sub.lease(CH, duration=60)
        for url in r.urls:
            with psepr.connect(url) as pub:
                pub.send(CH + "x/", {"via": url})
                pub.flush()
            assert lease.receive(timeout=5).payload == {"via": url}
    time.sleep(0.5)                      # idle: asleep until its next deadline
    t0 = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert r.proc.wait(timeout=10) == 0
    # Generous for a loaded machine; a loop that missed the stop flag would sleep
    # until its next timer (the stats publication, seconds away) or forever.
    assert time.monotonic() - t0 < 2.0
