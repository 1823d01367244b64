"""Bad input never kills a router (issue 2, acceptance 7), against a live router process.

Hypothesis throws garbage at one real router through raw ZeroMQ DEALER sockets:
random frames, truncated messages, unknown kinds, valid kinds with garbage
headers, SEND batches with invalid channels, malformed groups, oversize events
and wrong body lengths, and session messages without HELLO.  After every
example these tests prove that:

* the router process is alive and has processed everything (a sentinel PING
  sent after the garbage is answered);
* every reply it sent the offender is a well-formed message, and it answered at
  least every message that is garbage whatever the router's state (undecodable,
  unknown kind, session kind without a session) with an ERROR (kind 12), never
  with its internal-error fallback;
* a well-behaved SDK client of the same router still gets its events.

Deterministic tests pin the error code for each kind of garbage, and show that a
message above ``max_message_bytes`` (9 MiB against the default 8 MiB) does not
kill the router.  At the end the router's log holds no traceback.
"""

from __future__ import annotations

import itertools
import threading
import uuid

import orjson
import pytest
import zmq
import zmq.utils.monitor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psepr
from psepr import wire
from psepr.wire import Kind

from routers.config import RouterConfig

from .conftest import RouterProcess

MiB = 1 << 20
ROUTER_DEFAULTS = RouterConfig()
SESSION_KINDS = {Kind.SEND, Kind.LEASE, Kind.UNLEASE, Kind.PING, Kind.BYE, Kind.STATS,
                 Kind.STATUS}
CLIENT_KINDS = SESSION_KINDS | {Kind.HELLO}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- fixtures: one router for the module, its stderr collected, one good client --------
@pytest.fixture(scope="module")
def router():
    r = RouterProcess(name="fuzz")
    log: list[str] = []

    def collect() -> None:   # also keeps the pipe from filling up and blocking the router
        try:
            for line in r.proc.stderr:
                log.append(line)
        except (ValueError, OSError):
            pass

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    r.log = log
    yield r
    alive = r.alive()
    r.stop()
    t.join(5.0)
    assert alive, "the router died"
    text = "".join(log)
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]


class Good:
    """A well-behaved SDK client that checks, one event at a time, that it is served."""

    def __init__(self, url: str) -> None:
        self.con = psepr.connect(url, service="good")
        self.lease = self.con.lease("/fuzz.example/good/", duration=600)
        self.seq = itertools.count()

    def check(self) -> None:
        n = next(self.seq)
        self.con.send("/fuzz.example/good/x/", {"n": n})
        assert self.lease.receive(timeout=5.0).payload == {"n": n}


@pytest.fixture(scope="module")
def good(router):
    g = Good(router.url)
    yield g
    g.con.close()


# -- the offender -------------------------------------------------------------------------
class Offender:
    """A raw DEALER socket; ``replies_after(messages)`` sends them and a sentinel PING."""

    def __init__(self, url: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def hello(self) -> dict:
        self.sock.send_multipart(wire.encode(Kind.HELLO, {"v": wire.PROTOCOL_VERSION,
                                                          "service": "offender"}))
        kind, h, _ = self.recv()
        assert kind == Kind.WELCOME, h
        self.instance = h["instance"]
        return h

    def recv(self, timeout: float = 5.0):
        assert self.sock.poll(int(timeout * 1000)), "the router did not answer"
        return wire.decode(self.sock.recv_multipart())

    def replies_after(self, messages: list[list[bytes]]) -> list[tuple[int, dict]]:
        """Send the messages, then a PING; return every reply before the PING's answer."""
        for frames in messages:
            self.sock.send_multipart(frames)
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        self.sock.send_multipart(wire.encode(Kind.PING, {"req": sentinel}))
        replies = []
        for _ in range(10 * len(messages) + 10):
            kind, h, _ = self.recv()          # also proves replies are well formed
            assert kind in Kind.__members__.values(), kind
            if h.get("req") == sentinel:
                # PONG, or ERROR no-session when the garbage ended (or never began) a session
                assert kind == Kind.PONG or h.get("code") == wire.E_NO_SESSION, (kind, h)
                return replies
            replies.append((kind, h))
        raise AssertionError("too many replies")

    def close(self) -> None:
        self.sock.close(linger=0)


def errors_in(replies) -> list[dict]:
    errs = [h for kind, h in replies if kind == Kind.ERROR]
    for h in errs:
        assert type(h.get("code")) is str and type(h.get("message")) is str, h
        assert "internal" not in h["message"], h
    return errs


def certain_errors(messages: list[list[bytes]], in_session: bool) -> int:
    """How many of ``messages`` must be answered with ERROR whatever else happens."""
    n = 0
    hello_seen = in_session
    for frames in messages:
        try:
            kind, _, _ = wire.decode(frames)
        except wire.ProtocolError:
            n += 1
            continue
        if kind not in CLIENT_KINDS:
            n += 1
        elif kind == Kind.HELLO:
            hello_seen = True
        elif not hello_seen:
            n += 1
    return n


def run_garbage(router, good, messages, hello_first: bool = False) -> list[dict]:
    """Throw ``messages`` at the router from a fresh socket; check the invariants."""
    off = Offender(router.url)
    try:
        if hello_first:
            off.hello()
        replies = off.replies_after(messages)
    finally:
        off.close()
    errs = errors_in(replies)
    assert len(errs) >= certain_errors(messages, hello_first), (messages, replies)
    assert router.alive()
    good.check()
    return errs


# -- strategies -----------------------------------------------------------------------------
json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
header_keys = st.sampled_from(["v", "service", "instance", "client", "id", "channel", "type",
                               "duration", "req", "g", "e", "d", "code"]) | st.text(max_size=6)
headers = st.dictionaries(header_keys, json_values, max_size=6)
frames_st = st.lists(st.binary(max_size=80), min_size=1, max_size=5)

bad_channels = st.one_of(
    st.sampled_from(["", "/", "//", "a/", "/a", "/a//b/", "/a b/", "/*/", "/a/*/", "/\x00/",
                     "/a/\tb/", "/" + "x/" * 40, "/" + "y" * 2000 + "/", "/a/\u200b\n/"]),
    st.text(max_size=30).filter(lambda s: not (s.startswith("/") and s.endswith("/"))),
    json_values.filter(lambda v: not isinstance(v, str)))
good_channel = st.sampled_from(["/fuzz.example/junk/", "/fuzz.example/junk/a/b/"])
names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                max_size=10)


@st.composite
def valid_messages(draw) -> list[bytes]:
    """A well-formed client message (to be truncated or corrupted)."""
    kind = draw(st.sampled_from([Kind.HELLO, Kind.LEASE, Kind.SEND, Kind.PING]))
    if kind == Kind.HELLO:
        return wire.encode(kind, {"v": wire.PROTOCOL_VERSION, "service": draw(names)})
    if kind == Kind.LEASE:
        return wire.encode(kind, {"id": draw(names), "channel": draw(good_channel),
                                  "duration": 10})
    if kind == Kind.PING:
        return wire.encode(kind, {"req": draw(st.integers(0, 99))})
    n = draw(st.integers(1, 4))
    return wire.encode_send([(f"e{i}", draw(good_channel), None, 1.0, 0, None, b'"abc"')
                             for i in range(n)])


@st.composite
def truncated(draw) -> list[bytes]:
    frames = list(draw(valid_messages()))
    how = draw(st.sampled_from(["drop-frame", "cut-header", "cut-body", "cut-kind"]))
    if how == "drop-frame":
        del frames[draw(st.integers(0, len(frames) - 1))]
        if not frames:
            frames = [b""]
    elif how == "cut-header":
        frames[1] = frames[1][:draw(st.integers(0, max(0, len(frames[1]) - 1)))]
    elif how == "cut-body" and len(frames) == 3:
        frames[2] = frames[2][:draw(st.integers(0, max(0, len(frames[2]) - 1)))]
    else:
        frames[0] = b""
    return frames


FLAWS = ["channel", "type", "opts", "id", "time", "fmt", "plens", "plen", "column", "group",
         "count", "header", "body", "frames", "empty"]


@st.composite
def send_batches(draw) -> list[bytes]:
    """A SEND of plausible groups, some fields random, with at least one certain flaw."""
    groups, ids, times, fmts, plens = [], [], [], [], []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 3))
        g = [draw(good_channel), None, None, n]
        if draw(st.booleans()):     # random, possibly valid, variations
            g[1] = draw(names | json_values)
        if draw(st.booleans()):
            g[2] = draw(st.dictionaries(st.sampled_from(["ts", "ti", "rt", "re", "zz"]),
                                        json_values, max_size=3))
        groups.append(g)
        for _ in range(n):
            ids.append(f"e{len(ids)}")
            times.append(1.0)
            fmts.append(0)
            plens.append(draw(st.integers(0, 8)))
    header = {"g": groups, "i": ids, "t": times, "f": fmts, "l": plens}
    body = b"x" * sum(plens)
    extra: list[bytes] = []
    flaw = draw(st.sampled_from(FLAWS))
    g = draw(st.sampled_from(groups))
    k = draw(st.integers(0, len(ids) - 1))
    if flaw == "channel":
        g[0] = draw(bad_channels)
    elif flaw == "type":
        g[1] = draw(st.sampled_from(["", "a b", "x\x00", "t" * 2000])
                    | st.lists(json_values, min_size=1) | st.dictionaries(st.text(), json_values))
    elif flaw == "opts":
        g[2] = draw(st.sampled_from([{"zz": 1}, {"rt": "nope"}, {"ts": "a b"}, [], "x", 3]))
    elif flaw == "id":
        ids[k] = draw(st.sampled_from(["", "a b", "\x7f", "i" * 1025])
                      | json_values.filter(lambda v: not isinstance(v, str)))
    elif flaw == "time":
        times[k] = draw(st.sampled_from(["1", None, True, [1], {}]))
    elif flaw == "fmt":
        fmts[k] = draw(st.sampled_from([2, -1, "0", None, [0], {}, 0.5]))
    elif flaw == "plens":
        header["l"] = draw(json_values.filter(lambda v: not isinstance(v, list)))
    elif flaw == "plen":
        plens[k] = draw(st.sampled_from([-1, 2 ** 40, 1.5, "3", None, [1]]))
    elif flaw == "column":
        del header[draw(st.sampled_from("itfl"))][k]
    elif flaw == "group":
        groups[groups.index(g)] = draw(
            st.lists(json_values, max_size=8).filter(lambda v: len(v) != 4)
            | json_values.filter(lambda v: not isinstance(v, list)))
    elif flaw == "count":
        g[3] = draw(st.sampled_from([0, -1, "1", 1.0, None, g[3] + 1, [1]]
                                    + ([g[3] - 1] if g[3] > 1 else [])))
    elif flaw == "header":
        key = draw(st.sampled_from("gitfl"))
        if draw(st.booleans()):
            del header[key]
        else:
            header[key] = draw(json_values.filter(lambda v: not isinstance(v, list)))
    elif flaw == "body":
        cut = draw(st.integers(-len(body), 6).filter(lambda d: d != 0))
        body = body + b"y" * cut if cut > 0 else body[:cut]
    elif flaw == "frames":
        extra = [draw(st.binary(max_size=6))]
    else:
        header.update(g=[], i=[], t=[], f=[], l=[])
        body = draw(st.binary(min_size=1, max_size=6))
    return [bytes([Kind.SEND]), orjson.dumps(header), body, *extra]


# -- hypothesis: random garbage --------------------------------------------------------------
@FUZZ
@given(messages=st.lists(frames_st, min_size=1, max_size=6), hello_first=st.booleans())
def test_random_frames(router, good, messages, hello_first):
    run_garbage(router, good, messages, hello_first)


@FUZZ
@given(messages=st.lists(truncated(), min_size=1, max_size=4), hello_first=st.booleans())
def test_truncated_messages(router, good, messages, hello_first):
    run_garbage(router, good, messages, hello_first)


@FUZZ
@given(kinds=st.lists(st.integers(0, 255).filter(lambda k: k not in CLIENT_KINDS), min_size=1,
                      max_size=5),
       header=headers, hello_first=st.booleans())
def test_unknown_kinds(router, good, kinds, header, hello_first):
    messages = [[bytes([k]), orjson.dumps(header)] for k in kinds]
    errs = run_garbage(router, good, messages, hello_first)
    assert [e["code"] for e in errs] == [wire.E_PROTOCOL] * len(kinds)


@pytest.mark.slow
@FUZZ
@given(messages=st.lists(st.tuples(st.sampled_from(sorted(Kind)), headers,
                                   st.none() | st.binary(max_size=20)), min_size=1, max_size=5),
       hello_first=st.booleans())
def test_valid_kinds_with_garbage_headers(router, good, messages, hello_first):
    run_garbage(router, good, [wire.encode(k, h, b) for k, h, b in messages], hello_first)


@pytest.mark.slow
@FUZZ
@given(messages=st.lists(send_batches(), min_size=1, max_size=4))
def test_malformed_send_batches(router, good, messages):
    errs = run_garbage(router, good, messages, hello_first=True)
    assert len(errs) >= len(messages), "each of these batches is broken somewhere"


@pytest.mark.slow
@FUZZ
@given(messages=st.lists(st.tuples(st.sampled_from(sorted(SESSION_KINDS)), headers,
                                   st.none() | st.binary(max_size=20)), min_size=1, max_size=5))
def test_session_messages_without_hello(router, good, messages):
    errs = run_garbage(router, good, [wire.encode(k, h, b) for k, h, b in messages])
    assert [e["code"] for e in errs] == [wire.E_NO_SESSION] * len(messages)


@settings(max_examples=5, deadline=None)
@given(size=st.integers(1, 64 << 10), small=st.integers(0, 3))
def test_oversize_events(router, good, size, small):
    """An event above max_event_bytes (in a message below max_message_bytes) is refused."""
    assert ROUTER_DEFAULTS.max_event_bytes + size + 64 < ROUTER_DEFAULTS.max_message_bytes
    items = [(f"s{i}", "/fuzz.example/junk/", None, 1.0, 0, None, b"1") for i in range(small)]
    items.append(("big", "/fuzz.example/junk/", None, 1.0, 0, None,
                  b"x" * (ROUTER_DEFAULTS.max_event_bytes + size)))
    errs = run_garbage(router, good, [wire.encode_send(items)], hello_first=True)
    assert [(e["code"], e["ref"]) for e in errs] == [(wire.E_TOO_BIG, "big")]


# -- deterministic: one error code per kind of garbage ------------------------------------
def one_error(router, good, frames, hello_first: bool = True) -> dict:
    errs = run_garbage(router, good, [frames], hello_first)
    assert len(errs) == 1, errs
    return errs[0]


def test_unknown_kind_is_a_protocol_error(router, good):
    e = one_error(router, good, [bytes([99]), b"{}"])
    assert e["code"] == wire.E_PROTOCOL
    assert "99" in e["message"]


def test_send_to_invalid_channel_names_it(router, good):
    e = one_error(router, good, wire.encode_send([("e1", "/a b/", None, 1.0, 0, None, b"1")]))
    assert (e["code"], e["channel"], e["ref"]) == (wire.E_BAD_CHANNEL, "/a b/", "e1")


def test_lease_on_invalid_channel_names_it(router, good):
    e = one_error(router, good, wire.encode(Kind.LEASE, {"id": "l1", "channel": "no-slash",
                                                          "req": 7}))
    assert (e["code"], e["channel"], e["req"]) == (wire.E_BAD_CHANNEL, "no-slash", 7)


def test_send_without_hello_is_no_session(router, good):
    e = one_error(router, good, wire.encode_send([("e1", "/fuzz.example/junk/", None, 1.0, 0,
                                                   None, b"1")]), hello_first=False)
    assert e["code"] == wire.E_NO_SESSION


def test_body_length_mismatch_is_a_protocol_error(router, good):
    frames = wire.encode_send([("e1", "/fuzz.example/junk/", None, 1.0, 0, None, b"12")])
    frames[2] += b"trailing"
    e = one_error(router, good, frames)
    assert e["code"] == wire.E_PROTOCOL
    assert "body" in e["message"]


def test_group_count_mismatch_is_a_protocol_error(router, good):
    header = {"g": [["/fuzz.example/junk/", None, None, 2]], "i": ["e1"], "t": [1.0],
              "f": [0], "l": [1]}
    e = one_error(router, good, [bytes([Kind.SEND]), orjson.dumps(header), b"1"])
    assert e["code"] == wire.E_PROTOCOL


def test_undecodable_header_is_a_protocol_error(router, good):
    e = one_error(router, good, [bytes([Kind.SEND]), b"{not json"])
    assert e["code"] == wire.E_PROTOCOL


@pytest.mark.parametrize("eid", ["", "a\x7fb", "x" * 2000, "a b"])
def test_invalid_event_id_is_refused(router, good, eid):
    e = one_error(router, good, wire.encode_send([(eid, "/fuzz.example/junk/", None, 1.0, 0,
                                                   None, b"1")]))
    assert e["code"] == wire.E_BAD_EVENT


def test_session_survives_garbage(router, good):
    """After errors the offender's own session still works: lease, send, receive."""
    off = Offender(router.url)
    try:
        off.hello()
        off.replies_after([[bytes([99]), b"{}"], [b"\x03", b"[]"]])
        off.sock.send_multipart(wire.encode(Kind.LEASE, {"id": "l1", "channel":
                                                          "/fuzz.example/own/", "req": 1}))
        kind, h, _ = off.recv()
        assert (kind, h["id"]) == (Kind.LEASED, "l1")
        off.sock.send_multipart(wire.encode_send([("e1", "/fuzz.example/own/", None, 1.0, 0,
                                                   None, b'"hi"')]))
        kind, meta, segments = off.recv()
        assert kind == Kind.DELIVER
        assert meta["s"] == [["offender", off.instance]]
        assert orjson.loads(segments[0])["i"] == ["e1"] and segments[1] == b'"hi"'
    finally:
        off.close()


def test_message_above_max_message_bytes_does_not_kill_the_router(router, good):
    off = Offender(router.url)
    monitor = off.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        off.hello()
        assert 9 * MiB > ROUTER_DEFAULTS.max_message_bytes + MiB
        big = wire.encode_send([("huge", "/fuzz.example/junk/", None, 1.0, 0, None,
                                 b"x" * (9 * MiB))])
        off.sock.send_multipart(big)
        # ZeroMQ in the router drops a peer whose message exceeds MAXMSGSIZE: wait
        # for that (readiness, not a sleep), then the router must still serve.
        assert monitor.poll(10_000), "the router did not drop the oversize message's peer"
        event = zmq.utils.monitor.recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_DISCONNECTED
        assert router.alive()
        good.check()
    finally:
        off.sock.disable_monitor()
        monitor.close(linger=0)
        off.close()
