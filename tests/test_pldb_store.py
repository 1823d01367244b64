"""The PLDB vocabulary (psepr/pldb.py) and the SQLite tuple store (pldb/store.py)."""

from __future__ import annotations

import os
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psepr
from psepr import pldb
from psepr.errors import EventError, StorageError, UsageError
from psepr.pldb import Query, Replies, Tuple
from pldb.store import TupleStore

CH = "/example.com/node/"


def tup(channel="x/", field="load", value=1, time=100.0, expire=None, id="e1"):
    return Tuple(CH + channel, field, value, time, expire, "svc/inst", id)


def attr_event(payload, channel=CH + "x/"):
    return psepr.Event(channel, payload, type=psepr.ATTRIBUTE, from_service="svc",
                       from_instance="i1")


# -- vocabulary -------------------------------------------------------------------------------------

def test_tuple_from_an_attribute_event():
    ev = attr_event(psepr.attribute("load_avg", 0.4, expire=60))
    t = pldb.tuple_from_event(ev)
    assert (t.channel, t.field, t.value, t.expire, t.source, t.id) == \
        (CH + "x/", "load_avg", 0.4, 60.0, "svc/i1", ev.id)
    assert t.time == ev.time and t.expires_at == ev.time + 60
    assert Tuple.from_row(t.row()) == t


@pytest.mark.parametrize("payload, what", [
    ([1, 2], "payload must be a JSON object"),
    ({"field": "a", "value": 1, "colour": "red"}, "unknown key(s) 'colour'"),
    ({"value": 1}, "field must be a non-empty string"),
    ({"field": "", "value": 1}, "field must be a non-empty string"),
    ({"field": "a"}, "no value for field 'a'"),
    ({"field": "a", "value": 1, "expire": -1}, "expire must be a non-negative number"),
    ({"field": "a", "value": 1, "expire": "soon"}, "expire must be a non-negative number"),
    ({"field": "a", "value": "x" * 70000}, "more than the 65536 allowed"),
    ({"field": "x" * 257, "value": 1}, "at most 256 printable characters"),
    ({"field": "lo\nad", "value": 1}, "at most 256 printable characters"),   # breaks `get` lines
    ({"field": "\x00", "value": 1}, "at most 256 printable characters"),
    ({"field": "a", "value": 1, "expire": True}, "expire must be a non-negative number"),
])
def test_bad_attribute_payloads_are_refused_naming_the_problem(payload, what):
    with pytest.raises(EventError) as info:
        pldb.tuple_from_event(attr_event(payload))
    assert what in str(info.value)


def test_a_tuple_dated_too_far_ahead_of_the_receivers_clock_is_refused():
    # Versions are ordered by time: a clock a year fast would pin its field for a year.
    ev = attr_event(psepr.attribute("load_avg", 0.4))
    assert pldb.tuple_from_event(ev, now=ev.time - 299).time == ev.time
    with pytest.raises(EventError) as info:
        pldb.tuple_from_event(ev, now=ev.time - 400)
    assert info.value.field == "time"
    assert "its time is 400 s ahead of this clock (at most 300 s is taken" in str(info.value)
    assert pldb.attribute_row(ev, now=ev.time - 400, max_ahead=500)[3] == ev.time
    assert pldb.tuple_from_event(ev).time == ev.time        # no clock given: no check


def test_query_payload_round_trip_and_refusals():
    q = Query(psepr.channel(CH), "load", 5.0, True)
    ev = psepr.Event(CH, q.payload(), type=pldb.QUERY)
    assert pldb.parse_query(ev) == q
    assert pldb.parse_query(psepr.Event(CH, None, type=pldb.QUERY)) == Query(psepr.channel(CH))
    for payload, what in [({"fields": 1}, "unknown key(s) 'fields'"), ({"since": "x"}, "since"),
                          ({"history": 1}, "history must be true or false"), ("q", "JSON object"),
                          ({"field": 3}, "field must be")]:
        with pytest.raises(EventError) as info:
            pldb.parse_query(psepr.Event(CH, payload, type=pldb.QUERY))
        assert what in str(info.value)


def test_parse_span():
    assert [pldb.parse_span(s) for s in ("90", "30s", "10m", "2h", "1d", "1.5m")] == \
        [90, 30, 600, 7200, 86400, 90]
    with pytest.raises(UsageError):
        pldb.parse_span("ten minutes")


def test_cut_parts_bounds_the_bytes_and_keeps_every_row():
    rows = [tup(id=f"e{i}", value="v" * 100).row() for i in range(1000)]
    parts = pldb.cut_parts(rows, part_bytes=10_000)
    assert len(parts) > 10 and sum(len(p) for p in parts) == 1000
    assert [r for p in parts for r in p] == rows
    assert pldb.cut_parts([]) == [[]]


def reply(mon, part, rows, last=True, peers=()):
    return {"monitor": mon, "part": part, "last": last, "peers": list(peers), "tuples": rows}


def test_replies_wait_for_every_named_monitor_and_every_part_then_newest_wins():
    r = Replies()
    old, new = tup(time=1.0, id="a", value="old"), tup(time=2.0, id="b", value="new")
    r.add(reply("m1", 1, [old.row()], last=True, peers=["m2"]))
    assert not r.complete()                  # m1's part 0 and m2 are missing
    r.add(reply("m1", 0, [tup(field="mem").row()], last=False, peers=["m2"]))
    assert r.answered("m1") and not r.complete()
    r.add(reply("m2", 0, [new.row()]))
    assert r.complete() and r.monitors == ["m1", "m2"]
    got = r.tuples()
    assert [(t.field, t.value) for t in got] == [("load", "new"), ("mem", 1)]
    assert [t.value for t in r.tuples(history=True) if t.field == "load"] == ["old", "new"]


def test_replies_record_errors_and_garbage():
    r = Replies()
    r.add("garbage", "evil")
    r.add({"monitor": "m1", "error": "query q: unknown key(s) 'x'"})
    assert r.complete() and r.monitors == ["m1"]
    assert len(r.errors) == 2 and "unknown key" in str(r.errors[1])
    r.add(reply("m2", 0, [["not", "a", "row"]]))
    assert r.tuples() == [] and "1 malformed tuple row(s), left out" in str(r.errors[2])


def test_a_malformed_row_is_left_out_and_the_rest_of_the_answer_stands():
    # One bad row from one monitor (another version, a damaged file, an impostor)
    # used to fail the whole query, and a new monitor's whole fill from its peers.
    good, newer = tup(time=1.0, id="a", value="good"), tup(time=2.0, id="b", value="newer")
    bad_channel = [*newer.row()[:0], "no-slash", *newer.row()[1:]]      # ChannelError
    bad_time = [*newer.row()[:3], "soon", *newer.row()[4:]]           # not comparable
    bad_source = [*newer.row()[:5], 7, newer.row()[6]]                # wins, then fails
    r = Replies()
    r.add(reply("m1", 0, [good.row(), tup(field="mem").row()]))
    r.add(reply("m2", 0, [bad_channel, bad_time, bad_source, 17]))
    assert [(t.field, t.value) for t in r.tuples()] == [("load", "good"), ("mem", 1)]
    assert str(r.errors[-1]).startswith("a PLDB reply held 4 malformed tuple row(s), left out")


# -- the store ---------------------------------------------------------------------------------------

def test_store_keeps_the_newest_version_whatever_the_arrival_order(tmp_path):
    s = TupleStore(tmp_path / "db.sqlite")
    assert s.apply([tup(time=2.0, id="b", value="new")]) == 1
    assert s.apply([tup(time=1.0, id="a", value="old")]) == 1
    assert s.merge([tup(time=2.0, id="b", value="new"), tup(time=0.5, id="c", value="older")]) \
        == 1                                     # a fill: the known id is skipped
    q = Query(psepr.channel(CH))
    assert [t.value for t in s.query(q, now=10)] == ["new"]
    assert [t.value for t in s.query(Query(psepr.channel(CH), history=True), now=10)] == \
        ["new", "old", "older"]                  # history in arrival order
    s.close()


def test_equal_times_order_by_the_sdk_counter_not_the_text():
    s = TupleStore(":memory:")
    s.apply([tup(time=5.0, id="abc.10", value="tenth"), tup(time=5.0, id="abc.9", value="ninth")])
    assert [t.value for t in s.query(Query(psepr.channel(CH)), now=0)] == ["tenth"]
    a, b = tup(time=5.0, id="abc.9"), tup(time=5.0, id="abc.10")
    assert b.version > a.version


def test_store_queries_subtrees_element_wise_fields_and_since(tmp_path):
    s = TupleStore(":memory:")
    s.apply([Tuple("/example.com/node/a/", "f", 1, 1.0, None, "s/i", "1"),
             Tuple("/example.com/node/a/b/", "g", 2, 2.0, None, "s/i", "2"),
             Tuple("/example.com/node/ab/", "f", 3, 3.0, None, "s/i", "3")])

    def ask(ch, **kw):
        return sorted(t.value for t in s.query(Query(psepr.channel(ch), **kw), now=10))
    assert ask("/example.com/node/a/") == [1, 2]          # not /ab/
    assert ask("/example.com/node/") == [1, 2, 3]
    assert ask("/example.com/node/", field="f") == [1, 3]
    assert ask("/example.com/node/", since=2.0) == [2, 3]
    assert ask("/example.com/other/") == []


def test_store_honours_expire_and_purges(tmp_path):
    s = TupleStore(":memory:")
    s.apply([tup(field="short", time=100.0, expire=10, id="1"), tup(field="long", id="2")])
    q = Query(psepr.channel(CH))
    assert {t.field for t in s.query(q, now=105)} == {"short", "long"}
    assert {t.field for t in s.query(q, now=111)} == {"long"}
    assert s.purge(now=111) == 1
    assert s.counts()["latest"] == 1
    assert len(s.query(Query(psepr.channel(CH), history=True), now=111)) == 2


def test_store_history_is_a_bounded_log_and_latest_values_stay(tmp_path):
    s = TupleStore(tmp_path / "db.sqlite", history_rows=5)
    s.apply([tup(field="quiet", time=0.0, id="q0", value="q")])
    s.apply([tup(time=float(i), id=f"e{i:03}", value=i) for i in range(1, 20)])
    assert s.trim() == 0                        # nothing is cut above the checkpoint
    s.checkpoint()
    assert s.trim() == 15
    hist = s.query(Query(psepr.channel(CH), history=True), now=0)
    assert [t.value for t in hist] == [15, 16, 17, 18, 19]       # the newest rows
    assert {t.field: t.value for t in s.query(Query(psepr.channel(CH)), now=0)} == \
        {"quiet": "q", "load": 19}                               # latest values are kept
    assert s.trim() == 0


def test_store_survives_a_restart(tmp_path):
    path = tmp_path / "sub" / "db.sqlite"
    s = TupleStore(path, history_rows=3)
    s.apply([tup(time=float(i), id=f"e{i}", value=i) for i in range(5)])
    s.close()
    s = TupleStore(path, history_rows=3)
    assert [t.value for t in s.query(Query(psepr.channel(CH)), now=0)] == [4]
    assert s.trim() == 2                        # close() checkpointed
    assert s.counts()["history"] == 3 and s.counts()["bytes"] > 0


def test_a_crash_between_checkpoints_loses_nothing_the_log_has(tmp_path):
    path = tmp_path / "db.sqlite"
    s = TupleStore(path)
    s.apply([tup(field="a", time=1.0, id="1", value="a1")])
    s.checkpoint()
    s.apply([tup(field="a", time=2.0, id="2", value="a2"), tup(field="b", id="3", value="b")])
    s._db.close()                              # a crash: no checkpoint of the last rows,
    s._lock.close()                            # and the dead process's lock is gone
    s = TupleStore(path)
    got = {t.field: t.value for t in s.query(Query(psepr.channel(CH)), now=0)}
    assert got == {"a": "a2", "b": "b"} and len(s) == 2
    s.close()


def test_purged_values_leave_the_checkpoint_too(tmp_path):
    path = tmp_path / "db.sqlite"
    s = TupleStore(path)
    s.apply([tup(field="short", time=100.0, expire=10, id="1"), tup(field="long", id="2")])
    s.checkpoint()
    assert s.purge(now=200.0) == 1
    s.close()
    s = TupleStore(path)
    assert [t.field for t in s.query(Query(psepr.channel(CH)), now=0)] == ["long"]


def test_a_file_of_another_schema_is_refused_clearly(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE something (x)")
    db.execute("PRAGMA user_version=7")
    db.commit()
    db.close()
    with pytest.raises(StorageError) as info:
        TupleStore(path)
    assert "not a PLDB database of schema version 1 (it says 7)" in str(info.value)


def test_store_errors_are_storage_errors_not_crashes(tmp_path):
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StorageError) as info:
        TupleStore(bad)
    assert str(bad) in str(info.value)
    path = tmp_path / "ro.sqlite"
    s = TupleStore(path)
    s.apply([tup(id="1")])
    s.close()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    s._db = ro                              # the file became read-only under us
    with pytest.raises(StorageError) as info:
        s.apply([tup(id="2", time=200.0)])
    assert "write failed" in str(info.value)
    assert [t.id for t in s.query(Query(psepr.channel(CH)), now=0)] == ["1"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a/", "b/", "a/c/"]), st.sampled_from(["f", "g"]),
                          st.integers(0, 5), st.integers(0, 1000)), max_size=40))
def test_store_latest_matches_a_newest_version_model(items):
    s = TupleStore(":memory:")
    model: dict = {}
    tuples = [tup(channel=c, field=f, time=float(t), id=f"id{i}", value=v)
              for i, (c, f, t, v) in enumerate(items)]
    for t in tuples:
        key = (t.channel, t.field)
        if key not in model or t.version > model[key].version:
            model[key] = t
    s.apply(tuples[::2])
    s.apply(tuples[1::2])
    got = {(t.channel, t.field): t for t in s.query(Query(psepr.channel(CH)), now=0)}
    assert got == model


def test_one_database_serves_one_store_at_a_time(tmp_path):
    # Two monitors on one file both announced themselves as replicas: PLDB counted
    # two copies where one disk held them.
    path = tmp_path / "d" / "example.com~node.sqlite"
    first = TupleStore(path)
    with pytest.raises(StorageError, match=rf"in use by another monitor \(process {os.getpid()}\)"
                                           r": one monitor per database; give this one its own "
                                           r"--data-dir"):
        TupleStore(path)
    first.close()
    again = TupleStore(path)            # closing released it
    again.close()
    again.close()                       # idempotent
    TupleStore(":memory:").close()      # nothing to lock


async def test_a_monitor_stopped_midway_still_releases_its_database(tmp_path):
    # A supervisor shutting down cancels its tasks, a monitor's stop among them: the
    # database stayed locked, and no monitor of that root could open it again here.
    import asyncio

    from pldb.monitor import Monitor

    class Cancelled:
        async def send(self, *args, **kwargs):
            raise asyncio.CancelledError

    path = tmp_path / "example.com~node.sqlite"
    mon = Monitor(Cancelled(), "/example.com/node/", TupleStore(path), host="h1")
    with pytest.raises(asyncio.CancelledError):
        await mon.stop()
    TupleStore(path).close()


def test_a_filesystem_that_cannot_lock_runs_the_store_unguarded(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(f, how):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    store = TupleStore(tmp_path / "n.sqlite")          # as before the lock existed
    store.close()
    assert "cannot lock" in caplog.text and "No locks available" in caplog.text
