"""The client session core (pure: no sockets, time passed in): lone-send packing, and
the handshake across sockets (a late WELCOME, resuming a session by its token)."""

from __future__ import annotations

import orjson

from psepr import wire
from psepr.channel import parse
from psepr.config import ClientConfig
from psepr.session import CONNECTING, READY, Session, make_entry
from psepr.wire import Kind

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
