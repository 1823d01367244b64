"""PLDB end to end: monitor processes (`psepr pldb monitor`) behind a real router.

Tuples are sent as attribute events with the SDK; queries are events answered
by the monitors on the asker's inbox (psepr.pldb.query).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

import psepr
from psepr import pldb
from psepr.pldb import QUERY, REPORT

from .conftest import ROOT, raw_send, wait_for
from .conftest import start_monitor as conftest_start_monitor

AUTH = "pldb.example.com"
NODE = f"/{AUTH}/node/"


def start_monitor(start_cli, router, data_dir, host="h1"):
    return conftest_start_monitor(start_cli, router, data_dir, NODE, host)


def send_attr(con, channel, field, value, expire=None):
    return con.send(channel, psepr.attribute(field, value, expire=expire), type=psepr.ATTRIBUTE)


def test_monitor_answers_last_values_fields_history_since_and_expiry(router_proc, start_cli,
                                                                     tmp_path):
    start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        first = send_attr(con, NODE + "x/", "load", 0.1)
        time.sleep(0.01)
        t_mid = time.time()
        send_attr(con, NODE + "x/", "load", 0.2)
        send_attr(con, NODE + "x/", "mem", 512)
        send_attr(con, NODE + "y/", "load", 0.3, expire=0.6)
        con.flush()
        got = wait_for("four tuples", lambda: len(pldb.query(con, NODE)) == 3
                       and pldb.query(con, NODE))
        assert [(t.channel, t.field, t.value) for t in got] == [
            (NODE + "x/", "load", 0.2), (NODE + "x/", "mem", 512), (NODE + "y/", "load", 0.3)]
        assert all(t.source.startswith("anonymous/") for t in got)
        assert got[2].expire == 0.6
        one = pldb.query(con, NODE + "x/", "load")
        assert [t.value for t in one] == [0.2] and one[0].time >= t_mid
        hist = pldb.query(con, NODE + "x/", "load", history=True)
        assert [t.value for t in hist] == [0.1, 0.2] and hist[0].id == first
        assert [t.value for t in pldb.query(con, NODE, "load", since=t_mid)] == [0.2, 0.3]
        # expiry: y's load is valid for 0.6 s only
        wait_for("y/load to expire", lambda: [t.channel for t in pldb.query(con, NODE, "load")]
                 == [NODE + "x/"])
        assert len(pldb.query(con, NODE + "y/", history=True)) == 1   # the past stays


def test_cli_get_prints_values_and_fails_clearly_without_monitor(router_proc, start_cli,
                                                                 tmp_path):
    start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        send_attr(con, NODE + "x.example.com/", "load_avg", 0.4, expire=60)
        con.flush()
        wait_for("the tuple", lambda: pldb.query(con, NODE))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "psepr.cli", "pldb", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=30,
                              env={"PSEPR_ROUTERS": router_proc.url, "PATH": "/usr/bin:/bin"})
    r = run("get", NODE + "x.example.com/", "load_avg")
    assert r.returncode == 0, r.stderr
    assert "load_avg  0.4" in r.stdout and "expires in" in r.stdout
    r = run("get", NODE, "--since", "10m", "--history", "--json")
    assert r.returncode == 0 and '"value":0.4' in r.stdout
    r = run("get", f"/{AUTH}/nobody/", "--timeout", "0.5")
    assert r.returncode == 1
    assert r.stderr.strip() == (f"psepr pldb: error: no PLDB monitor answered for "
                                f"/{AUTH}/nobody/ within 0.5 s (does a `psepr pldb supervisor` "
                                f"or `psepr pldb monitor` keep that channel? `psepr pldb "
                                f"monitors` lists who keeps what)")
    r = run("get", NODE, "--since", "ten minutes")
    assert r.returncode == 2 and "not a time span: 'ten minutes'" in r.stderr


def test_bad_tuples_and_queries_get_clear_answers_and_the_monitor_lives(router_proc, start_cli,
                                                                        tmp_path):
    mon = start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        reports = con.lease(f"/{AUTH}/_sys/pldb/reports/", type=REPORT)
        con.send(NODE + "x/", {"field": "a", "value": 1, "colour": "red"}, type=psepr.ATTRIBUTE)
        con.send(NODE + "x/", [1, 2, 3], type=psepr.ATTRIBUTE)
        con.send(NODE + "x/", {"field": "big", "value": "x" * 70_000}, type=psepr.ATTRIBUTE)
        con.send(NODE + "x/", {"oops": True}, type=QUERY)          # a query with no reply_to
        send_attr(con, NODE + "x/", "good", 1)
        con.flush()
        report = reports.receive(timeout=10).payload
        assert report["kind"] == "bad-tuple" and "unknown key(s) 'colour'" in report["detail"]
        assert report["root"] == NODE
        # a malformed query is answered with an error naming the problem
        with pytest.raises(psepr.RemoteError) as info:
            replies = con.request_all(NODE, {"fields": "a"}, type=QUERY, timeout=5,
                                      done=lambda rs: True)
            p = pldb.Replies()
            for ev in replies:
                p.add(ev.payload)
            raise p.errors[0]
        assert "unknown key(s) 'fields'" in str(info.value)
        assert [t.field for t in wait_for("good", lambda: pldb.query(con, NODE))] == ["good"]
        # the next report (rate-limited) counts what it did not report one by one
        assert mon.alive()
        with pytest.raises(psepr.NoMonitor) as info:
            start = time.monotonic()
            pldb.query(con, f"/{AUTH}/unmonitored/", timeout=0.5)
        assert 0.45 < time.monotonic() - start < 3
        assert info.value.channel == f"/{AUTH}/unmonitored/"


def test_a_tuple_nested_too_deep_is_refused_and_the_monitor_goes_on(router_proc, start_cli,
                                                                   tmp_path):
    # A raw client's attribute whose value nests 600 levels (orjson reads it; it
    # cannot write it back) raised TypeError inside the monitor: its storing and
    # answering tasks died while it went on announcing itself ready.
    mon = start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        reports = con.lease(f"/{AUTH}/_sys/pldb/reports/", type=REPORT)
        value = b"[" * 600 + b"]" * 600
        raw_send(router_proc.url, [("deep.1", NODE + "x/", psepr.ATTRIBUTE, time.time(), 0,
                                    None, b'{"field": "deep", "value": ' + value + b'}')])
        report = reports.receive(timeout=10).payload
        assert report["kind"] == "bad-tuple" and "event deep.1" in report["detail"]
        assert "nested more than 253 levels" in report["detail"]
        send_attr(con, NODE + "x/", "after", 1)
        con.flush()
        assert [(t.field, t.value) for t in wait_for("after", lambda: pldb.query(con, NODE))] \
            == [("after", 1)]
        assert mon.alive()


def test_a_sender_whose_clock_runs_fast_cannot_pin_a_field(router_proc, start_cli, tmp_path,
                                                           monkeypatch):
    """The newest version wins by its time: a tuple dated a year ahead would hide every
    later value of its field for a year.  The monitor refuses it, reports it, and the
    value sent once the clock is right is the one PLDB gives."""
    import psepr.session

    class YearFast:
        def __getattr__(self, name):
            return getattr(time, name)

        def time(self):
            return time.time() + 365 * 86400

    start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        reports = con.lease(f"/{AUTH}/_sys/pldb/reports/", type=REPORT)
        monkeypatch.setattr(psepr.session, "_time", YearFast())
        fast = send_attr(con, NODE + "x/", "clock", "a year fast")
        con.flush()
        monkeypatch.undo()
        send_attr(con, NODE + "x/", "clock", "right")
        con.flush()
        report = reports.receive(timeout=10).payload
        assert report["kind"] == "bad-tuple" and fast in report["detail"]
        assert "s ahead of this clock (at most 300 s is taken: is the sender's clock right?)" \
            in report["detail"]
        got = wait_for("the right value", lambda: pldb.query(con, NODE + "x/", "clock"))
        assert [t.value for t in got] == ["right"]


def test_a_restarted_monitor_has_its_tuples_back(router_proc, start_cli, tmp_path):
    mon = start_monitor(start_cli, router_proc, tmp_path)
    with psepr.connect(router_proc.url, preset="local") as con:
        for i in range(50):
            send_attr(con, NODE + f"n{i}/", "load", i)
        con.flush()
        wait_for("50 tuples", lambda: len(pldb.query(con, NODE)) == 50)
        assert mon.stop() == 0
        mon = start_monitor(start_cli, router_proc, tmp_path)     # alone: nobody to fill from
        assert "50 tuples" in mon.lines[-1]
        got = pldb.query(con, NODE)
        assert sorted(t.value for t in got) == list(range(50))


def test_several_monitors_one_answer_per_tuple_newest_wins_and_a_new_one_fills(
        router_proc, start_cli, tmp_path):
    m1 = start_monitor(start_cli, router_proc, tmp_path / "a", host="a")
    with psepr.connect(router_proc.url, preset="local") as con:
        for i in range(20):
            send_attr(con, NODE + f"n{i}/", "load", i)
        send_attr(con, NODE + "n0/", "load", "newest")
        con.flush()
        wait_for("21 versions", lambda: len(pldb.query(con, NODE, history=True)) == 21)
        m2 = start_monitor(start_cli, router_proc, tmp_path / "b", host="b")
        assert "21 tuples" not in m2.lines[-1]    # it counts current tuples, not versions
        assert "20 tuples" in m2.lines[-1]        # filled from a before it said ready
        got = pldb.query(con, NODE)
        assert len(got) == 20 and got[0].value == "newest"       # one answer per tuple
        m1.stop()
        got = pldb.query(con, NODE, history=True)               # b alone has the whole past
        assert len(got) == 21


def test_watch_has_no_gap_and_no_duplicate_between_answer_and_live(router_proc, start_cli,
                                                                   tmp_path):
    start_monitor(start_cli, router_proc, tmp_path)
    n = 400
    stop = threading.Event()
    with psepr.connect(router_proc.url, preset="local") as sender, \
            psepr.connect(router_proc.url, preset="local") as watcher:
        def send_all():
            for i in range(n):
                send_attr(sender, NODE + "ctr/", "seq", i)
                if i % 20 == 0:
                    sender.flush()
                    time.sleep(0.005)
            sender.flush()
            stop.set()
        for i in range(3):
            send_attr(sender, NODE + "ctr/", "seq", -1)
        sender.flush()
        wait_for("the first tuple", lambda: pldb.query(watcher, NODE))
        t = threading.Thread(target=send_all)
        t.start()
        time.sleep(0.05)            # let the sender get going: the watch starts mid-stream
        seen = []
        for tup in pldb.watch(watcher, NODE + "ctr/", field="seq"):
            seen.append(tup.value)
            if tup.value == n - 1:
                break
        t.join(10)
    # the first value is the answer (whatever was newest then); after it, every
    # value once and in order: no gap, no duplicate
    assert seen == list(range(seen[0], n)), seen[:20]
    assert len(seen) > 1


@pytest.fixture
def small_disk(tmp_path):
    """A 192 KiB tmpfs the test mounts (as root) and unmounts; fails, never skips, if it cannot."""
    where = tmp_path / "small"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"this test needs to mount a small tmpfs (as root): {r.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_reported_as_an_event_and_the_monitor_recovers(router_proc, start_cli,
                                                                      small_disk):
    mon = start_monitor(start_cli, router_proc, small_disk)
    with psepr.connect(router_proc.url, preset="local") as con:
        reports = con.lease(f"/{AUTH}/_sys/pldb/reports/", type=REPORT)
        for i in range(12):                   # 12 x 40 KB values do not fit in 192 KiB
            send_attr(con, NODE + f"big{i}/", "blob", "x" * 40_000)
            con.flush()
        report, deadline = None, time.monotonic() + 15
        while report is None and time.monotonic() < deadline:
            p = _next_payload(reports)
            if p is not None and p["kind"] == "storage":
                report = p
        assert report is not None, "no storage report within 15 s"
        assert "database or disk is full" in report["detail"] and report["state"] == "broken"
        assert mon.alive()
        # a broken monitor does not answer with a partial past: nobody answers
        with pytest.raises(psepr.NoMonitor):
            pldb.query(con, NODE, timeout=0.5)
        # room again: a write after retry_storage succeeds, the monitor refills and answers
        subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            send_attr(con, NODE + "after/", "ok", 1)
            con.flush()
            try:
                got = pldb.query(con, NODE + "after/", timeout=0.5)
                if got:
                    break
            except psepr.NoMonitor:
                pass
        else:
            raise AssertionError("the monitor did not come back after the disk had room")
        assert mon.alive()


def _next_payload(lease):
    try:
        return lease.receive(timeout=0.2).payload
    except psepr.TimeoutError:
        return None


async def test_a_monitor_whose_task_fails_stops_and_its_supervisor_starts_another(
        router_proc, tmp_path, monkeypatch, caplog):
    # A monitor whose storing task died (of a TypeError it did not expect) went on
    # announcing itself ready while it stored and answered nothing. Now a failed
    # task stops the monitor, which says `stopped`, and the supervisor starts
    # another. (The failure is injected: every known cause is now refused by name.)
    import asyncio

    from pldb import monitor as pldb_monitor
    from pldb.config import PLDBConfig
    from pldb.peers import READY, STOPPED
    from pldb.supervisor import Supervisor
    from psepr.channel import parse
    real_row = pldb_monitor.attribute_row

    def row(ev, *args):
        if ev.payload.get("field") == "boom":
            raise RuntimeError("injected")
        return real_row(ev, *args)

    monkeypatch.setattr(pldb_monitor, "attribute_row", row)
    root = parse(NODE)
    sup = Supervisor(router_proc.url, [NODE], 1, host="h1", data_dir=tmp_path,
                     config=PLDBConfig.preset("local"), preset="local")

    async def ready_monitor(not_id=None, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = sup.monitors.get(root)
            if m is not None and m.id != not_id and m.state == READY:
                return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"no ready monitor (other than {not_id}) within {timeout} s")

    await sup.start()
    con = await psepr.aio.connect(router_proc.url, preset="local")
    try:
        first = await ready_monitor()
        said = await con.lease(pldb.monitors_channel(AUTH), type=pldb.ANNOUNCE)
        await con.send(NODE + "x/", psepr.attribute("boom", 1), type=psepr.ATTRIBUTE)
        await asyncio.wait_for(first.ended.wait(), 10)
        assert isinstance(first.failed, RuntimeError) and first.state == STOPPED
        assert f"task pldb-ingest-{first.id} failed: RuntimeError('injected')" in caplog.text
        while True:      # its last word
            p = (await said.receive(timeout=10)).payload
            if p["monitor"] == first.id and p["state"] == STOPPED:
                break
        second = await ready_monitor(not_id=first.id)
        await con.send(NODE + "x/", psepr.attribute("after", 1), type=psepr.ATTRIBUTE)
        deadline = time.monotonic() + 10
        while True:
            try:
                got = await pldb.aquery(con, NODE, timeout=2)
            except psepr.NoMonitor:
                got = []
            if any(t.field == "after" for t in got) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert [t.field for t in got if t.field == "after"] == ["after"]
        assert second.failed is None
    finally:
        await con.close()
        await sup.stop()


def test_a_verbose_supervisor_logs_its_own_work_not_the_schedulers(router_proc, tmp_path):
    # At -v, apscheduler's two INFO lines per round (four rounds a second) buried the
    # supervisor's own; and stopping it said each monitor was "surplus over k=1".
    import signal
    p = subprocess.Popen([sys.executable, "-m", "psepr.cli", "-v", "pldb", "supervisor",
                          "--channels", NODE, "--replicas", "1", "--data-dir", str(tmp_path),
                          "--preset", "local"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PSEPR_ROUTERS": router_proc.url})
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "started monitor" in line:
                break
        time.sleep(1.0)                      # four rounds
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    log = "".join(lines) + err
    assert "apscheduler" not in log, log
    assert "(the supervisor stops)" in log and "surplus" not in log, log
