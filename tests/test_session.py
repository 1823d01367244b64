"""The client session core (pure: no sockets, time passed in): lone-send packing, the
handshake across sockets (a late WELCOME, resuming a session by its token), and how
delivered events are filed into lease queues (the shells' shared filing)."""

from __future__ import annotations

import threading

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psepr
from psepr import wire
from psepr._base import ConnectionBase, LeaseBase
from psepr.channel import parse
from psepr.config import ClientConfig
from psepr.errors import EventError
from psepr.event import MAX_JSON_DEPTH
from psepr.session import CONNECTING, READY, Session, make_entry
from psepr.wire import Kind
from tests.strategies import json_values

SEND = wire.KIND_BYTES[Kind.SEND]


class _Sink:
    def __getattr__(self, name):
        return lambda *a, **k: None


def _session(state=READY) -> Session:
    s = Session(ClientConfig(), ["inproc://none"], _Sink(), 0.0)
    s.state = state
    s.take_out(0.0)          # whatever the session queued at start (its HELLO)
    return s


def _ids(messages) -> list:
    return [orjson.loads(m[1])["i"] for m in messages if m[0] == SEND]


def test_a_lone_send_is_one_send_message_like_the_general_path():
    item = make_entry("/a/b/", {"x": 1}, id="e1")
    general = _session()
    general.add_events([item])
    assert _session().take_out_with(item, 0.0) == general.take_out(0.0)
    assert _ids(_session().take_out_with(item, 0.0)) == [["e1"]]


def test_a_lone_send_keeps_its_place_behind_waiting_events_and_control():
    s = _session()
    s.add_events([make_entry("/a/", 1, id="e1")])
    req = s.ping()                               # a flush barrier behind e1
    out = s.take_out_with(make_entry("/a/", 2, id="e2"), 0.0)
    kinds = [m[0] for m in out]
    assert kinds == [SEND, wire.KIND_BYTES[Kind.PING], SEND], kinds
    assert _ids(out) == [["e1"], ["e2"]]
    assert orjson.loads(out[1][1])["req"] == req


def test_a_lone_send_before_welcome_waits():
    s = _session(CONNECTING)
    assert s.take_out_with(make_entry("/a/", 1, id="e1"), 0.0) == []
    assert s.queued == 1


def _hello(messages) -> dict:
    """The header of the one HELLO among ``messages``."""
    hello = [m for m in messages if m[0] == wire.KIND_BYTES[Kind.HELLO]]
    assert len(hello) == 1, messages
    return orjson.loads(hello[0][1])


def _hello_req(messages) -> int:
    return _hello(messages)["req"]


def _welcome(req: int, session: str | None = None) -> list:
    return wire.encode(Kind.WELCOME, {"v": wire.PROTOCOL_VERSION, "router": "r",
                                      "authority": "a", "principal": "p", "instance": "i",
                                      "req": req, "session": session})


def test_a_router_that_answers_during_the_back_off_is_kept():
    # A socket given up on ("no WELCOME within connect_timeout") stays open through
    # the back-off.  If its router comes up then and welcomes the HELLO, the session
    # must stay on it: opening a new socket later would close this one while events
    # already flow to it, and those in flight would be lost (seen after a restart).
    s = Session(ClientConfig(connect_timeout=1.0), ["tcp://a:1", "tcp://b:1"], _Sink(), 0.0)
    assert s.take_switch() == "tcp://a:1"
    s.start(0.0)
    s.lease("L1", parse("/x/"), None, 60.0, 0.0)
    req = _hello_req(s.take_out(0.0))
    s.tick(1.5)                                   # no WELCOME from a: give up on it
    assert s.router == "tcp://b:1" and s.state == CONNECTING
    s.on_message(_welcome(req), 1.6)              # ...but a answers on the old socket
    assert s.state == READY and s.router == "tcp://a:1"
    leases = [orjson.loads(m[1]) for m in s.take_out(1.6)
              if m[0] == wire.KIND_BYTES[Kind.LEASE]]
    assert [h["id"] for h in leases] == ["L1"]    # re-registered on the socket that stays
    for t in (1.7, 3.0, 10.0):                    # the back-off ends: no new socket
        s.tick(t)
        assert s.take_switch() is None


def test_a_welcome_to_a_hello_given_up_on_is_ignored_once_a_new_socket_said_hello():
    s = Session(ClientConfig(connect_timeout=1.0), ["tcp://a:1", "tcp://b:1"], _Sink(), 0.0)
    s.take_switch()
    s.start(0.0)
    old = _hello_req(s.take_out(0.0))
    s.tick(1.5)                                   # give up on a; b's turn comes at once
    s.tick(1.5)
    assert s.take_switch() == "tcp://b:1"
    s.start(1.5)
    new = _hello_req(s.take_out(1.5))
    s.on_message(_welcome(old), 1.6)              # a late answer on the closed socket
    assert s.state == CONNECTING and s.router == "tcp://b:1"
    s.on_message(_welcome(new), 1.7)
    assert s.state == READY and s.router == "tcp://b:1"


def test_a_hello_back_to_the_same_router_names_the_session_it_had():
    s = Session(ClientConfig(connect_timeout=1.0, dead_after=1.0), ["tcp://a:1", "tcp://b:1"],
                _Sink(), 0.0)
    s.take_switch()
    s.start(0.0)
    assert "resume" not in _hello(s.take_out(0.0))
    s.on_message(_welcome(s._hello_req, session="t-a"), 0.1)
    s.tick(2.0)                                   # silent: give up on a, on to b
    s.tick(2.0)
    assert s.take_switch() == "tcp://b:1"
    s.start(2.0)
    assert "resume" not in _hello(s.take_out(2.0))   # b never knew our session
    s.tick(3.5)                                   # no WELCOME from b: back to a
    s.tick(10.0)
    assert s.take_switch() == "tcp://a:1"
    s.start(10.0)
    assert _hello(s.take_out(10.0))["resume"] == "t-a"


# -- filing delivered events into lease queues ----------------------------------------------

class _Filer(ConnectionBase):
    """The shells' shared filing (ConnectionBase._file) over plain lease handles."""

    def __init__(self, config: ClientConfig, lease_ids: list) -> None:
        self.config = config
        self._init_arrivals()
        self._leases = {lid: LeaseBase(self, lid, parse("/t/"), None, threading.Event())
                        for lid in lease_ids}

    def deliver(self, batches) -> None:
        self._file(batches)

    def overflow(self, lids, n) -> None:
        pass

    def walk(self) -> list:
        """What con.receive() would return, in order: (payload, lease id) pairs."""
        out = []
        while self._arrivals:
            lease = self._arrivals.popleft()
            if lease._q:
                out.append((lease._q.popleft().payload, lease.id))
        return out


def _deliver_to(leases: dict, sends: list, config: ClientConfig | None = None) -> _Filer:
    """Feed one DELIVER holding ``sends`` ((channel, payload), in order) to a session
    holding ``leases`` (id -> channel), filed by the shells' filing code."""
    config = config or ClientConfig()
    filer = _Filer(config, list(leases))
    s = Session(config, ["inproc://none"], filer, 0.0)
    s.state = READY
    for lid, ch in leases.items():
        s.lease(lid, parse(ch), None, 60.0, 0.0)
    _kind, header, body = wire.encode_send([make_entry(ch, p) for ch, p in sends])
    s.on_message([wire.KIND_BYTES[Kind.DELIVER], orjson.dumps({"s": [["svc", "i-1"]]}),
                  header, body], 0.0)
    return filer


LEASES = {"La": "/t/a/", "Lb": "/t/b/", "Lc": "/t/c/", "Lall": "/t/"}


@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 600, 1024])
def test_a_received_json_payload_nested_too_deep_is_refused_by_name(levels):
    # orjson reads up to 1,024 levels but writes at most 254: such a payload (from a
    # client that is not the SDK) could not be printed, stored or sent on.
    config = ClientConfig()
    filer = _Filer(config, ["L"])
    s = Session(config, ["inproc://none"], filer, 0.0)
    s.state = READY
    s.lease("L", parse("/t/"), None, 60.0, 0.0)
    ok = orjson.dumps(orjson.loads(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH))
    deep = b"[" * levels + b"]" * levels
    entries = [(f"e{k}", "/t/", None, 1.0, wire.FMT_JSON, None, p)
               for k, p in enumerate((ok, deep, b'{"after":1}'))]
    _kind, header, body = wire.encode_send(entries)
    s.on_message([wire.KIND_BYTES[Kind.DELIVER], orjson.dumps({"s": [["svc", "i-1"]]}),
                  header, body], 0.0)
    first, bad, after = filer._leases["L"]._q
    assert orjson.loads(first.to_json())["payload"] == first.payload     # prints
    with pytest.raises(EventError, match=f"event e1: JSON payload nested more than "
                                         f"{MAX_JSON_DEPTH} levels"):
        bad.payload
    assert after.payload == {"after": 1}


def test_the_sdk_refuses_to_send_a_json_payload_it_would_refuse_to_receive():
    nested = orjson.loads(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    for payload in (nested, [[nested]]):       # orjson writes the first, not the second
        with pytest.raises(EventError, match=f"nested more than {MAX_JSON_DEPTH} levels"):
            make_entry("/t/", payload)
    with pytest.raises(EventError, match="nested more than"):
        psepr.from_json({"to": {"channel": "/t/"}, "payload": nested})


def test_one_event_groups_for_differing_leases_are_filed_in_order():
    # Groups a, b, c x3, a, d, b x2, a: one-event groups for differing leases share
    # a mixed batch; the three c's are one batch for (Lc, Lall).
    sends = [("/t/a/", 1), ("/t/b/", 2), ("/t/c/", 3), ("/t/c/", 4), ("/t/c/", 5),
             ("/t/a/", 6), ("/t/d/", 7), ("/t/b/", 8), ("/t/b/", 9), ("/t/a/", 10)]
    filer = _deliver_to(LEASES, sends)
    queues = {lid: [e.payload for e in lease._q] for lid, lease in filer._leases.items()}
    assert queues == {"La": [1, 6, 10], "Lb": [2, 8, 9], "Lc": [3, 4, 5],
                      "Lall": list(range(1, 11))}
    got = filer.walk()
    assert sorted(got) == sorted((p, lid) for lid, ps in queues.items() for p in ps)
    # Arrival order: every event comes before any later one, except inside a
    # multi-event batch, where one lease's events come before the next lease's.
    assert [p for p, _ in got] == [1, 1, 2, 2, 3, 4, 5, 3, 4, 5, 6, 6, 7,
                                   8, 9, 8, 9, 10, 10]


def test_one_event_groups_to_a_full_lease_keep_what_fits_and_count_the_rest():
    sends = [("/t/a/", 1), ("/t/b/", 2), ("/t/a/", 3), ("/t/b/", 4), ("/t/a/", 5),
             ("/t/a/", 6)]
    filer = _deliver_to(LEASES, sends, ClientConfig(lease_queue=3))
    leases = filer._leases
    assert [e.payload for e in leases["La"]._q] == [1, 3, 5]
    assert [e.payload for e in leases["Lall"]._q] == [1, 2, 3]
    assert [e.payload for e in leases["Lb"]._q] == [2, 4]
    assert (leases["La"].dropped, leases["Lall"].dropped, leases["Lb"].dropped) == (1, 3, 0)
    assert filer.full_ids == {"La", "Lall"}
    assert len(filer.walk()) == 8


LEASE = wire.KIND_BYTES[Kind.LEASE]


def _leased(messages) -> list:
    """The lease ids of the LEASE requests among ``messages``."""
    return [orjson.loads(m[1])["id"] for m in messages if m[0] == LEASE]


def test_lease_requests_beyond_the_window_wait_for_answers():
    # A router drops control replies beyond a backlog per connection, so a burst of
    # LEASEs goes out a window at a time; answers (grants, refusals) let more in.
    s = Session(ClientConfig(lease_window=3), ["inproc://none"], _Sink(), 0.0)
    s.take_switch()
    s.start(0.0)
    s.on_message(_welcome(_hello_req(s.take_out(0.0))), 0.0)
    for i in range(5):
        s.lease(f"L{i}", parse(f"/a/c{i}/"), None, 60.0, 0.0)
    assert _leased(s.take_out(0.0)) == ["L0", "L1", "L2"]
    s.on_message(wire.encode(Kind.LEASED, {"id": "L1", "channel": "/a/c1/", "granted": 60.0}),
                 0.1)
    assert _leased(s.take_out(0.1)) == ["L3"]
    s.on_message(wire.encode(Kind.ERROR, {"code": "denied", "message": "no", "ref": "L0"}), 0.2)
    assert "L0" not in s.leases
    assert _leased(s.take_out(0.2)) == ["L4"]
    assert _leased(s.take_out(0.3)) == []
    # Unanswered after renew_retry: asked again, in their places (no more than 3 out).
    s.tick(0.2 + s.config.renew_retry)
    assert sorted(_leased(s.take_out(1.5))) == ["L2", "L3", "L4"]
    # A new socket: every lease is asked again on WELCOME, a window at a time, and
    # nothing queued for the old socket goes twice.
    s.lease("L5", parse("/a/c5/"), None, 60.0, 1.5)
    s.start(2.0)
    out = s.take_out(2.0)
    assert _leased(out) == []
    s.on_message(_welcome(_hello_req(out)), 2.0)
    assert _leased(s.take_out(2.0)) == ["L1", "L2", "L3"]
    for lid in ("L1", "L2"):
        s.on_message(wire.encode(Kind.LEASED, {"id": lid, "channel": "/a/", "granted": 60.0}),
                     2.1)
    assert _leased(s.take_out(2.1)) == ["L4", "L5"]


class _Heard(_Sink):
    """A sink that records what the session told it."""

    def __init__(self) -> None:
        self.heard: list = []

    def __getattr__(self, name):
        return lambda *a, **k: self.heard.append((name, a))


def test_a_refused_hello_is_remembered_for_the_connect_error_not_raised_later():
    sink = _Heard()
    s = Session(ClientConfig(), ["tcp://127.0.0.1:1"], sink, 0.0)
    s.start(0.0)
    req = _hello(s.take_out(0.0))["req"]
    s.on_message(wire.encode(Kind.ERROR, {"code": wire.E_PROTOCOL, "message": "a peer endpoint"}),
                 0.1)
    assert s.refusal == "tcp://127.0.0.1:1 answered: a peer endpoint"
    assert s.state == CONNECTING and sink.heard == []     # no error for a later flush()
    # One that names another request (from before a lost session) still reaches it.
    s.on_message(wire.encode(Kind.ERROR, {"code": wire.E_VERSION, "message": "v9",
                                          "req": req}), 0.2)
    assert s.refusal.endswith("v9")
    s.on_message(wire.encode(Kind.ERROR, {"code": wire.E_DENIED, "message": "no",
                                          "req": req + 100}), 0.3)
    assert [name for name, _ in sink.heard] == ["async_error"]


def test_a_refused_hello_moves_to_the_next_router_at_once():
    # It waited connect_timeout (2 s) for a WELCOME that a refusing router never sends.
    s = Session(ClientConfig(connect_timeout=2.0), ["tcp://a:1", "tcp://b:1"], _Heard(), 0.0)
    assert s.take_switch() == "tcp://a:1"
    s.start(0.0)
    s.take_out(0.0)
    s.on_message(wire.encode(Kind.ERROR, {"code": wire.E_PROTOCOL, "message": "a peer endpoint"}),
                 0.1)
    s.on_message(wire.encode(Kind.ERROR, {"code": wire.E_PROTOCOL, "message": "again"}), 0.1)
    s.tick(0.1)
    assert s.take_switch() == "tcp://b:1" and s.reconnects == 1
    s.start(0.1)
    s.on_message(_welcome(_hello_req(s.take_out(0.1))), 0.2)
    assert s.state == READY and s.router == "tcp://b:1"



def test_a_failed_handshake_is_remembered_and_moves_to_the_next_router_once():
    s = Session(ClientConfig(connect_timeout=2.0), ["tcp://a:1", "tcp://b:1"], _Heard(), 0.0)
    s.take_switch()
    s.start(0.0)
    s.take_out(0.0)
    s.handshake_failed(0.1, "the router refused this client's CURVE key")
    s.disconnected(0.1)                   # the close that follows moves nothing further
    assert s.refusal == "tcp://a:1: the router refused this client's CURVE key"
    s.tick(0.1)
    assert s.take_switch() == "tcp://b:1" and s.reconnects == 1


def _kinds(messages, kind: Kind) -> list:
    return [orjson.loads(m[1]) for m in messages if m[0] == wire.KIND_BYTES[kind]]


def test_an_abandoned_lease_is_released_if_asked_and_never_heard_of_again():
    # lease() timed out or its task was cancelled: the caller was told it failed, so
    # it must not be granted later, renewed and filled behind their back.
    sink = _Heard()
    s = Session(ClientConfig(lease_window=1), ["inproc://none"], sink, 0.0)
    s.take_switch()
    s.start(0.0)
    s.on_message(_welcome(_hello_req(s.take_out(0.0))), 0.0)
    s.lease("L1", parse("/a/one/"), None, 60.0, 0.0)
    s.lease("L2", parse("/a/two/"), None, 60.0, 0.0)
    assert _leased(s.take_out(0.0)) == ["L1"]            # L2 waits for room in the window
    s.abandon("L1")                                      # its LEASE went out: undo it
    s.abandon("L2")                                      # never asked: nothing to undo
    s.abandon("L9")                                      # unknown: nothing at all
    out = s.take_out(0.1)
    assert _kinds(out, Kind.UNLEASE) == [{"id": "L1"}]
    assert _leased(out) == []
    assert s.leases == {}
    # The router's late answers (the grant, then the release) reach nobody; the
    # lease is not renewed, and a delivery on its channel files nowhere.
    del sink.heard[:]
    s.on_message(wire.encode(Kind.LEASED, {"id": "L1", "channel": "/a/one/", "granted": 60.0}),
                 0.2)
    s.on_message(wire.encode(Kind.UNLEASED, {"id": "L1", "req": None}), 0.2)
    later = 0.2 + s.config.renew_retry      # when an unanswered LEASE is asked again
    s.tick(later)
    assert _leased(s.take_out(later)) == []
    assert sink.heard == [], sink.heard
    # Refused instead (an ERROR naming it, then unknown-lease for the UNLEASE):
    # nothing surfaces as an error of the connection either.
    s.lease("L3", parse("/a/three/"), None, 60.0, later)
    assert _leased(s.take_out(later)) == ["L3"]
    s.abandon("L3")
    assert _kinds(s.take_out(later), Kind.UNLEASE) == [{"id": "L3"}]
    s.on_message(wire.encode(Kind.ERROR, {"code": "denied", "message": "no", "ref": "L3"}), later)
    s.on_message(wire.encode(Kind.ERROR, {"code": "unknown-lease", "message": "no lease",
                                          "ref": "L3"}), later)
    assert sink.heard == [], sink.heard
    # Once ended, the id is an ordinary one again: an error naming it is heard.
    s.on_message(wire.encode(Kind.ERROR, {"code": "unknown-lease", "message": "no lease",
                                          "ref": "L3"}), later)
    assert [name for name, _ in sink.heard] == ["async_error"]


def test_an_abandoned_granted_lease_is_released_but_a_lease_before_welcome_just_goes():
    s = _session()
    s.lease("L1", parse("/a/"), None, 60.0, 0.0)
    assert _leased(s.take_out(0.0)) == ["L1"]
    s.on_message(wire.encode(Kind.LEASED, {"id": "L1", "channel": "/a/", "granted": 60.0}), 0.1)
    s.abandon("L1")          # granted just as its caller gave up
    assert _kinds(s.take_out(0.1), Kind.UNLEASE) == [{"id": "L1"}]
    c = _session(CONNECTING)
    c.lease("L1", parse("/a/"), None, 60.0, 0.0)
    c.abandon("L1")
    assert c.take_out(0.0) == [] and c.leases == {}


def test_a_forgotten_request_s_late_answer_reaches_nobody():
    # flush()/stats() timed out (or the task was cancelled): the shell forgets the
    # request, so its answer neither waits in the shell forever nor becomes an error.
    sink = _Heard()
    s = Session(ClientConfig(), ["inproc://none"], sink, 0.0)
    s.state = READY
    ping, stats, kept = s.ping(), s.stats(), s.stats()
    s.forget(ping)
    s.forget(stats)
    s.forget(12345)                      # never asked: nothing to forget
    s.on_message(wire.encode(Kind.PONG, {"req": ping}), 1.0)
    s.on_message(wire.encode(Kind.ERROR, {"code": "protocol", "message": "late",
                                          "req": stats}), 1.0)
    assert sink.heard == [], sink.heard
    s.on_message(wire.encode(Kind.STATS_REPLY, {"req": kept, "stats": {"leases": 0}}), 1.0)
    assert sink.heard == [("completed", (kept, {"leases": 0}, None))]


class _FuzzFiler(_Filer):
    """The shells' filing, and every other report of the session ignored."""

    def __getattr__(self, name):
        return lambda *a, **k: None


_VALUES = json_values(["L1", "/t/", "/t/x/", "json", "svc"], max_leaves=12)
#: Every key some router message carries, so that handlers get past their first look-up.
_ROUTER_KEYS = ["v", "router", "authority", "principal", "instance", "req", "id", "channel",
                "granted", "code", "message", "ref", "s", "d", "stats", "status", "resumed",
                "session", "propagated", "missing"]
_SEND_KEYS = ["g", "i", "t", "f", "l"]


@st.composite
def _segment(draw) -> tuple[bytes, bytes]:
    """A DELIVER segment: a well-formed SEND header and body, then maybe one column or
    the body replaced by something of random shape."""
    n = draw(st.integers(1, 3))
    entries = [make_entry(draw(st.sampled_from(["/t/", "/t/x/", "/u/"])), k) for k in range(n)]
    _kind, header, body = wire.encode_send(entries)
    what = draw(st.sampled_from(["none", "column", "body"]))
    if what == "column":
        h = orjson.loads(header)
        h[draw(st.sampled_from(_SEND_KEYS))] = draw(_VALUES)
        header = orjson.dumps(h)
    elif what == "body":
        body = draw(st.binary(max_size=12))
    return header, body


@st.composite
def _deliver(draw) -> tuple:
    """A DELIVER of well-formed-but-one-part segments; its sender list mostly fits."""
    segs = draw(st.lists(_segment(), max_size=3))
    senders = draw(st.one_of(
        st.lists(st.tuples(st.text(max_size=4), st.text(max_size=4)),
                 min_size=len(segs), max_size=len(segs)), _VALUES))
    return int(Kind.DELIVER), {"s": senders}, [f for seg in segs for f in seg]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(msgs=st.lists(st.one_of(
    st.tuples(st.integers(0, 30), st.dictionaries(st.sampled_from(_ROUTER_KEYS), _VALUES,
                                                  max_size=8),
              st.lists(st.binary(max_size=20), max_size=4)),
    _deliver()), min_size=1, max_size=6))
def test_random_router_messages_never_raise_out_of_the_session(msgs):
    # A buggy or hostile router: every kind with headers of random shape, and
    # DELIVERs whose segments are well formed but for one column or the body.  The
    # session refuses what it cannot use (a warning) and never raises into the
    # shell's I/O thread, which would take the connection down with it.
    filer = _FuzzFiler(ClientConfig(), ["L1"])
    s = filer._session = Session(ClientConfig(), ["inproc://none"], filer, 0.0)
    filer._errors, filer.dropped_by_router = [], 0
    s.state = READY
    s.lease("L1", parse("/t/"), None, 60.0, 0.0)
    s.ping()
    s.stats()
    s.take_out(0.0)
    for kind, header, rest in msgs:
        s.on_message([bytes([kind]), orjson.dumps(header), *rest], 1.0)
        s.tick(2.0)
        s.take_out(2.0)
    # What was filed is whole events (a payload that is not JSON raises EventError
    # when read, naming the event: the caller's to handle, not the I/O thread's).
    for lease in filer._arrivals:
        assert all(ev.channel.text.startswith("/t/") for ev in lease._q)


def test_handshake_failures_are_worded_by_cause():
    import zmq

    from psepr._common import handshake_failure
    assert "ZAP status 400" in handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_AUTH, 400, True)
    assert "disagree on CURVE" in handshake_failure(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, False)
    assert "protocol error 0x10000001" in handshake_failure(
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, 0x10000001, True)
    assert handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, True) == (
        "the CURVE handshake failed (Broken pipe): is --server-key this router's public key, "
        "and this client's key in its ACL?")
    assert handshake_failure(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, 32, False) == (
        "the ZeroMQ handshake failed (Broken pipe): a --curve router needs --key and --server-key")
    assert handshake_failure(zmq.EVENT_DISCONNECTED, 12, True) is None
