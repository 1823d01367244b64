"""End to end: the SDK against real `psepr router` processes (issue 2, acceptance 4).

Proves that
* the sync and the asyncio connections work as documented (``with``/``async with``,
  ``await con.lease``, ``async for event in lease``, ``con.receive`` across leases);
* leases are renewed automatically at 80 % of the grant and keep delivering;
* after the router dies and a new one starts on the same port, the connection
  re-registers every lease and delivery resumes;
* fail-over: a dead router in the list is skipped, and a connection moves to the
  next router (with its leases) when its router is killed;
* the router list comes from ``PSEPR_ROUTERS`` or a servers file;
* ``request()`` gets a reply from a responder, and raises ``TimeoutError`` at its
  deadline when nobody answers;
* errors come from one tree: a bad channel is a ``ChannelError`` (a ``UsageError``),
  nobody listening is ``ConnectionLost``, and ``flush()`` raises the error the
  router reported asynchronously (an event over the router's size limit).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import psepr
import psepr.aio
from psepr import ClientConfig
from tests.conftest import ROOT, wait_for
from tests.tcpproxy import TcpProxy

CH = "/e2e.example.com/sdk/"
FAST = ClientConfig.preset("local")          # ping 0.5 s, dead after 1.5 s, connect 1 s


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead_url() -> str:
    """A loopback endpoint nobody listens on."""
    return f"tcp://127.0.0.1:{_free_port()}"


def _wait_for_leases(con: psepr.Connection, n: int, timeout: float = 10.0) -> None:
    """Poll the router's lease count (through ``con``) until it reaches ``n``."""
    deadline = time.monotonic() + timeout
    while True:
        if con.stats()["leases"] >= n:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"router never held {n} lease(s) within {timeout} s")
        time.sleep(0.05)


# -- sync ---------------------------------------------------------------------------------

def test_sync_connection_sends_and_receives(router_proc):
    with psepr.connect(router_proc.url) as con:
        lease = con.lease(CH, duration=120, type="heartbeat")
        con.send(CH + "x.example.com/", {"load": 0.4}, type="heartbeat")
        con.send(CH + "x.example.com/", psepr.attribute("load_avg", 0.4, expire=60),
                 type="heartbeat")
        ev = lease.receive(timeout=5)
        assert ev.payload == {"load": 0.4} and ev.channel.text == CH + "x.example.com/"
        assert lease.receive(timeout=5).payload["field"] == "load_avg"
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=0.2)


def test_sync_connection_without_with_block(router_proc):
    con = psepr.connect(router_proc.url)
    try:
        lease = con.lease(CH)
        con.send(CH, "hello")
        con.flush()
        assert lease.receive(timeout=5).payload == "hello"
    finally:
        con.close()
    con.close()                                   # idempotent
    with pytest.raises(psepr.ClosedError):
        con.send(CH, 1)



def test_a_script_that_ends_without_closing_still_delivers_what_it_sent(router_proc):
    # send() accepted them; the script ended with events still queued in the SDK,
    # and a quarter of 2,000 were lost without a word.
    script = ("import sys, psepr\n"
              "con = psepr.connect(sys.argv[1], preset='local')\n"
              "for i in range(5000):\n"
              "    con.send(sys.argv[2], {'i': i})\n")
    with psepr.connect(router_proc.url, preset="local") as con:
        lease = con.lease(CH, duration=60)
        r = subprocess.run([sys.executable, "-c", script, router_proc.url, CH], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        got = [lease.receive(timeout=10).payload["i"] for _ in range(5000)]
        assert got == list(range(5000))


def test_a_forked_child_is_told_its_parents_connection_is_not_its_own(router_proc):
    # The child inherits the parent's socket but not its I/O thread. Its sends were
    # queued for nobody and its flush timed out (with the new test, on the old code,
    # the child hung for over a minute); and the exit hook, closing the parent's
    # connection from the child, waited out the 2 s flush.
    script = ("import os, sys, time, psepr\n"
              "con = psepr.connect(sys.argv[1], preset='local')\n"
              "lease = con.lease(sys.argv[2], duration=60)\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    for use in (lambda: con.send(sys.argv[2], 1), lambda: con.flush(),\n"
              "                lambda: lease.receive(timeout=1), lambda: con.lease('/y/')):\n"
              "        try:\n"
              "            use()\n"
              "            print('no error')\n"
              "        except psepr.ClosedError as exc:\n"
              "            print(exc)\n"
              "    sys.exit(0)\n"
              "t0 = time.monotonic()\n"
              "status = os.waitpid(pid, 0)[1]\n"
              "print(os.waitstatus_to_exitcode(status), time.monotonic() - t0)\n"
              "con.send(sys.argv[2], 'parent')\n"
              "print(lease.receive(timeout=5).payload, os.getpid())\n")
    r = subprocess.run([sys.executable, "-c", script, router_proc.url, CH], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    *child, waited, parent = r.stdout.splitlines()
    payload, pid = parent.split()
    assert child == [f"connection is closed in this process: it was opened by process {pid} "
                     f"before fork(); connect anew in the child"] * 4, r.stdout
    code, seconds = waited.split()
    assert code == "0" and float(seconds) < 1.5, waited
    assert payload == "parent"                  # the parent's connection still works


def test_a_flush_that_times_out_names_the_timeout_it_was_given(router_proc):
    # It named the time left after its first step instead ("1.999985098002071 s").
    with psepr.connect(router_proc.url, preset="local") as con:
        router_proc.proc.send_signal(signal.SIGSTOP)       # connected, then silent
        try:
            con.send(CH, 1)
            with pytest.raises(psepr.TimeoutError) as info:
                con.flush(timeout=0.7)
        finally:
            router_proc.proc.send_signal(signal.SIGCONT)
    assert str(info.value) == "flush: no answer within 0.7 s"


def test_every_wait_refuses_a_timeout_that_is_not_a_number(router_proc):
    # NaN made receive() wait forever, and lease(), stats() or status() spin at full
    # CPU while the router did not answer (Condition.wait(nan) returns at once);
    # flush() said "no answer within 0.0 s".  A string raised a bare TypeError.
    with psepr.connect(router_proc.url) as con:
        lease = con.lease(CH)
        calls = [lease.receive, con.receive, con.flush, con.stats, con.status, lease.release,
                 lambda timeout: con.lease(CH + "x/", timeout=timeout),
                 lambda timeout: con.request(CH, 1, timeout=timeout),
                 lambda timeout: con.request_all(CH, 1, timeout=timeout)]
        for bad in (float("nan"), "1", True):
            for call in calls:
                with pytest.raises(psepr.UsageError, match="timeout must be a number"):
                    call(timeout=bad)
        with pytest.raises(psepr.UsageError, match="settle must be a number of seconds or "
                                                   "None, got nan"):
            con.request_all(CH, 1, settle=float("nan"))
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=-1)           # already expired: as before
        con.flush(timeout=5)                    # nothing refused was half done


async def test_aio_every_wait_refuses_a_nan_timeout(router_proc):
    async with psepr.aio.connect(router_proc.url) as con:
        lease = await con.lease(CH)
        calls = [lease.receive, con.receive, con.flush, con.stats, con.status, lease.release,
                 lambda timeout: con.lease(CH + "x/", timeout=timeout),
                 lambda timeout: con.request(CH, 1, timeout=timeout),
                 lambda timeout: con.request_all(CH, 1, timeout=timeout)]
        for call in calls:
            with pytest.raises(psepr.UsageError, match="got nan"):
                await asyncio.wait_for(call(timeout=float("nan")), 5)
        with pytest.raises(psepr.UsageError, match="settle must be"):
            await con.request_all(CH, 1, settle=float("nan"))
        await con.flush(timeout=5)


def test_receive_returns_events_from_every_lease_in_arrival_order(router_proc):
    with psepr.connect(router_proc.url) as sub, psepr.connect(router_proc.url) as pub:
        la = sub.lease(CH + "a/")
        lb = sub.lease(CH + "b/")
        pub.send(CH + "b/", 1)
        pub.send(CH + "a/", 2)
        pub.send(CH + "b/", 3)
        pub.flush()
        got = [sub.receive(timeout=5) for _ in range(3)]
        assert [e.payload for e in got] == [1, 2, 3]
        assert [e.leases for e in got] == [(lb.id,), (la.id,), (lb.id,)]
        with pytest.raises(psepr.TimeoutError):
            sub.receive(timeout=0.2)


# -- asyncio ------------------------------------------------------------------------------

async def test_aio_connection_async_with_and_async_for(router_proc):
    async with psepr.aio.connect(router_proc.url) as con:
        lease = await con.lease(CH, duration=60)
        assert lease.granted == 60
        for i in range(3):
            await con.send(CH + "n/", {"i": i})
        got = []
        async for event in lease:
            got.append(event.payload["i"])
            if len(got) == 3:
                break
        assert got == [0, 1, 2]


async def test_aio_calls_on_a_closed_connection_or_with_a_bad_lease_id_fail_at_once(router_proc):
    # As in the sync client: lease() and request() waited out their timeout
    # (5 s, 2 s) before, and a lease id with a space went to the router.
    con = await psepr.aio.connect(router_proc.url)
    with pytest.raises(psepr.EventError, match="'id'"):
        await con.lease(CH, id="two words")
    await con.close()
    t0 = time.monotonic()
    for call in (lambda: con.lease(CH), lambda: con.request(CH + "r/", 1, timeout=2),
                 lambda: con.send(CH, 1), lambda: con.flush()):
        with pytest.raises(psepr.ClosedError):
            await call()
    assert time.monotonic() - t0 < 0.5


async def test_aio_connect_awaited_receive_request_and_flush(router_proc):
    con = await psepr.aio.connect(router_proc.url, service="aio-user")
    responder = await psepr.aio.connect(router_proc.url)
    try:
        assert con.principal == "aio-user"
        la = await con.lease(CH + "a/")
        lb = await con.lease(CH + "b/")
        await con.send(CH + "a/", 1)
        await con.send(CH + "b/", 2)
        await con.flush()
        first, second = await con.receive(timeout=5), await con.receive(timeout=5)
        assert (first.leases, second.leases) == ((la.id,), (lb.id,))
        assert first.from_service == "aio-user"
        with pytest.raises(psepr.TimeoutError):
            await lb.receive(timeout=0.2)

        svc = await responder.lease(CH + "echo/")

        async def serve_one():
            req = await svc.receive(timeout=5)
            await responder.reply(req, {"echo": req.payload})

        task = asyncio.create_task(serve_one())
        reply = await con.request(CH + "echo/", {"q": 1}, timeout=5)
        await task
        assert reply.payload == {"echo": {"q": 1}}
    finally:
        await con.close()
        await responder.close()


# -- renewal -------------------------------------------------------------------------------

@pytest.mark.slow
def test_leases_are_renewed_automatically(start_router):
    r = start_router("--max-lease", "2")
    with psepr.connect(r.url, config=FAST) as sub, psepr.connect(r.url, config=FAST) as pub:
        renewed = sub.lease(CH, duration=2, renew=True)
        unrenewed = sub.lease(CH + "control/", duration=2, renew=False)
        assert renewed.granted == 2.0
        start = time.monotonic()
        n = 0
        # Probe every ~0.5 s for 5.5 s (several 2 s grants): each probe must arrive.
        while time.monotonic() - start < 5.5:
            pub.send(CH, {"n": n})
            assert renewed.receive(timeout=3).payload == {"n": n}
            n += 1
            time.sleep(0.5)   # pacing the probes, not waiting for readiness
        with pytest.raises(psepr.LeaseExpired):
            unrenewed.receive(timeout=0)
        assert pub.stats()["leases"] == 1


# -- reconnect and fail-over ----------------------------------------------------------------

def test_reconnect_reregisters_leases_after_router_restart(start_router):
    url = f"tcp://127.0.0.1:{_free_port()}"
    r1 = start_router("--listen", url)
    assert r1.url == url
    with psepr.connect(url, config=FAST) as sub:
        la = sub.lease(CH + "a/")
        lb = sub.lease(CH + "b/", type="t")
        r1.stop(signal.SIGKILL)
        start_router("--listen", url, name="r1-again")
        with psepr.connect(url, config=FAST) as pub:
            _wait_for_leases(pub, 2)
            pub.send(CH + "a/", "after restart")
            pub.send(CH + "b/", "typed", type="t")
            assert la.receive(timeout=5).payload == "after restart"
            assert lb.receive(timeout=5).payload == "typed"
        assert sub.welcome["router"] == "r1-again"


def test_connect_skips_a_dead_router(router_proc):
    dead = _dead_url()
    with psepr.connect([dead, router_proc.url], config=FAST) as con:
        assert con.router == router_proc.url
        lease = con.lease(CH)
        con.send(CH, "ok")
        assert lease.receive(timeout=5).payload == "ok"


def test_connection_fails_over_to_next_router_with_its_leases(start_router):
    r1 = start_router(name="r1")
    r2 = start_router(name="r2")
    with psepr.connect([r1.url, r2.url], config=FAST) as sub:
        assert sub.router == r1.url
        lease = sub.lease(CH)
        r1.stop(signal.SIGKILL)
        with psepr.connect(r2.url, config=FAST) as pub:
            _wait_for_leases(pub, 1)
            assert sub.router == r2.url
            pub.send(CH, "via r2")
            assert lease.receive(timeout=5).payload == "via r2"
            sub.send(CH, "sent after fail-over")
            assert lease.receive(timeout=5).payload == "sent after fail-over"


def test_a_client_back_on_a_new_socket_takes_its_hung_session_over(router_proc):
    # The path to the router hangs (the TCP connection stays open, nothing moves):
    # the client gives up on it and comes back on a new socket, naming its session.
    # The router moves the session, leases included, instead of keeping a second,
    # ghost session that it would go on feeding until conn_timeout.
    proxy = TcpProxy(int(router_proc.url.rsplit(":", 1)[1]))
    try:
        with psepr.connect(proxy.url, config=FAST) as sub, \
                psepr.connect(router_proc.url, config=FAST) as pub:
            lease = sub.lease(CH)
            pub.send(CH, "before")
            assert lease.receive(timeout=5).payload == "before"
            token = sub.welcome["session"]
            proxy.freeze()
            wait_for("the client to resume its session on a new socket",
                     lambda: sub.welcome.get("resumed") is True, timeout=15,
                     detail=lambda: sub.welcome)
            assert sub.welcome["session"] == token
            assert pub.stats()["connections"] == 2      # no ghost of the hung socket
            pub.send(CH, "after")
            assert lease.receive(timeout=5).payload == "after"
            with pytest.raises(psepr.TimeoutError):     # and nothing twice
                lease.receive(timeout=0.3)
    finally:
        proxy.close()


async def test_aio_client_back_on_a_new_socket_takes_its_hung_session_over(router_proc):
    # As above, through the asyncio shell (same session core, its own socket tasks).
    proxy = TcpProxy(int(router_proc.url.rsplit(":", 1)[1]))
    try:
        async with psepr.aio.connect(proxy.url, config=FAST) as sub, \
                psepr.aio.connect(router_proc.url, config=FAST) as pub:
            lease = await sub.lease(CH)
            await pub.send(CH, "before")
            assert (await lease.receive(timeout=5)).payload == "before"
            token = sub.welcome["session"]
            proxy.freeze()
            deadline = time.monotonic() + 15
            while sub.welcome.get("resumed") is not True:
                assert time.monotonic() < deadline, f"no resumed session: {sub.welcome}"
                await asyncio.sleep(0.05)
            assert sub.welcome["session"] == token
            assert (await pub.stats())["connections"] == 2
            await pub.send(CH, "after")
            assert (await lease.receive(timeout=5)).payload == "after"
            with pytest.raises(psepr.TimeoutError):
                await lease.receive(timeout=0.3)
    finally:
        proxy.close()


# -- router list ------------------------------------------------------------------------------

def test_router_list_from_environment(router_proc, monkeypatch):
    monkeypatch.setenv("PSEPR_ROUTERS", f"{_dead_url()}, {router_proc.url}")
    with psepr.connect(config=FAST) as con:
        assert con.routers[1] == router_proc.url
        assert con.router == router_proc.url


def test_router_list_from_servers_file(router_proc, monkeypatch, tmp_path):
    servers = tmp_path / "servers"
    servers.write_text(f"# routers of this farm\n{router_proc.url}   # r1\n\n")
    monkeypatch.delenv("PSEPR_ROUTERS", raising=False)
    monkeypatch.setenv("PSEPR_SERVERS_FILE", str(servers))
    with psepr.connect(config=FAST) as con:
        assert con.routers == [router_proc.url]
        assert con.stats()["router"] == "r1"


# -- request/reply -------------------------------------------------------------------------------

def test_request_gets_a_reply_from_a_responder(router_proc):
    with psepr.connect(router_proc.url) as client, \
            psepr.connect(router_proc.url, service="echo") as server:
        inbox = server.lease(CH + "echo/")
        failures: list[BaseException] = []

        def respond():
            try:
                req = inbox.receive(timeout=5)
                server.reply(req, {"echo": req.payload, "by": req.from_service})
                server.flush()
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        t = threading.Thread(target=respond, daemon=True)
        t.start()
        reply = client.request(CH + "echo/", {"q": 1}, timeout=5)
        t.join(5)
        assert not failures
        assert reply.payload == {"echo": {"q": 1}, "by": "anonymous"}
        assert reply.from_service == "echo"
        assert reply.re is not None


def test_request_without_responder_times_out_at_its_deadline(router_proc):
    with psepr.connect(router_proc.url) as con:
        start = time.monotonic()
        with pytest.raises(psepr.TimeoutError) as info:
            con.request(CH + "nobody/", {"q": 1}, timeout=0.5)
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 2.0
        assert isinstance(info.value, TimeoutError)          # the builtin, too
        assert isinstance(info.value, psepr.PseprError)


# -- errors ---------------------------------------------------------------------------------------

def test_invalid_channel_raises_channel_error(router_proc):
    with psepr.connect(router_proc.url) as con:
        with pytest.raises(psepr.ChannelError) as info:
            con.send("no-slashes", {"x": 1})
        assert isinstance(info.value, psepr.UsageError)
        assert isinstance(info.value, psepr.PseprError)
        assert "no-slashes" in str(info.value)
        with pytest.raises(psepr.ChannelError):
            con.lease("/a//b/")
        con.flush()                           # nothing was sent, nothing to report


def test_connect_to_nothing_raises_connection_lost():
    dead = _dead_url()
    with pytest.raises(psepr.ConnectionLost) as info:
        psepr.connect(dead, config=FAST.replace(connect_timeout=0.5))
    assert dead in str(info.value)
    assert isinstance(info.value, psepr.PseprError)


def test_flush_raises_the_routers_asynchronous_error(router_proc):
    # The client is configured to allow bigger events than the router (1 MiB):
    # the router refuses the event and flush() reports it.
    cfg = ClientConfig(max_event_bytes=4 << 20)
    with psepr.connect(router_proc.url, config=cfg) as con, \
            psepr.connect(router_proc.url) as sub:
        lease = sub.lease(CH)
        big_id = con.send(CH, "x" * (2 << 20))
        with pytest.raises(psepr.RemoteError) as info:
            con.flush()
        assert info.value.code == "too-big" and info.value.ref == big_id
        assert isinstance(info.value, psepr.ProtocolError)
        con.send(CH, "small")
        con.flush()                            # the error was reported once
        assert lease.receive(timeout=5).payload == "small"


def test_oversize_payload_is_refused_locally(router_proc):
    with psepr.connect(router_proc.url) as con:
        with pytest.raises(psepr.EventError) as info:
            con.send(CH, "x" * (2 << 20))
        assert info.value.field == "payload"
        con.flush()


def test_con_receive_loses_nothing_when_a_reader_lags(router_proc):
    """con.receive() finds every queued event even after its arrival list was compacted."""
    cfg = psepr.ClientConfig(lease_queue=100)
    with psepr.connect(router_proc.url, config=cfg) as rx, psepr.connect(router_proc.url) as tx:
        a = rx.lease("/lag/a/")
        b = rx.lease("/lag/b/")
        for i in range(150):
            tx.send("/lag/a/", {"i": i})
            tx.send("/lag/b/", {"i": i})
        tx.flush()
        deadline = time.monotonic() + 10
        while a.pending() + a.dropped < 150 or b.pending() + b.dropped < 150:
            assert time.monotonic() < deadline, "events did not arrive"
            time.sleep(0.01)
        assert (a.pending(), a.dropped, b.pending(), b.dropped) == (100, 50, 100, 50)
        first = a.receive(timeout=1)          # one taken through the lease directly
        assert first.payload == {"i": 0}
        got = []
        while True:
            try:
                ev = rx.receive(timeout=0.5)
            except psepr.TimeoutError:
                break
            got.append((ev.channel.text, ev.payload["i"]))
        assert len(got) == 199 and len(set(got)) == 199
        assert sorted(i for ch, i in got if ch == "/lag/a/") == list(range(1, 100))
        assert sorted(i for ch, i in got if ch == "/lag/b/") == list(range(100))


def test_many_reader_threads_and_a_sender_share_one_connection(router_proc):
    """Readers drive the socket themselves; several at once must neither deadlock nor lose."""
    with psepr.connect(router_proc.url) as con:
        leases = [con.lease(f"/threads/{k}/") for k in range(3)]
        got: dict[int, list] = {k: [] for k in range(3)}

        def read(k: int) -> None:
            for _ in range(500):
                got[k].append(leases[k].receive(timeout=10).payload)

        readers = [threading.Thread(target=read, args=(k,)) for k in range(3)]
        for t in readers:
            t.start()

        def write() -> None:
            for i in range(500):
                for k in range(3):
                    con.send(f"/threads/{k}/", i)

        writer = threading.Thread(target=write)
        writer.start()
        writer.join(30)
        for t in readers:
            t.join(30)
        assert not writer.is_alive() and not any(t.is_alive() for t in readers)
        assert all(got[k] == list(range(500)) for k in range(3))


def test_full_leases_drop_without_decoding_and_count_it(router_proc):
    """Events only full leases would get are counted as dropped, and delivery resumes."""
    cfg = psepr.ClientConfig(lease_queue=50)
    with psepr.connect(router_proc.url, config=cfg) as rx, psepr.connect(router_proc.url) as tx:
        lease = rx.lease("/full/")
        for burst in range(4):                 # 4 separate messages of 50 events
            for i in range(50):
                tx.send("/full/", burst * 50 + i)
            tx.flush()
        deadline = time.monotonic() + 10
        while lease.pending() + lease.dropped < 200:
            assert time.monotonic() < deadline, (lease.pending(), lease.dropped)
            time.sleep(0.01)
        assert (lease.pending(), lease.dropped) == (50, 150)
        assert [lease.receive(timeout=1).payload for _ in range(50)] == list(range(50))
        tx.send("/full/", "again")
        tx.flush()
        assert lease.receive(timeout=5).payload == "again"


@pytest.mark.parametrize("full_one", ["/ovl/", "/ovl/x/"])
def test_a_full_lease_does_not_cut_an_overlapping_one_short(router_proc, full_one):
    """Two leases get the same events; one is full, the other still gets every event."""
    cfg = psepr.ClientConfig(lease_queue=50)
    with psepr.connect(router_proc.url, config=cfg) as rx, psepr.connect(router_proc.url) as tx:
        leases = {ch: rx.lease(ch) for ch in ("/ovl/", "/ovl/x/")}
        full = leases[full_one]
        other = leases["/ovl/" if full_one == "/ovl/x/" else "/ovl/x/"]
        for i in range(50):
            tx.send("/ovl/x/", i)
        tx.flush()
        assert [other.receive(timeout=5).payload for _ in range(50)] == list(range(50))
        wait_for("the full lease to hold 50 events", lambda: full.pending() == 50)
        for i in range(50, 60):                # one message for both leases, one of them full
            tx.send("/ovl/x/", i)
        tx.flush()
        assert [other.receive(timeout=5).payload for _ in range(10)] == list(range(50, 60))
        wait_for("the full lease to count its drops", lambda: full.dropped == 10)
        assert full.pending() == 50 and other.dropped == 0


async def test_aio_many_rounds_of_send_flush_and_receive(router_proc):
    """The asyncio reader never misses ZeroMQ's edge-triggered wake-up (40 busy rounds)."""
    async with psepr.aio.connect(router_proc.url) as con:
        lease = await con.lease("/aio-rounds/")
        for r in range(40):
            for i in range(250):
                await con.send("/aio-rounds/x/", [r, i])
            await con.flush(timeout=5)
            got = [(await lease.receive(timeout=5)).payload for _ in range(250)]
            assert got == [[r, i] for i in range(250)]


#: A flood from its own process: 100-byte events as fast as the sync SDK sends.
_FLOOD = """
import sys, psepr
url, channel, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with psepr.connect(url, preset="local") as con:
    for i in range(n):
        con.send(channel, [i, "x" * 90])
    con.flush(timeout=30)
"""


async def test_aio_reader_under_a_flood_leaves_the_loop_to_readers_and_other_tasks(router_proc):
    """Messages already waiting complete the reader task's await without a loop
    turn; under a flood it must still yield, or it files events until the lease
    queue overflows while the reader it woke (and every other task) waits.  With a
    small lease queue, a reader that keeps up loses nothing, and another task of
    the loop runs all along."""
    n = 60_000
    # A DELIVER of 100-byte events holds about 1,300 (128 KiB): room for a few.
    config = FAST.replace(lease_queue=10_000)
    async with psepr.aio.connect(router_proc.url, config=config) as con:
        lease = await con.lease(CH + "flood/")
        got: list = []
        seen_by_ticker: list = []

        async def ticker():
            while True:
                await asyncio.sleep(0.001)
                seen_by_ticker.append(len(got))

        tick = asyncio.create_task(ticker())
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _FLOOD, router_proc.url, CH + "flood/x/", str(n))
        try:
            while len(got) < n:
                assert lease.dropped == 0, f"{lease.dropped} dropped after {len(got)} received"
                got.append((await lease.receive(timeout=10)).payload[0])
        finally:
            tick.cancel()
            assert await asyncio.wait_for(sender.wait(), 30) == 0
        assert got == list(range(n))
        assert lease.dropped == 0 and con.dropped_by_router == 0
        # The ticker ran while the flood was being received, not only around it.
        assert len({k for k in seen_by_ticker if 0 < k < n}) >= 3, seen_by_ticker[:50]


async def test_aio_sending_in_a_loop_lets_batches_leave_and_other_tasks_run(router_proc):
    """``await con.send()`` completes without suspending; a caller sending in a
    loop must still let full batches leave as it goes (not only once the send
    queue fills) and let the loop's other tasks run."""
    n = 50_000      # half the default send queue
    async with psepr.aio.connect(router_proc.url) as rx, \
            psepr.aio.connect(router_proc.url) as tx:
        lease = await rx.lease(CH + "aio-loop/", propagated=True)
        sent = 0
        seen_by_ticker: list = []

        async def ticker():
            while True:
                await asyncio.sleep(0.001)
                seen_by_ticker.append(sent)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        try:
            for i in range(n):
                await tx.send(CH + "aio-loop/x/", [i, "x" * 90])
                sent += 1
            await tx.flush(timeout=30)
        finally:
            tick.cancel()
        assert [(await lease.receive(timeout=10)).payload[0] for _ in range(n)] == list(range(n))
        # The ticker ran while the loop was sending, not only before and after it.
        assert len({k for k in seen_by_ticker if 0 < k < n}) >= 3, seen_by_ticker[:50]


async def test_aio_thousands_of_leases_at_once_lose_no_answer(router_proc):
    """LEASEs leave a window at a time: the router, which keeps at most 1,000
    unsent control replies per connection, has no answer to drop, and every
    lease is granted without waiting for a retry."""
    async with psepr.aio.connect(router_proc.url) as con:
        await asyncio.gather(*[con.lease(f"{CH}many/c{k}/", duration=600, timeout=30)
                               for k in range(5000)])
        stats = await con.stats()
    assert stats["leases"] >= 5000 and stats["control_dropped"] == 0, stats


def test_lone_and_burst_sends_keep_their_order(router_proc):
    """Lone sends leave from the caller's thread, bursts through the I/O thread:
    mixed, one sender's events still arrive in the order sent, none lost."""
    import random
    rng = random.Random(5)
    with psepr.connect(router_proc.url, preset="local") as rx, \
            psepr.connect(router_proc.url, preset="local") as tx:
        lease = rx.lease("/t.org/order/", propagated=True)
        n = 0
        for _ in range(60):
            for _ in range(rng.choice((1, 1, 2, 20))):    # lone sends and bursts
                tx.send("/t.org/order/x/", {"k": n})
                n += 1
            time.sleep(rng.choice((0.0, 0.00005, 0.0002, 0.002)))
        tx.flush()
        got = [lease.receive(timeout=5).payload["k"] for _ in range(n)]
        assert got == list(range(n))
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=0.2)


# -- request_all: several responders --------------------------------------------------------------

def _responders(url: str, channel: str, n: int, failures: list):
    """``n`` responder connections on ``channel``, each answering one request."""
    cons = [psepr.connect(url, service=f"resp{i}") for i in range(n)]
    leases = [c.lease(channel) for c in cons]

    def respond(con, lease):
        try:
            req = lease.receive(timeout=5)
            con.reply(req, {"by": con.principal, "q": req.payload})
            con.flush()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    threads = [threading.Thread(target=respond, args=(c, l), daemon=True)
               for c, l in zip(cons, leases)]
    for t in threads:
        t.start()
    return cons, threads


def test_request_all_gathers_every_reply_and_stops_when_done(router_proc):
    failures: list = []
    cons, threads = _responders(router_proc.url, CH + "many/", 3, failures)
    try:
        with psepr.connect(router_proc.url) as client:
            start = time.monotonic()
            replies = client.request_all(CH + "many/", {"q": 2}, timeout=10,
                                         done=lambda rs: len(rs) == 3)
            elapsed = time.monotonic() - start
        for t in threads:
            t.join(5)
        assert not failures
        assert sorted(r.payload["by"] for r in replies) == ["resp0", "resp1", "resp2"]
        assert all(r.payload["q"] == {"q": 2} and r.re for r in replies)
        assert len({r.re for r in replies}) == 1
        assert elapsed < 5      # done() ended it, not the 10 s deadline
    finally:
        for c in cons:
            c.close()


def test_request_all_settles_after_the_first_reply_and_is_empty_without_responders(router_proc):
    failures: list = []
    cons, threads = _responders(router_proc.url, CH + "one/", 1, failures)
    try:
        with psepr.connect(router_proc.url) as client:
            start = time.monotonic()
            replies = client.request_all(CH + "one/", 1, timeout=10, settle=0.2)
            assert len(replies) == 1 and time.monotonic() - start < 5
            start = time.monotonic()
            assert client.request_all(CH + "nobody/", 1, timeout=0.3) == []
            assert 0.25 <= time.monotonic() - start < 2
        assert not failures
    finally:
        for c in cons:
            c.close()


async def test_aio_request_all_gathers_replies(router_proc):
    failures: list = []
    cons, threads = _responders(router_proc.url, CH + "aio-many/", 2, failures)
    con = await psepr.aio.connect(router_proc.url)
    try:
        replies = await con.request_all(CH + "aio-many/", {"q": 3}, timeout=10,
                                        done=lambda rs: len(rs) == 2)
        assert sorted(r.payload["by"] for r in replies) == ["resp0", "resp1"]
        assert await con.request_all(CH + "aio-nobody/", 1, timeout=0.3, settle=0.1) == []
    finally:
        await con.close()
        for c in cons:
            c.close()
    assert not failures



def test_aio_connections_keep_connecting_after_their_routers_stop():
    """Regression: close() used to close the monitor's PAIR before the socket; the
    router's end closing in between left ZeroMQ's I/O thread blocked on the monitor
    for good, and every later asyncio connection of the process timed out."""
    from tests.conftest import RouterProcess

    async def one_round(url: str, r: int) -> int:
        async with psepr.aio.connect(url, preset="local") as con:
            lease = await con.lease(f"/aio-fresh/{r}/")
            await con.send(f"/aio-fresh/{r}/x/", r)
            async for event in lease:
                return event.payload

    for r in range(25):           # a fresh event loop and a fresh router each round
        router = RouterProcess()
        try:
            assert asyncio.run(one_round(router.url, r)) == r, f"round {r}"
        finally:
            router.stop()


async def test_aio_release_is_sent_at_once_not_at_the_next_timer_tick(router_proc):
    """Regression: the asyncio release queued its request without flushing, so each
    release waited for the connection's timer (up to 1 s) before it left."""
    async with psepr.aio.connect(router_proc.url) as con:
        leases = [await con.lease(f"/aio-release/{i}/") for i in range(5)]
        for lease in leases:
            await lease.release(timeout=0.3)     # far less than the timer's 1 s
        assert (await con.stats())["leases"] == 0


def test_a_lease_that_timed_out_is_not_granted_behind_the_callers_back(router_proc):
    """Regression: lease() raised TimeoutError, yet its LEASE stayed asked; once the
    router answered, the lease was held and renewed, and con.receive() returned its
    events, though the caller had been told it failed."""
    with psepr.connect(router_proc.url, config=FAST) as con, \
            psepr.connect(router_proc.url, config=FAST) as other:
        router_proc.proc.send_signal(signal.SIGSTOP)     # the LEASE waits in its queue
        try:
            with pytest.raises(psepr.TimeoutError, match="not granted within"):
                con.lease(f"{CH}late/", duration=60, timeout=0.5)
        finally:
            router_proc.proc.send_signal(signal.SIGCONT)
        kept = con.lease(f"{CH}kept/", duration=60)      # the connection works on
        other.send(f"{CH}late/x/", {"n": 1})
        other.send(f"{CH}kept/x/", {"n": 2})
        other.flush()
        assert con.receive(timeout=5.0).payload == {"n": 2}
        with pytest.raises(psepr.TimeoutError):
            con.receive(timeout=0.5)
        assert other.stats()["leases"] == 1
        assert kept.granted > 0
        con.flush()                  # no error of the connection's either


async def test_aio_a_cancelled_or_timed_out_lease_is_not_granted_later(router_proc):
    """The same for the asyncio client: a lease() whose task was cancelled, or that
    asyncio.wait_for or its own timeout gave up on, leaves nothing at the router."""
    async with psepr.aio.connect(router_proc.url, config=FAST) as con:
        router_proc.proc.send_signal(signal.SIGSTOP)
        try:
            task = asyncio.create_task(con.lease(f"{CH}cancelled/", duration=60))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(con.lease(f"{CH}waited/", duration=60), 0.3)
            with pytest.raises(psepr.TimeoutError, match="not granted within"):
                await con.lease(f"{CH}timed-out/", duration=60, timeout=0.3)
        finally:
            router_proc.proc.send_signal(signal.SIGCONT)
        await con.lease(f"{CH}kept/", duration=60)
        with psepr.connect(router_proc.url, config=FAST) as other:
            for name in ("cancelled", "waited", "timed-out", "kept"):
                other.send(f"{CH}{name}/x/", {"to": name})
            other.flush()
            assert (await con.receive(timeout=5.0)).payload == {"to": "kept"}
            with pytest.raises(psepr.TimeoutError):
                await con.receive(timeout=0.5)
            assert other.stats()["leases"] == 1
        await con.flush()


def test_answers_after_a_timeout_are_not_kept_for_good(router_proc):
    """Regression: each flush() or stats() that timed out left a waiter behind that
    the late answer filled and nobody ever took: a slow leak in a service that asks
    on a timer.  (The shells' own tables are read: the leak had no other face.)"""
    with psepr.connect(router_proc.url, config=FAST) as con:
        router_proc.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(20):
                with pytest.raises(psepr.TimeoutError):
                    con.flush(timeout=0.01)
                with pytest.raises(psepr.TimeoutError):
                    con.stats(timeout=0.01)
        finally:
            router_proc.proc.send_signal(signal.SIGCONT)
        con.flush(timeout=5.0)           # every late answer has come in by now
        assert con._waiters == {} and con._session._waiting == {}


async def test_aio_answers_after_a_timeout_or_cancel_are_not_kept_for_good(router_proc):
    async with psepr.aio.connect(router_proc.url, config=FAST) as con:
        router_proc.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(20):
                with pytest.raises(psepr.TimeoutError):
                    await con.flush(timeout=0.01)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(con.stats(), 0.01)
                task = asyncio.create_task(con.status())
                await asyncio.sleep(0.005)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        finally:
            router_proc.proc.send_signal(signal.SIGCONT)
        await con.flush(timeout=5.0)
        assert con._futs == {} and con._session._waiting == {}


def test_lease_duration_and_request_inbox_errors_name_what_was_wrong(router_proc):
    with psepr.connect(router_proc.url, config=FAST) as con:
        # Not finite, not a number: refused here, before the router answers with a
        # puzzle (JSON carries inf and NaN as null).
        for bad in (-1, 0, float("inf"), float("nan"), "10", True):
            with pytest.raises(psepr.UsageError, match="positive, finite number of seconds"):
                con.lease(f"{CH}d/", duration=bad)
        # A request that cannot even get its reply inbox in time says so.
        with pytest.raises(psepr.TimeoutError, match="request: its reply inbox .* not granted"):
            con.request(f"{CH}nobody/", {}, timeout=0)
        assert con.stats()["leases"] == 0


def test_automatic_lease_ids_never_take_over_a_chosen_one(router_proc):
    """Regression: automatic ids count L1, L2, ...; a lease the caller had named "L2"
    was re-registered onto the second automatic lease's channel, silently."""
    with psepr.connect(router_proc.url, config=FAST) as con:
        mine = con.lease(f"{CH}mine/", id="L2")
        auto = [con.lease(f"{CH}auto{k}/") for k in range(3)]
        assert [lease.id for lease in auto] == ["L1", "L3", "L4"]
        con.send(f"{CH}mine/x/", {"to": "mine"})
        con.flush()
        assert mine.receive(timeout=5.0).payload == {"to": "mine"}
        assert con.stats()["leases"] == 4


async def test_aio_automatic_lease_ids_never_take_over_a_chosen_one(router_proc):
    async with psepr.aio.connect(router_proc.url, config=FAST) as con:
        mine = await con.lease(f"{CH}mine/", id="L1")
        auto = await con.lease(f"{CH}auto/")
        assert auto.id == "L2" and mine.channel.text == f"{CH}mine/"
        assert (await con.stats())["leases"] == 2
