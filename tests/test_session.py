"""The client session core's send packing (pure: no sockets, time passed in)."""

from __future__ import annotations

import orjson

from psepr import wire
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
