"""`psepr run` (what `make run` starts): three routers in a full mesh, PLDB, sensors,
failure detectors and this host's agent.

Starts it on free loopback ports, leases at the first router, sends at the
third, and checks the event crossed the overlay; asks PLDB what this host's
sensors published and the detectors whether this host is alive; then stops it with SIGTERM, by its own pid, and checks it
said so.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import psepr
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _free_base() -> int:
    """A port p with p .. p+21 free on 127.0.0.1 (router i uses p+10i and p+10i+1)."""
    rng = random.Random()
    for _ in range(50):
        base = rng.randrange(20000, 60000, 10)
        socks = []
        try:
            for off in (0, 1, 10, 11, 20, 21):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + off))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


def test_psepr_run_starts_a_three_router_mesh_with_pldb_and_sensors(tmp_path):
    base = _free_base()
    p = subprocess.Popen([sys.executable, "-m", "psepr.cli", "run", "--listen",
                          f"tcp://127.0.0.1:{base}", "--data-dir", str(tmp_path)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            assert line, f"psepr run exited: {''.join(lines)}"
            lines.append(line)
            if line.startswith("Stop with Ctrl-C"):
                break
        banner = "".join(lines)
        assert "3 routers in a full mesh" in banner
        # Off the default port, the hints work only once PSEPR_ROUTERS names this farm.
        hints = banner.split("Try, in another terminal")[1].splitlines()
        assert hints[1].startswith(f"  export PSEPR_ROUTERS=tcp://127.0.0.1:{base},"), banner
        for i in range(3):
            assert f"tcp://127.0.0.1:{base + 10 * i}" in banner
        urls = [f"tcp://127.0.0.1:{base + 10 * i}" for i in range(3)]
        with psepr.connect(urls[0], preset="local") as holder, \
                psepr.connect(urls[2], preset="local") as sender:
            deadline = time.monotonic() + 15
            while True:    # wait until r1 sees the whole mesh
                view = holder.status()
                if sum(r["reachable"] for r in view["routers"]) == 3:
                    break
                assert time.monotonic() < deadline, view
                time.sleep(0.1)
            # (not /example.com/ itself: the farm's own events flow below it)
            lease = holder.lease("/example.com/heartbeat/", propagated=True)
            sender.send("/example.com/heartbeat/x.example.com/", {"load": 0.4}, type="heartbeat")
            ev = lease.receive(timeout=5)
            assert ev.payload == {"load": 0.4} and ev.type == "heartbeat"
            # PLDB remembers what this host's sensors published (monitors start
            # after their supervisors' back-off: ask until they answer)
            node = f"/example.com/node/{socket.gethostname()}/"
            assert node in banner
            deadline = time.monotonic() + 30
            while True:
                try:
                    fields = {t.field for t in psepr.pldb.query(holder, node, timeout=1.0)}
                    if {"load_avg", "cpu_count", "kernel"} <= fields:
                        break
                except psepr.NoMonitor:
                    pass
                assert time.monotonic() < deadline, "PLDB of the local farm never answered"
                time.sleep(0.2)
            # The detectors know this host is alive (its agent beats).
            from services.membership import members
            deadline = time.monotonic() + 15
            while True:
                try:
                    view, answer = members(holder, "example.com", timeout=1.0)
                    me = view.members.get(socket.gethostname())
                    if me is not None and me.state == "alive":
                        break
                except psepr.NoRoute:
                    pass
                assert time.monotonic() < deadline, "the local farm's detectors never saw us"
                time.sleep(0.2)
            assert answer["detectors"] == ["d1", "d2", "d3"]
        # A second farm on the same data directory is refused before it starts
        # anything (it used to run, logging every second that its monitors'
        # databases were taken).
        second = subprocess.run([sys.executable, "-m", "psepr.cli", "run", "--listen",
                                 f"tcp://127.0.0.1:{_free_base()}", "--data-dir", str(tmp_path)],
                                cwd=ROOT, capture_output=True, text=True, timeout=20)
        assert second.returncode == 2
        assert second.stderr == (f"psepr run: error: the data directory {tmp_path} is in use by "
                                 f"another `psepr run` (process {p.pid}); give this farm its own "
                                 f"--data-dir\n")
    finally:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=20)
    assert p.returncode == 0
    assert "PsEPR local farm stopped." in out
