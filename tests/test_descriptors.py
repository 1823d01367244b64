"""A router's descriptors: the limit raised at start, a warning near it, and no harm
to open sessions when clients exhaust it (routers.descriptors)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import zmq

import psepr
from routers.descriptors import DescriptorWatch, open_files
from tests.conftest import ROOT, wait_for


def test_the_watch_warns_near_and_at_the_limit_at_most_once_a_minute():
    held = [100]
    w = DescriptorWatch("r9", every=5.0, say_every=60.0, count=lambda: (held[0], 200))
    assert w.check(0.0) is None                       # 50 %: nothing to say
    held[0] = 180
    assert w.check(1.0) is None                       # not counted again before 5 s
    line = w.check(5.0)
    assert "router r9" in line and "holds 180 of the 200 descriptors" in line
    assert "ulimit -n" in line and "LimitNOFILE=" in line
    held[0] = 200
    assert w.check(10.0) is None                      # said within the minute
    line = w.check(65.0)
    assert "holds all the 200 descriptors" in line and "full CPU" in line
    held[0] = None                                    # uncountable: nothing said
    assert w.check(200.0) is None


def test_open_files_counts_this_process():
    held, limit = open_files()
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    before = held
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
    try:
        assert open_files()[0] == before + 5
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("soft, hard, after", [(100, 300, 300), (300, 300, 300)])
def test_the_soft_limit_is_raised_to_the_hard_one(soft, hard, after):
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = subprocess.run(
        [sys.executable, "-c", "import resource; from routers.descriptors import "
         "raise_open_files_limit as r; print(*r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
        cwd=ROOT, preexec_fn=limit, capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.split() == [str(soft), str(after), str(after)]


@pytest.mark.slow
def test_clients_beyond_the_limit_leave_open_sessions_working_and_the_log_says_why(
        start_router):
    # Soft and hard limit alike, so that the router cannot raise its way out.
    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    r = start_router("--preset", "local", preexec_fn=limit)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000 <= hard:                 # this test's own 300 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (2000, hard))
    ctx = zmq.Context()
    socks = []
    try:
        with psepr.connect(r.url, preset="local") as con:
            lease = con.lease("/example.com/fd/", duration=60)
            for _ in range(300):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(r.url)
                socks.append(s)
            line = wait_for("the router's warning", lambda: next(
                (ln for ln in r.output if "descriptors it may open" in ln), None), timeout=20,
                detail=lambda: "".join(r.output[-5:]))
            assert "holds all the 200 descriptors" in line and "ulimit -n" in line
            con.send("/example.com/fd/", {"n": 1})
            assert lease.receive(timeout=10).payload == {"n": 1}   # the open session
            for s in socks:
                s.close()
            socks = []
            with psepr.connect(r.url, config=psepr.ClientConfig.preset(
                    "local", connect_timeout=20.0)) as late:
                late.send("/example.com/fd/", {"n": 2})
                assert late.stats(timeout=20)["router"] == "r1"
            assert lease.receive(timeout=10).payload == {"n": 2}
        assert r.alive()
    finally:
        for s in socks:
            s.close()
        ctx.term()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
