"""Three hosts, one bus: routers in three network namespaces linked by veth pairs.

The test creates namespaces ``<tag>a``, ``<tag>b``, ``<tag>c`` and two veth
pairs (a-b on 10.231.1.0/24, b-c on 10.231.2.0/24; a and c see each other
only through b), runs one router per namespace on its namespace's address
(``--insecure``: no CURVE on this private test network) and clients inside
each namespace with ``ip netns exec``, then checks that events sent on every
host reach lease holders on every host, exactly once.  Everything it created
is removed afterwards.  Where namespaces cannot be created (not root, no
iproute2) the test fails and says why: it never passes silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TAG = f"pt{os.getpid() % 100000}"
HOSTS = {"a": "10.231.1.1", "b": "10.231.1.2", "c": "10.231.2.2"}
B2 = "10.231.2.1"     # b's address on the b-c link


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


def _ns(h: str) -> str:
    return f"{TAG}{h}"


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.fail("network namespaces need iproute2's `ip` (apt-get install -y iproute2; "
                    "`make test` installs it)")
    if os.geteuid() != 0:
        pytest.fail("creating network namespaces needs root (run the suite as root, as CI does)")
    made: list[str] = []
    try:
        for h in "abc":
            _ip("netns", "add", _ns(h))
            made.append(_ns(h))
            _ip("-n", _ns(h), "link", "set", "lo", "up")
        for (x, y, ax, ay) in (("a", "b", HOSTS["a"], HOSTS["b"]), ("b", "c", B2, HOSTS["c"])):
            vx, vy = f"{TAG}{x}{y}", f"{TAG}{y}{x}"
            _ip("link", "add", vx, "netns", _ns(x), "type", "veth", "peer", "name", vy,
                "netns", _ns(y))
            _ip("-n", _ns(x), "addr", "add", f"{ax}/24", "dev", vx)
            _ip("-n", _ns(y), "addr", "add", f"{ay}/24", "dev", vy)
            _ip("-n", _ns(x), "link", "set", vx, "up")
            _ip("-n", _ns(y), "link", "set", vy, "up")
    except RuntimeError as exc:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        pytest.fail(f"cannot create network namespaces here: {exc}")
    yield
    for ns in made:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _in(h: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", _ns(h), sys.executable, "-m", "psepr.cli",
                             *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def _wait_line(p: subprocess.Popen, needle: str, timeout: float = 20.0,
               stream: str = "stdout") -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = getattr(p, stream).readline()
        if not line:
            raise AssertionError(f"process exited: {p.stderr.read()}")
        if needle in line:
            return line
    raise AssertionError(f"no {needle!r} within {timeout} s")


def test_three_hosts_in_network_namespaces(namespaces):
    procs: list[subprocess.Popen] = []
    try:
        peers = {"a": [], "b": [f"tcp://{HOSTS['a']}:7601"], "c": [f"tcp://{B2}:7601"]}
        listen_peer = {"a": [HOSTS["a"]], "b": [HOSTS["b"], B2], "c": [HOSTS["c"]]}
        for h in "abc":
            args = ["router", "--name", f"r{h}", "--preset", "local", "--insecure",
                    "--listen", f"tcp://{HOSTS[h]}:7600"]
            for addr in listen_peer[h]:
                args += ["--peer-listen", f"tcp://{addr}:7601"]
            for url in peers[h]:
                args += ["--peer", url]
            p = _in(h, *args)
            procs.append(p)
            _wait_line(p, " ready ")
        # Wait until router a sees c (through b).
        deadline = time.monotonic() + 20
        while True:
            st = subprocess.run(["ip", "netns", "exec", _ns("a"), sys.executable, "-m",
                                 "psepr.cli", "status", "--json", "--router",
                                 f"tcp://{HOSTS['a']}:7600"], cwd=ROOT, capture_output=True,
                                text=True, timeout=30)
            if st.returncode == 0:
                view = {r["router"]: r["reachable"] for r in json.loads(st.stdout)["routers"]}
                if view == {"ra": True, "rb": True, "rc": True}:
                    break
            assert time.monotonic() < deadline, f"overlay did not converge: {st.stdout}"
            time.sleep(0.2)
        per_host = 20
        holders = {}
        for h in "abc":
            p = _in(h, "lease", "/t.org/hosts/", "--count", str(3 * per_host), "--timeout", "30",
                    "--router", f"tcp://{HOSTS[h]}:7600")
            procs.append(p)
            holders[h] = p
        for p in holders.values():
            # Printed once every router of the overlay has the lease's interest.
            _wait_line(p, "# leased", stream="stderr")
        for h in "abc":
            out = subprocess.run(["ip", "netns", "exec", _ns(h), sys.executable, "-m",
                                  "psepr.cli", "send", f"/t.org/hosts/{h}/", "--json",
                                  json.dumps({"from": h}), "--count", str(per_host), "-q",
                                  "--router", f"tcp://{HOSTS[h]}:7600"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
        for h, p in holders.items():
            stdout, stderr = p.communicate(timeout=60)
            events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
            ids = [e["id"] for e in events]
            assert len(ids) == 3 * per_host and len(set(ids)) == len(ids), (h, len(ids), stderr)
            by = {}
            for e in events:
                by[e["payload"]["from"]] = by.get(e["payload"]["from"], 0) + 1
            assert by == {"a": per_host, "b": per_host, "c": per_host}, (h, by)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
