"""The router's forwarding core (routers/core.py), driven directly: no sockets, no clock.

Messages are built with :func:`psepr.wire.encode` and fed to ``RouterCore.handle``;
a fake ``send`` records what ``flush`` hands out (and can report a full queue).
Proves:

* HELLO/WELCOME and the principal; LEASE/LEASED (capped), UNLEASE, lease limits;
* SEND reaches matching leases only, element-wise, with type filters and
  directed delivery (to-service/to-instance); a connection with overlapping
  leases gets each event once; a connection wanting every group gets the SEND
  header and body byte for byte, one wanting some gets only those groups;
* ``from.service`` is the principal (CURVE principal, else the declared
  service) stamped by the router; a client cannot forge it;
* lease expiry via ``tick`` sends EXPIRED; silent sessions are forgotten after
  ``conn_timeout``; caches of matches follow lease changes;
* errors: no session; a bad type, channel, opts or an ACL denial refuses only
  its group (ERROR naming the event id and channel) and the rest of the batch
  is routed; a bad id, time, format, an oversize payload (too-big) or a body
  length mismatch refuses the whole message before anything is queued;
* drops are counted and reported ("d") on the next DELIVER or PONG; control
  replies survive a full queue; DELIVERs are cut at ``deliver_bytes`` and at
  a bounded number of segments;
* ``stats()`` and ``publish_stats()`` routing a stats event to a lease on
  ``/<authority>/_sys/routers/<name>/stats/``.
"""

from __future__ import annotations

import orjson
import pytest

from psepr import wire
from psepr.channel import parse
from psepr.wire import Kind
from registry.acl import ACL, Principal
from routers.config import RouterConfig
from routers.core import ROUTER_SERVICE, STATS_TYPE, RouterCore

CONFIG = RouterConfig(name="r1", authority="psepr.local", max_lease=3600.0, conn_timeout=30.0,
                      stats_interval=5.0)


def group(channel, ids, payloads, typ=None, opts=None, fmt=wire.FMT_JSON, t=1.0):
    """One group of a SEND message: a run of events to one destination."""
    assert len(ids) == len(payloads)
    return dict(g=[channel, typ, opts, len(ids)], i=list(ids), t=[t] * len(ids),
                f=[fmt] * len(ids), l=[len(p) for p in payloads], body=b"".join(payloads))


def send_header(*groups) -> tuple[dict, bytes]:
    """The SEND header (groups + columns, see psepr.wire) and body for ``groups``."""
    header = {"g": [], "i": [], "t": [], "f": [], "l": []}
    body = b""
    for gr in groups:
        header["g"].append(gr["g"])
        for col in "itfl":
            header[col] += gr[col]
        body += gr["body"]
    return header, body


def send_frames(*groups, extra_body=b"", header_extra=None, mutate=None):
    """SEND frames built with psepr.wire.encode; ``mutate(header)`` may break them."""
    header, body = send_header(*groups)
    header.update(header_extra or {})
    if mutate is not None:
        mutate(header)
    return wire.encode(Kind.SEND, header, body + extra_body)


class Delivered:
    """One event as a client sees it in a DELIVER message."""

    def __init__(self, fsvc, finst, item):
        self.fsvc, self.finst = fsvc, finst
        self.id, self.channel, self.type, self.time, self.fmt, self.opts, raw = item
        self.payload = bytes(raw)

    def __repr__(self):
        return f"Delivered({self.id!r}, {self.channel!r})"


def segments(meta: dict, rest: list) -> list[tuple[str, str, bytes, bytes]]:
    """A DELIVER's segments: (from_service, from_instance, raw header, body)."""
    assert len(rest) == 2 * len(meta["s"])
    return [(fsvc, finst, rest[2 * k], rest[2 * k + 1])
            for k, (fsvc, finst) in enumerate(meta["s"])]


def unpack_deliver(meta: dict, rest: list) -> list[Delivered]:
    out = []
    for fsvc, finst, raw_header, body in segments(meta, rest):
        header = orjson.loads(raw_header)
        assert sum(header["l"]) == len(body)
        out.extend(Delivered(fsvc, finst, item) for item in wire.unpack_events(header, body))
    return out


class Harness:
    """A RouterCore and a recording send function."""

    def __init__(self, config: RouterConfig = CONFIG, acl: ACL | None = None) -> None:
        self.core = RouterCore(config, acl, now=0.0)
        self.full: set[bytes] = set()        # connections whose queue is "full"
        self.gone: set[bytes] = set()        # connections that vanished (EHOSTUNREACH)
        self.sent: list[tuple[bytes, int, dict, list, bool]] = []
        self.now = 0.0

    def send(self, conn, frames) -> bool:
        kind, header, rest = wire.decode(frames)
        if conn.ident in self.gone:            # as routers/router.py does on EHOSTUNREACH
            self.core.detach(conn.ident, self.now)
            return False
        ok = conn.ident not in self.full
        self.sent.append((conn.ident, kind, header, rest, ok))
        return ok

    def handle(self, ident: bytes, frames, principal: str | None = None, now: float | None = None):
        self.core.handle(ident, frames, self.now if now is None else now, principal)

    def flush(self) -> list[tuple[bytes, int, dict, list, bool]]:
        start = len(self.sent)
        self.core.flush(self.send)
        return self.sent[start:]

    def messages(self, ident: bytes, kind: int | None = None) -> list[tuple[dict, list]]:
        """Flush, then what ``ident`` received (of one kind, if given); forgets them."""
        self.flush()
        got = [(h, r) for i, k, h, r, ok in self.sent
               if i == ident and ok and (kind is None or k == kind)]
        self.sent = [m for m in self.sent if m[0] != ident]
        return got

    # -- conversations ---------------------------------------------------------------
    def hello(self, ident: bytes, service: str | None = "svc", instance: str | None = None,
              principal: str | None = None) -> dict:
        header = {"v": wire.PROTOCOL_VERSION, "service": service,
                  "instance": instance or ident.decode()}
        self.handle(ident, wire.encode(Kind.HELLO, header), principal=principal)
        return self.expect(ident, Kind.WELCOME)

    def lease(self, ident: bytes, lid: str, channel: str, typ: str | None = None,
              duration: float = 60.0, req: int = 1) -> dict:
        self.handle(ident, wire.encode(Kind.LEASE, {"id": lid, "channel": channel, "type": typ,
                                                    "duration": duration, "req": req}))
        return self.expect(ident, Kind.LEASED)

    def expect(self, ident: bytes, kind: int) -> dict:
        """Flush; ``ident`` must have received exactly one message, of ``kind``."""
        self.flush()
        got = [(k, h) for i, k, h, r, ok in self.sent if i == ident and ok]
        self.sent = [m for m in self.sent if m[0] != ident]
        assert [k for k, _ in got] == [kind], f"expected one {Kind(kind).name}, got {got}"
        return got[0][1]

    def errors(self, ident: bytes) -> list[dict]:
        return [h for h, _ in self.messages(ident, Kind.ERROR)]

    def deliveries(self, ident: bytes) -> list[Delivered]:
        out = []
        for meta, rest in self.messages(ident, Kind.DELIVER):
            out.extend(unpack_deliver(meta, rest))
        return out


@pytest.fixture
def h() -> Harness:
    return Harness()


# -- sessions ----------------------------------------------------------------------------------

def test_hello_is_answered_with_welcome(h):
    welcome = h.hello(b"c1", service="sensor", instance="host-1")
    assert welcome["v"] == wire.PROTOCOL_VERSION
    assert welcome["router"] == "r1" and welcome["authority"] == "psepr.local"
    assert welcome["principal"] == "sensor" and welcome["instance"] == "host-1"
    assert welcome["max_lease"] == 3600.0
    assert welcome["max_event"] == CONFIG.max_event_bytes


def test_authenticated_principal_overrides_the_declared_service(h):
    welcome = h.hello(b"c1", service="root-pretender", principal="alice")
    assert welcome["principal"] == "alice"


def test_anonymous_without_service_and_principal(h):
    assert h.hello(b"c1", service=None)["principal"] == "anonymous"


def test_hello_with_a_wrong_version_is_refused(h):
    h.handle(b"c1", wire.encode(Kind.HELLO, {"v": 99, "service": "svc"}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_VERSION and "99" in err["message"]
    assert b"c1" not in h.core.conns


def test_a_peer_router_dialing_a_client_endpoint_is_told_where_peers_go(h):
    h.handle(b"r9", wire.encode(Kind.PEER_HELLO, {"v": 1, "router": "r9", "epoch": 1,
                                                   "authority": "psepr.local"}))
    [err] = h.errors(b"r9")
    assert err["code"] == wire.E_PROTOCOL
    assert "PEER_HELLO on a client endpoint" in err["message"]
    assert "--peer-listen" in err["message"]
    assert b"r9" not in h.core.conns


def test_hello_with_a_bad_service_name_is_refused(h):
    h.handle(b"c1", wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION, "service": "a b"}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_PROTOCOL and "service" in err["message"]
    assert b"c1" not in h.core.conns


def test_hello_may_not_declare_the_routers_own_service(h):
    # Events a router originates (its stats) carry service "psepr-router"; a client
    # declaring it could pass its events off as the router's.
    h.handle(b"c1", wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION,
                                              "service": ROUTER_SERVICE}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_DENIED and "reserved" in err["message"]
    assert b"c1" not in h.core.conns


def test_send_before_hello_is_an_error_no_session(h):
    g = group("/a/", ["e1"], [b"1"])
    h.handle(b"c1", send_frames(g))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_NO_SESSION


def test_lease_before_hello_is_an_error_no_session_echoing_req(h):
    h.handle(b"c1", wire.encode(Kind.LEASE, {"id": "l1", "channel": "/a/", "req": 7}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_NO_SESSION and err["req"] == 7


def test_bye_forgets_the_session_and_its_leases(h):
    h.hello(b"c1")
    h.lease(b"c1", "l1", "/a/")
    h.handle(b"c1", wire.encode(Kind.BYE, {}))
    assert b"c1" not in h.core.conns
    assert len(h.core.leases) == 0


def test_a_second_hello_starts_a_fresh_session_without_the_old_leases(h):
    h.hello(b"c1")
    h.lease(b"c1", "l1", "/a/")
    h.hello(b"c1")
    assert len(h.core.leases) == 0


def test_a_hello_on_a_new_connection_takes_a_vanished_session_over_with_its_leases(h):
    assert h.hello(b"old", instance="inst-1")["resumed"] is False
    h.lease(b"old", "l1", "/a/")
    h.core.detach(b"old", 0.0)                 # its connection vanished
    assert h.hello(b"new", instance="inst-1")["resumed"] is True
    assert b"old" not in h.core.conns and b"new" in h.core.conns
    assert len(h.core.leases) == 1
    h.hello(b"s")
    h.handle(b"s", send_frames(group("/a/x/", ["e1"], [b"1"])))
    assert [d.id for d in h.deliveries(b"new")] == ["e1"]


def test_events_for_a_vanished_connection_wait_for_its_next_hello(h):
    h.hello(b"old", instance="inst-1")
    h.lease(b"old", "l1", "/a/")
    h.hello(b"s")
    h.gone.add(b"old")
    h.handle(b"s", send_frames(group("/a/x/", ["e1", "e2"], [b"1", b"2"])))
    h.flush()                                  # EHOSTUNREACH: the session detaches
    h.handle(b"s", send_frames(group("/a/y/", ["e3"], [b"3"])))
    h.flush()
    assert h.core.conns[b"old"].detached is not None and h.core.dropped == 0
    # the client, from a new routing id: WELCOME (resumed), then what was kept
    h.handle(b"new", wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION, "service": "svc",
                                              "instance": "inst-1"}))
    h.flush()
    assert [k for i, k, *_ in h.sent if i == b"new"] == [Kind.WELCOME, Kind.DELIVER]
    assert [d.id for d in h.deliveries(b"new")] == ["e1", "e2", "e3"]
    assert h.core.dropped == 0


def test_a_stale_hello_does_not_pull_a_live_session_away(h):
    h.hello(b"live", instance="inst-1")
    h.lease(b"live", "l1", "/a/")
    assert h.hello(b"stale", instance="inst-1")["resumed"] is False
    assert h.core.conns[b"live"].instance == "inst-1" and len(h.core.leases) == 1
    h.hello(b"s")
    h.handle(b"s", send_frames(group("/a/x/", ["e1"], [b"1"])))
    assert [d.id for d in h.deliveries(b"live")] == ["e1"]


def _hello(h, ident: bytes, req: int, resume=None) -> dict:
    header = {"v": wire.PROTOCOL_VERSION, "service": "svc", "instance": "inst-1", "req": req}
    if resume is not None:
        header["resume"] = resume
    h.handle(ident, wire.encode(Kind.HELLO, header))
    return h.expect(ident, Kind.WELCOME)


def test_a_newer_hello_naming_a_live_session_takes_it_over(h):
    # The client gave up on a socket the router still thinks works, and came back
    # on a new one: the session (leases, queued events) moves, with no gap.
    token = _hello(h, b"old", 1)["session"]
    h.lease(b"old", "l1", "/a/")
    w = _hello(h, b"new", 2, resume=token)
    assert w["resumed"] is True and w["session"] == token
    assert b"old" not in h.core.conns and len(h.core.leases) == 1
    h.hello(b"s")
    h.handle(b"s", send_frames(group("/a/x/", ["e1"], [b"1"])))
    assert [d.id for d in h.deliveries(b"new")] == ["e1"]


def test_a_stale_hello_naming_the_session_or_a_wrong_token_does_not_take_it_over(h):
    token = _hello(h, b"old", 1)["session"]
    h.lease(b"old", "l1", "/a/")
    assert _hello(h, b"new", 3, resume=token)["resumed"] is True
    # a HELLO the client sent before (req 2), from a socket it already gave up
    assert _hello(h, b"stale", 2, resume=token)["resumed"] is False
    assert _hello(h, b"other", 9, resume="0" * 16)["resumed"] is False
    h.hello(b"s")
    h.handle(b"s", send_frames(group("/a/x/", ["e1"], [b"1"])))
    assert [d.id for d in h.deliveries(b"new")] == ["e1"]


def test_a_detached_session_is_forgotten_after_the_grace(h):
    h.hello(b"old", instance="inst-1")
    h.lease(b"old", "l1", "/a/")
    h.core.detach(b"old", 10.0)
    h.core.tick(10.0 + CONFIG.detach_grace - 0.5)
    assert b"old" in h.core.conns
    h.core.tick(10.0 + CONFIG.detach_grace + 0.5)
    assert b"old" not in h.core.conns and len(h.core.leases) == 0


def test_events_kept_for_a_session_that_never_comes_back_are_counted(h):
    h.hello(b"old", instance="inst-1")
    h.lease(b"old", "l1", "/a/")
    h.hello(b"s")
    h.gone.add(b"old")
    h.now = 10.0
    h.handle(b"s", send_frames(group("/a/x/", ["e1", "e2"], [b"1", b"2"])))
    h.flush()                                  # EHOSTUNREACH: kept for a new HELLO
    assert h.core.dropped == 0
    h.core.tick(10.0 + CONFIG.detach_grace + 0.5)
    assert b"old" not in h.core.conns
    st = h.core.stats(20.0)
    assert st["undelivered"] == 2 and st["dropped"] == 0    # not a slow reader's drops


def test_another_principal_cannot_take_a_session_over(h):
    h.hello(b"a", service="alice", instance="shared")
    h.lease(b"a", "l1", "/a/")
    assert h.hello(b"m", service="mallory", instance="shared")["resumed"] is False
    assert b"a" in h.core.conns and h.core.conns[b"a"].principal == "alice"
    assert len(h.core.leases) == 1


def test_unknown_kind_and_malformed_frames_are_answered_with_protocol_errors(h):
    h.handle(b"c1", [bytes([200]), b"{}"])
    h.handle(b"c1", [b"\x01", b"not json"])
    h.handle(b"c1", [b"\x01"])
    errs = h.errors(b"c1")
    assert [e["code"] for e in errs] == [wire.E_PROTOCOL] * 3
    assert "unknown message kind 200" in errs[0]["message"]


# -- leases ------------------------------------------------------------------------------------

def test_lease_is_granted_and_capped_at_max_lease(h):
    h.hello(b"c1")
    leased = h.lease(b"c1", "l1", "/a/b/", typ="hb", duration=99_999, req=3)
    assert leased == {"id": "l1", "channel": "/a/b/", "type": "hb", "granted": 3600.0, "req": 3}


def test_root_is_a_valid_lease(h):
    h.hello(b"c1")
    assert h.lease(b"c1", "all", "/")["granted"] == 60.0


def test_lease_on_a_bad_channel_is_refused_naming_it(h):
    h.hello(b"c1")
    h.handle(b"c1", wire.encode(Kind.LEASE, {"id": "l1", "channel": "/a b/", "req": 2}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_BAD_CHANNEL
    assert err["channel"] == "/a b/" and err["ref"] == "l1" and err["req"] == 2
    assert "'/a b/'" in err["message"]
    assert len(h.core.leases) == 0


@pytest.mark.parametrize("duration", [0, -5, "10", True, None])
def test_lease_with_a_bad_duration_is_refused(h, duration):
    h.hello(b"c1")
    h.handle(b"c1", wire.encode(Kind.LEASE, {"id": "l1", "channel": "/a/",
                                             "duration": duration}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_PROTOCOL and err["ref"] == "l1"


def test_lease_limit_per_connection(h):
    hh = Harness(CONFIG.replace(max_leases_per_conn=2))
    hh.hello(b"c1")
    hh.lease(b"c1", "l1", "/a/")
    hh.lease(b"c1", "l2", "/a/")
    hh.handle(b"c1", wire.encode(Kind.LEASE, {"id": "l3", "channel": "/a/"}))
    [err] = hh.errors(b"c1")
    assert err["code"] == wire.E_LIMIT and err["ref"] == "l3"


def test_unlease_stops_delivery(h):
    h.hello(b"c1")
    h.hello(b"c2")
    h.lease(b"c1", "l1", "/a/")
    h.handle(b"c1", wire.encode(Kind.UNLEASE, {"id": "l1", "req": 4}))
    assert h.expect(b"c1", Kind.UNLEASED) == {"id": "l1", "req": 4}
    h.handle(b"c2", send_frames(group("/a/", ["e1"], [b"1"])))
    assert h.deliveries(b"c1") == []


def test_unlease_of_an_unknown_lease_is_an_error(h):
    h.hello(b"c1")
    h.handle(b"c1", wire.encode(Kind.UNLEASE, {"id": "nope", "req": 5}))
    [err] = h.errors(b"c1")
    assert err["code"] == wire.E_UNKNOWN_LEASE and err["ref"] == "nope" and err["req"] == 5


# -- routing -------------------------------------------------------------------------------------

def test_send_reaches_matching_leases_only_element_wise(h):
    for c in (b"sender", b"ab", b"abx", b"other", b"root"):
        h.hello(c)
    h.lease(b"ab", "l", "/a/b/")
    h.lease(b"abx", "l", "/a/bc/")
    h.lease(b"other", "l", "/x/")
    h.lease(b"root", "l", "/")
    h.handle(b"sender", send_frames(group("/a/b/c/", ["e1"], [b'{"v":1}'])))
    got = h.deliveries(b"ab")
    assert [(d.id, d.channel, d.payload) for d in got] == [("e1", "/a/b/c/", b'{"v":1}')]
    assert [d.id for d in h.deliveries(b"root")] == ["e1"]
    assert h.deliveries(b"abx") == []
    assert h.deliveries(b"other") == []
    assert h.deliveries(b"sender") == []


def test_batch_keeps_order_and_payload_boundaries(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/x/", ["e1", "e2"], [b"11", b"2222"]),
                               group("/b/", ["skip"], [b"333"]),
                               group("/a/", ["e3"], [b"<payload/>"], fmt=wire.FMT_XML)))
    got = h.deliveries(b"r")
    assert [(d.id, d.channel, d.payload, d.fmt) for d in got] == [
        ("e1", "/a/x/", b"11", 0), ("e2", "/a/x/", b"2222", 0), ("e3", "/a/", b"<payload/>", 1)]
    assert h.errors(b"s") == []


def test_sender_holding_a_matching_lease_receives_its_own_event(h):
    h.hello(b"s")
    h.lease(b"s", "mine", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])))
    assert [d.id for d in h.deliveries(b"s")] == ["e1"]


def test_type_filters(h):
    for c in (b"s", b"hb", b"any"):
        h.hello(c)
    h.lease(b"hb", "l", "/a/", typ="heartbeat")
    h.lease(b"any", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["t1"], [b"1"], typ="heartbeat"),
                               group("/a/", ["t2"], [b"2"], typ="load"),
                               group("/a/", ["t3"], [b"3"])))
    assert [d.id for d in h.deliveries(b"hb")] == ["t1"]
    assert [(d.id, d.type) for d in h.deliveries(b"any")] == [
        ("t1", "heartbeat"), ("t2", "load"), ("t3", None)]


def test_directed_delivery_to_a_service(h):
    h.hello(b"s")
    h.hello(b"m1", service="monitor", instance="m-1")
    h.hello(b"m2", service="monitor", instance="m-2")
    h.hello(b"o", service="other")
    for c in (b"m1", b"m2", b"o"):
        h.lease(c, "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["d1"], [b"1"], opts={"ts": "monitor"})))
    assert [d.id for d in h.deliveries(b"m1")] == ["d1"]
    assert [d.id for d in h.deliveries(b"m2")] == ["d1"]
    assert h.deliveries(b"o") == []


def test_directed_delivery_to_an_instance(h):
    h.hello(b"s")
    h.hello(b"m1", service="monitor", instance="m-1")
    h.hello(b"m2", service="monitor", instance="m-2")
    for c in (b"m1", b"m2"):
        h.lease(c, "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["d1"], [b"1"], opts={"ts": "monitor", "ti": "m-2"}),
                               group("/a/", ["d2"], [b"2"], opts={"ti": "m-1"})))
    assert [(d.id, d.opts) for d in h.deliveries(b"m2")] == [
        ("d1", {"ts": "monitor", "ti": "m-2"})]
    assert [d.id for d in h.deliveries(b"m1")] == ["d2"]


def test_reply_fields_travel_unchanged(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    opts = {"rt": "/a/_inbox/s/", "re": "q1"}
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"], opts=opts)))
    [d] = h.deliveries(b"r")
    assert d.opts == opts


def test_overlapping_leases_of_one_connection_deliver_the_event_once(h):
    # The DELIVER carries each event once per connection; the client maps it to
    # every one of its leases that matches (psepr.wire: "the receiving client
    # decides which of its leases each group matches").
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "wide", "/a/")
    h.lease(b"r", "narrow", "/a/b/")
    h.lease(b"r", "unrelated", "/z/")
    h.handle(b"s", send_frames(group("/a/b/c/", ["e1"], [b"1"])))
    [(meta, rest)] = h.messages(b"r", Kind.DELIVER)
    assert len(segments(meta, rest)) == 1
    assert [(d.id, d.payload) for d in unpack_deliver(meta, rest)] == [("e1", b"1")]


def test_a_connection_getting_every_group_receives_the_send_byte_for_byte(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    frames = send_frames(group("/a/x/", ["e1", "e2"], [b"1", b"22"]), group("/a/", ["e3"], [b"3"]))
    h.handle(b"s", frames)
    [(meta, rest)] = h.messages(b"r", Kind.DELIVER)
    [(_, _, raw_header, body)] = segments(meta, rest)
    assert (raw_header, body) == (frames[1], frames[2])


def test_a_connection_getting_some_groups_receives_only_those(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/b/")
    h.handle(b"s", send_frames(group("/a/", ["a1"], [b"1"]), group("/b/", ["b1", "b2"],
                                                                   [b"22", b"333"]),
                               group("/c/", ["c1"], [b"4444"])))
    [(meta, rest)] = h.messages(b"r", Kind.DELIVER)
    [(_, _, raw_header, body)] = segments(meta, rest)
    header = orjson.loads(raw_header)
    assert header["g"] == [["/b/", None, None, 2]]
    assert header["i"] == ["b1", "b2"] and header["l"] == [2, 3]
    assert body == b"22333"


def test_from_is_stamped_with_the_authenticated_principal(h):
    h.hello(b"s", service="claims-to-be-root", instance="inst-1", principal="alice")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])),
             principal="mallory")      # only the HELLO's principal counts
    [d] = h.deliveries(b"r")
    assert (d.fsvc, d.finst) == ("alice", "inst-1")


def test_from_is_the_declared_service_without_authentication(h):
    h.hello(b"s", service="sensor", instance="i9")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])))
    [d] = h.deliveries(b"r")
    assert (d.fsvc, d.finst) == ("sensor", "i9")


def test_a_from_field_in_the_send_header_is_ignored(h):
    h.hello(b"s", service="sensor")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"]),
                               header_extra={"from": {"service": "forged"}}))
    [d] = h.deliveries(b"r")
    assert d.fsvc == "sensor"


def test_a_group_with_an_extra_from_element_is_refused(h):
    h.hello(b"s", service="sensor")
    h.hello(b"r")
    h.lease(b"r", "l", "/a/")
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"]),
                               mutate=lambda hd: hd["g"][0].append("forged")))
    assert h.deliveries(b"r") == []
    [err] = h.errors(b"s")
    assert err["code"] == wire.E_PROTOCOL


# -- expiry and liveness -----------------------------------------------------------------------

def test_lease_expiry_sends_expired_and_stops_delivery(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l1", "/a/", duration=10)
    h.core.tick(9.0)
    assert h.messages(b"r") == []
    h.core.tick(10.0)
    assert h.expect(b"r", Kind.EXPIRED) == {"id": "l1", "channel": "/a/"}
    h.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])), now=10.5)
    assert h.deliveries(b"r") == []


def test_renewal_postpones_expiry(h):
    h.hello(b"r")
    h.lease(b"r", "l1", "/a/", duration=10)
    h.now = 8.0
    assert h.lease(b"r", "l1", "/a/", duration=10)["granted"] == 10.0
    h.core.tick(12.0)
    assert h.messages(b"r", Kind.EXPIRED) == []
    h.core.tick(18.0)
    assert [m["id"] for m, _ in h.messages(b"r", Kind.EXPIRED)] == ["l1"]


def test_silent_sessions_are_forgotten_after_conn_timeout(h):
    h.hello(b"quiet")
    h.hello(b"chatty")
    h.lease(b"quiet", "l1", "/a/")
    h.handle(b"chatty", wire.encode(Kind.PING, {"req": 1}), now=25.0)
    h.core.tick(30.0)
    assert b"quiet" in h.core.conns          # exactly at the limit: still alive
    h.core.tick(31.0)
    assert b"quiet" not in h.core.conns
    assert b"chatty" in h.core.conns
    assert len(h.core.leases) == 0
    h.messages(b"quiet")
    h.handle(b"quiet", send_frames(group("/a/", ["e1"], [b"1"])), now=31.0)
    assert [e["code"] for e in h.errors(b"quiet")] == [wire.E_NO_SESSION]


def test_next_deadline_is_the_next_expiry_or_stats_time(h):
    h.hello(b"r")
    assert h.core.next_deadline(0.0) == CONFIG.stats_interval
    h.lease(b"r", "l1", "/a/", duration=2)
    assert h.core.next_deadline(0.0) == 2.0
    assert h.core.next_deadline(3.0) == 3.0


# -- bad input --------------------------------------------------------------------------------------

def _three_groups_with_a_bad_middle(bad):
    return send_frames(group("/a/", ["ok1"], [b"1"]), bad, group("/a/", ["ok2"], [b"2"]))


@pytest.fixture
def pair(h):
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/")
    return h


def test_bad_type_names_the_event_and_the_rest_is_routed(pair):
    pair.handle(b"s", _three_groups_with_a_bad_middle(group("/a/", ["bad1"], [b"x"],
                                                           typ="has space")))
    assert [d.id for d in pair.deliveries(b"r")] == ["ok1", "ok2"]
    [err] = pair.errors(b"s")
    assert err["code"] == wire.E_BAD_EVENT
    assert err["ref"] == "bad1" and "bad1" in err["message"]


def test_bad_channel_names_the_event_and_channel_and_the_rest_is_routed(pair):
    pair.handle(b"s", _three_groups_with_a_bad_middle(group("/a//", ["bad2"], [b"x"])))
    assert [d.id for d in pair.deliveries(b"r")] == ["ok1", "ok2"]
    [err] = pair.errors(b"s")
    assert err["code"] == wire.E_BAD_CHANNEL
    assert err["ref"] == "bad2" and err["channel"] == "/a//"
    assert "bad2" in err["message"] and "empty-element" in err["message"]


def test_event_to_the_root_is_refused(pair):
    pair.handle(b"s", _three_groups_with_a_bad_middle(group("/", ["bad3"], [b"x"])))
    assert [d.id for d in pair.deliveries(b"r")] == ["ok1", "ok2"]
    [err] = pair.errors(b"s")
    assert err["code"] == wire.E_BAD_CHANNEL and err["ref"] == "bad3"


@pytest.mark.parametrize("opts", [{"bogus": 1}, {"ts": "a b"}, {"rt": "nope"}, [1]])
def test_bad_opts_name_the_event_and_the_rest_is_routed(pair, opts):
    pair.handle(b"s", _three_groups_with_a_bad_middle(group("/a/", ["bad4"], [b"x"], opts=opts)))
    assert [d.id for d in pair.deliveries(b"r")] == ["ok1", "ok2"]
    [err] = pair.errors(b"s")
    assert err["code"] == wire.E_BAD_EVENT and err["ref"] == "bad4"


# Column checks cover the whole message: a bad id, time, format or size refuses
# the whole SEND before anything is queued (nothing is delivered).

def _whole_message_refused(pair) -> dict:
    assert pair.deliveries(b"r") == []
    [err] = pair.errors(b"s")
    return err


@pytest.mark.parametrize("column, value", [("t", "soon"), ("t", True), ("t", None),
                                           ("f", 2), ("f", 1.0), ("f", True)])
def test_bad_time_or_format_refuses_the_message_naming_the_event(pair, column, value):
    def mutate(header):
        header[column][1] = value
    pair.handle(b"s", send_frames(group("/a/", ["ok1", "bad5"], [b"1", b"x"]), mutate=mutate))
    err = _whole_message_refused(pair)
    assert err["code"] == wire.E_BAD_EVENT and err["ref"] == "ok1" and "ok1" in err["message"]


@pytest.mark.parametrize("bad_id", ["has space", "", "tab\there", "del\x7f", "x" * 1025, 5, None])
def test_bad_event_id_refuses_the_message_quoting_it(pair, bad_id):
    pair.handle(b"s", send_frames(group("/a/", ["ok1", "ok2"], [b"1", b"2"]),
                                  mutate=lambda hd: hd["i"].__setitem__(1, bad_id)))
    err = _whole_message_refused(pair)
    assert err["code"] == wire.E_BAD_EVENT
    assert "event id" in err["message"]
    if isinstance(bad_id, str) and len(bad_id) < 100:
        assert repr(bad_id) in err["message"]


def test_oversize_payload_is_too_big_naming_the_event():
    h = Harness(CONFIG.replace(max_event_bytes=100))
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/")
    h.handle(b"s", send_frames(group("/a/", ["fits", "huge"], [b"x" * 100, b"y" * 101])))
    assert h.deliveries(b"r") == []
    [err] = h.errors(b"s")
    assert err["code"] == wire.E_TOO_BIG
    assert err["ref"] == "huge" and "huge" in err["message"] and "101 bytes" in err["message"]


def test_payload_at_the_limit_is_delivered():
    h = Harness(CONFIG.replace(max_event_bytes=100))
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/")
    h.handle(b"s", send_frames(group("/a/", ["fits"], [b"x" * 100])))
    assert [d.id for d in h.deliveries(b"r")] == ["fits"]


@pytest.mark.parametrize("extra", [b"junk", b"!"])
def test_body_longer_than_the_lengths_is_a_protocol_error(pair, extra):
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"]), extra_body=extra))
    err = _whole_message_refused(pair)
    assert err["code"] == wire.E_PROTOCOL
    assert f"{1 + len(extra)} bytes" in err["message"] and "add up to 1" in err["message"]


def test_body_shorter_than_the_lengths_is_a_protocol_error(pair):
    frames = send_frames(group("/a/", ["e1", "e2"], [b"1", b"22"]))
    frames[2] = frames[2][:-1]
    pair.handle(b"s", frames)
    err = _whole_message_refused(pair)
    assert err["code"] == wire.E_PROTOCOL and "add up to 3" in err["message"]


def test_send_with_two_body_frames_is_a_protocol_error(pair):
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])) + [b"more"])
    err = _whole_message_refused(pair)
    assert err["code"] == wire.E_PROTOCOL


def test_empty_send_is_harmless(pair):
    pair.handle(b"s", send_frames())
    assert pair.messages(b"s") == [] and pair.deliveries(b"r") == []


@pytest.mark.parametrize("mutate", [
    lambda hd: hd.clear(),
    lambda hd: hd.__setitem__("g", "x"),
    lambda hd: hd.__setitem__("i", None),
    lambda hd: hd["g"].__setitem__(0, 1),
    lambda hd: hd["g"].__setitem__(0, ["/a/"]),
    lambda hd: hd["g"][0].__setitem__(3, 0),
    lambda hd: hd["g"][0].__setitem__(3, "2"),
    lambda hd: hd["g"][0].__setitem__(3, 3),          # groups count more than the columns
    lambda hd: hd["g"][0].__setitem__(3, 1),          # ... or fewer
    lambda hd: hd["l"].__setitem__(0, -1),
    lambda hd: hd["l"].__setitem__(0, 1.0),
    lambda hd: hd["t"].pop(),                          # columns of different lengths
], ids=["empty", "g-not-list", "i-not-list", "group-not-list", "group-short", "n-zero",
        "n-text", "n-too-many", "n-too-few", "negative-length", "float-length", "short-column"])
def test_structurally_broken_sends_are_answered_and_nothing_is_delivered(pair, mutate):
    pair.handle(b"s", send_frames(group("/a/", ["e1", "e2"], [b"1", b"2"]), mutate=mutate))
    err = _whole_message_refused(pair)
    assert err["code"] in (wire.E_PROTOCOL, wire.E_BAD_EVENT)


# -- access control -------------------------------------------------------------------------------

@pytest.fixture
def acl_h() -> Harness:
    acl = ACL(principals={
        "alice": Principal("alice", send=(parse("/a/"),), lease=(parse("/a/"),)),
        "ops": Principal("ops", lease=(parse("/"),)),
    })
    h = Harness(acl=acl)
    h.hello(b"alice", principal="alice")
    h.hello(b"ops", principal="ops")
    h.lease(b"ops", "all", "/")
    return h


def test_acl_allows_granted_sends(acl_h):
    acl_h.handle(b"alice", send_frames(group("/a/x/", ["e1"], [b"1"])))
    assert [d.id for d in acl_h.deliveries(b"ops")] == ["e1"]
    assert acl_h.errors(b"alice") == []


def test_acl_denied_send_names_the_channel_and_delivers_nothing(acl_h):
    acl_h.handle(b"alice", send_frames(group("/b/", ["e1", "e2"], [b"1", b"2"])))
    assert acl_h.deliveries(b"ops") == []
    [err] = acl_h.errors(b"alice")
    assert err["code"] == wire.E_DENIED
    assert err["channel"] == "/b/" and "/b/" in err["message"] and "alice" in err["message"]


def test_acl_denial_is_per_group(acl_h):
    acl_h.handle(b"alice", send_frames(group("/a/", ["ok"], [b"1"]),
                                       group("/b/", ["no"], [b"2"]),
                                       group("/a/", ["ok2"], [b"3"])))
    assert [d.id for d in acl_h.deliveries(b"ops")] == ["ok", "ok2"]
    assert [e["ref"] for e in acl_h.errors(b"alice")] == ["no"]


def test_acl_denial_is_remembered_not_re_granted(acl_h):
    for i in range(2):
        acl_h.handle(b"alice", send_frames(group("/b/", [f"e{i}"], [b"1"])))
    assert acl_h.deliveries(b"ops") == []
    assert [e["code"] for e in acl_h.errors(b"alice")] == [wire.E_DENIED] * 2


def test_acl_denied_lease_names_the_channel(acl_h):
    acl_h.handle(b"alice", wire.encode(Kind.LEASE, {"id": "l1", "channel": "/b/", "req": 9}))
    [err] = acl_h.errors(b"alice")
    assert err["code"] == wire.E_DENIED
    assert err["channel"] == "/b/" and err["ref"] == "l1" and err["req"] == 9
    assert acl_h.core.leases.get(acl_h.core.conns[b"alice"], "l1") is None


def test_acl_implicit_inbox_grants(acl_h):
    assert acl_h.lease(b"alice", "in", "/a.org/_inbox/alice/")["granted"] > 0
    acl_h.handle(b"ops", send_frames(group("/a.org/_inbox/alice/", ["reply"], [b"1"])))
    assert [d.id for d in acl_h.deliveries(b"alice")] == ["reply"]


# -- drops and output shaping ------------------------------------------------------------------------

def test_drops_are_counted_and_reported_on_the_next_deliver(pair):
    pair.full.add(b"r")
    pair.handle(b"s", send_frames(group("/a/", ["e1", "e2", "e3"], [b"1", b"2", b"3"])))
    pair.flush()
    assert pair.core.dropped == 3
    assert pair.core.conns[b"r"].dropped == 3
    pair.full.clear()
    pair.handle(b"s", send_frames(group("/a/", ["e4"], [b"4"])))
    [(meta, rest)] = pair.messages(b"r", Kind.DELIVER)
    assert meta["d"] == 3
    assert [d.id for d in unpack_deliver(meta, rest)] == ["e4"]
    pair.handle(b"s", send_frames(group("/a/", ["e5"], [b"5"])))
    [(meta, _)] = pair.messages(b"r", Kind.DELIVER)
    assert "d" not in meta                    # reported once


def test_drops_are_reported_on_pong(pair):
    pair.full.add(b"r")
    pair.handle(b"s", send_frames(group("/a/", ["e1", "e2"], [b"1", b"2"])))
    pair.flush()
    pair.full.clear()
    pair.handle(b"r", wire.encode(Kind.PING, {"req": 11}))
    assert pair.expect(b"r", Kind.PONG) == {"req": 11, "d": 2}
    pair.handle(b"r", wire.encode(Kind.PING, {"req": 12}))
    assert pair.expect(b"r", Kind.PONG) == {"req": 12}


def test_drops_accumulate_until_reported(pair):
    pair.full.add(b"r")
    for i in range(3):
        pair.handle(b"s", send_frames(group("/a/", [f"e{i}"], [b"1"])))
        pair.flush()
    pair.full.clear()
    pair.handle(b"r", wire.encode(Kind.PING, {"req": 1}))
    assert pair.expect(b"r", Kind.PONG)["d"] == 3


def test_one_deliver_per_connection_per_flush(pair):
    for i in range(5):
        pair.handle(b"s", send_frames(group("/a/", [f"e{i}"], [b"1"])))
    msgs = pair.messages(b"r", Kind.DELIVER)
    assert len(msgs) == 1
    assert [d.id for d in unpack_deliver(*msgs[0])] == [f"e{i}" for i in range(5)]


def test_deliver_is_cut_at_deliver_bytes():
    h = Harness(CONFIG.replace(deliver_bytes=100))
    h.hello(b"s")
    h.hello(b"r")
    h.lease(b"r", "l", "/")
    sizes = [30, 30, 30, 30, 250, 60, 60, 10]
    for k, size in enumerate(sizes):          # one SEND (one segment) per event
        h.handle(b"s", send_frames(group("/a/", [f"e{k}"], [bytes([65 + k]) * size])))
    msgs = h.messages(b"r", Kind.DELIVER)
    bodies = [sum(len(seg[3]) for seg in segments(*m)) for m in msgs]
    assert bodies == [90, 30, 250, 60, 70]    # each <= 100 unless one segment is bigger
    got = [d for m in msgs for d in unpack_deliver(*m)]
    assert [d.id for d in got] == [f"e{k}" for k in range(len(sizes))]
    assert [len(d.payload) for d in got] == sizes


def test_a_deliver_carries_a_bounded_number_of_segments(pair):
    for k in range(300):
        pair.handle(b"s", send_frames(group("/a/", [f"e{k}"], [b"1"])))
    msgs = pair.messages(b"r", Kind.DELIVER)
    assert len(msgs) == 2
    assert [len(meta["s"]) for meta, _ in msgs] == [256, 44]
    got = [d.id for m in msgs for d in unpack_deliver(*m)]
    assert got == [f"e{k}" for k in range(300)]


def test_control_replies_survive_a_full_queue(pair):
    pair.full.add(b"r")
    pair.handle(b"r", wire.encode(Kind.PING, {"req": 1}))
    assert pair.messages(b"r") == []           # could not be sent this turn
    pair.full.clear()
    assert pair.expect(b"r", Kind.PONG) == {"req": 1}


def test_a_new_lease_is_seen_by_the_next_send_to_a_known_channel(pair):
    pair.hello(b"late")
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])))
    pair.lease(b"late", "l", "/a/")
    pair.handle(b"s", send_frames(group("/a/", ["e2"], [b"2"])))
    assert [d.id for d in pair.deliveries(b"late")] == ["e2"]


def test_a_released_lease_is_not_served_from_a_cache(pair):
    pair.hello(b"x")
    pair.lease(b"x", "l", "/a/")
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])))
    pair.handle(b"x", wire.encode(Kind.UNLEASE, {"id": "l"}))
    pair.handle(b"s", send_frames(group("/a/", ["e2"], [b"2"])))
    assert [d.id for d in pair.deliveries(b"x")] == ["e1"]


def test_a_renewal_changing_the_type_filter_takes_effect(pair):
    pair.hello(b"x")
    pair.lease(b"x", "l", "/a/", typ="hb")
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"], typ="load")))
    pair.lease(b"x", "l", "/a/", typ="load")
    pair.handle(b"s", send_frames(group("/a/", ["e2"], [b"2"], typ="load")))
    assert [d.id for d in pair.deliveries(b"x")] == ["e2"]


def test_an_expired_lease_is_not_served_from_a_cache(pair):
    pair.hello(b"x")
    pair.lease(b"x", "l", "/a/", duration=5)
    pair.handle(b"s", send_frames(group("/a/", ["e1"], [b"1"])))
    pair.core.tick(5.0)
    pair.handle(b"s", send_frames(group("/a/", ["e2"], [b"2"])), now=5.0)
    assert [d.id for d in pair.deliveries(b"x")] == ["e1"]


# -- stats ------------------------------------------------------------------------------------------

def test_stats_counts_connections_leases_events_and_drops(pair):
    pair.hello(b"r2")
    pair.lease(b"r2", "l", "/a/")
    pair.full.add(b"r2")
    pair.handle(b"s", send_frames(group("/a/", ["e1", "e2"], [b"1", b"2"]),
                                  group("/zz/", ["e3"], [b"3"])))
    pair.flush()
    st = pair.core.stats(10.0)
    assert st["router"] == "r1" and st["authority"] == "psepr.local"
    assert st["connections"] == 3 and st["leases"] == 2
    assert st["events_in"] == 3
    assert st["events_out"] == 5                 # r: 3, r2: 2 (dropped, still routed)
    assert st["dropped"] == 2
    assert st["slow_connections"] == [{"principal": "svc", "instance": "r2", "dropped": 2}]
    assert st["uptime"] == 10.0
    assert st["queued_events"] == 0


def test_stats_request_is_answered(pair):
    pair.handle(b"s", wire.encode(Kind.STATS, {"req": 3}))
    reply = pair.expect(b"s", Kind.STATS_REPLY)
    assert reply["req"] == 3 and reply["stats"]["connections"] == 2


def test_publish_stats_routes_a_stats_event_to_its_channel(h):
    h.hello(b"watcher")
    h.hello(b"elsewhere")
    h.lease(b"watcher", "st", "/psepr.local/_sys/routers/r1/stats/")
    h.lease(b"elsewhere", "x", "/psepr.local/_sys/routers/r2/")
    h.core.publish_stats(1.0)
    [d] = h.deliveries(b"watcher")
    assert d.channel == "/psepr.local/_sys/routers/r1/stats/"
    assert d.type == STATS_TYPE and d.fmt == wire.FMT_JSON
    assert (d.fsvc, d.finst) == (ROUTER_SERVICE, "r1")
    stats = orjson.loads(d.payload)
    assert stats["router"] == "r1" and stats["connections"] == 2 and stats["leases"] == 2
    assert h.deliveries(b"elsewhere") == []


def test_tick_publishes_stats_every_interval(h):
    h.hello(b"watcher")
    h.lease(b"watcher", "st", "/psepr.local/_sys/", duration=3600)
    h.handle(b"watcher", wire.encode(Kind.PING, {}), now=4.0)
    h.messages(b"watcher")
    h.core.tick(4.9)
    assert h.deliveries(b"watcher") == []
    h.core.tick(5.0)
    h.handle(b"watcher", wire.encode(Kind.PING, {}), now=9.0)
    h.core.tick(9.0)
    assert len(h.deliveries(b"watcher")) == 1
    h.core.tick(10.0)
    [d] = h.deliveries(b"watcher")
    assert d.id == "r1.stats.2"
