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
import threading
import time

import pytest

from tests.conftest import ROOT, wait_for


def _log_time(t: float) -> str:
    """``t`` as the routers' log lines begin (logging's asctime: local time, ms)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t % 1 * 1000):03d}"


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


def _start_routers(procs: list) -> None:
    """One router per namespace (a-b-c chain); returns once router a sees c."""
    peers = {"a": [], "b": [f"tcp://{HOSTS['a']}:7601"], "c": [f"tcp://{B2}:7601"]}
    listen_peer = {"a": [HOSTS["a"]], "b": [HOSTS["b"], B2], "c": [HOSTS["c"]]}
    for h in "abc":
        args = ["-v", "router", "--name", f"r{h}", "--preset", "local", "--insecure",
                "--listen", f"tcp://{HOSTS[h]}:7600"]
        for addr in listen_peer[h]:
            args += ["--peer-listen", f"tcp://{addr}:7601"]
        for url in peers[h]:
            args += ["--peer", url]
        p = _in(h, *args)
        procs.append(p)
        _wait_line(p, " ready ")
    deadline = time.monotonic() + 20
    while True:
        st = _run_in("a", "status", "--json")
        if st.returncode == 0:
            view = {r["router"]: r["reachable"] for r in json.loads(st.stdout)["routers"]}
            if view == {"ra": True, "rb": True, "rc": True}:
                return
        assert time.monotonic() < deadline, f"overlay did not converge: {st.stdout}"
        time.sleep(0.2)


def _run_in(h: str, *cmd: str) -> subprocess.CompletedProcess:
    """Run ``psepr CMD --router <h's router>`` inside namespace ``h``."""
    return subprocess.run(["ip", "netns", "exec", _ns(h), sys.executable, "-m", "psepr.cli",
                           *cmd, "--router", f"tcp://{HOSTS[h]}:7600"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def _stop_all(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_three_hosts_in_network_namespaces(namespaces):
    procs: list[subprocess.Popen] = []
    try:
        _start_routers(procs)
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
            out = _run_in(h, "send", f"/t.org/hosts/{h}/", "--json", json.dumps({"from": h}),
                          "--count", str(per_host), "-q")
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
        _stop_all(procs)


def _collect(p: subprocess.Popen, into: list) -> None:
    """Read a `psepr lease --output payload` process's lines into ``into`` (with times)."""
    def run():
        for line in p.stdout:
            if line.startswith("{"):
                into.append((time.monotonic(), json.loads(line)))
    threading.Thread(target=run, daemon=True).start()


def _first(seen: list, host: str, state: str, after: float) -> float | None:
    return next((t for t, e in seen if t >= after and e["host"] == host and e["state"] == state),
                None)


def _view_in(h: str) -> dict:
    out = _run_in(h, "members", "--json", "--timeout", "3")
    assert out.returncode == 0, out.stderr
    return {n: m[0] for n, m in json.loads(out.stdout)["view"]["members"].items()}


def _diagnose(seen: dict, since: float, procs: list) -> str:
    """What a failed wait in the partition test saw: the change events on each side,
    each side's answer to `members`, each router's links, and every process's log."""
    out = [f"{h} saw {[(round(t - since, 2), e) for t, e in evs]}" for h, evs in seen.items()]
    for h in "abc":
        for cmd in (("members", "--json", "--timeout", "3"), ("status", "--json")):
            r = _run_in(h, *cmd)
            out.append(f"{h}: psepr {cmd[0]} -> {r.returncode}: {r.stdout.strip()} "
                       f"{r.stderr.strip()}")
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            _, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        out.append(f"--- {' '.join(p.args[6:10])} (exit {p.returncode}):\n{err[-4000:]}")
    return "\n".join(out)


def test_membership_partition_is_reported_honestly_on_each_side_and_heals(namespaces):
    """Cut the b-c link: side {a, b} says c's node failed, side {c} says a's and b's
    nodes failed (each side has a quorum of the detectors it can hear); restore
    the link: both sides report every node alive again."""
    procs: list[subprocess.Popen] = []
    seen = {"a": [], "c": []}
    try:
        _start_routers(procs)
        for h in "abc":
            for cmd in (["-v", "detector", "--name", f"d{h}"], ["agent", "--host", f"n{h}",
                                                         "--no-sensors"]):
                p = _in(h, *cmd, "--preset", "local", "--router", f"tcp://{HOSTS[h]}:7600")
                procs.append(p)
                _wait_line(p, "(ready)")
        for h in seen:
            p = _in(h, "lease", "/example.com/farm/membership/", "--type", "membership",
                    "--output", "payload", "--router", f"tcp://{HOSTS[h]}:7600")
            procs.append(p)
            _collect(p, seen[h])
        alive = {"na": "alive", "nb": "alive", "nc": "alive"}
        wait_for("every node alive seen from a", lambda: _view_in("a") == alive, 20)

        cut = time.monotonic()
        _ip("-n", _ns("b"), "link", "set", f"{TAG}bc", "down")
        wait_for("a's side: nc failed", lambda: _first(seen["a"], "nc", "failed", cut), 15)
        wait_for("c's side: na and nb failed", lambda: _first(seen["c"], "na", "failed", cut)
              and _first(seen["c"], "nb", "failed", cut), 15)
        print(f"\npartition: a's side declared nc failed after "
              f"{_first(seen['a'], 'nc', 'failed', cut) - cut:.2f} s; c's side declared na "
              f"failed after {_first(seen['c'], 'na', 'failed', cut) - cut:.2f} s")
        assert _view_in("a") == {"na": "alive", "nb": "alive", "nc": "failed"}
        assert _view_in("c") == {"na": "failed", "nb": "failed", "nc": "alive"}
        assert not _first(seen["a"], "na", "failed", cut) and \
            not _first(seen["c"], "nc", "failed", cut)

        healed = time.monotonic()
        _ip("-n", _ns("b"), "link", "set", f"{TAG}bc", "up")

        def why() -> str:
            return _diagnose(seen, cut, procs)
        wait_for("a's side: nc back", lambda: _first(seen["a"], "nc", "recovered", healed), 30,
                 why)
        wait_for("c's side: na and nb back", lambda: _first(seen["c"], "na", "recovered", healed)
              and _first(seen["c"], "nb", "recovered", healed), 30, why)
        print(f"healed: both sides saw every node recovered after "
              f"{time.monotonic() - healed:.2f} s")
        wait_for("one view, all alive, on both sides",
              lambda: _view_in("a") == alive and _view_in("c") == alive, 15)
        # The cut link went down once on each side, and came back without a flap.
        # Only what the routers logged before they were stopped counts: a router
        # stopped a moment after its peer may log that peer's disconnection.
        stopping = _log_time(time.time())
        routers = procs[:3]
        for p in routers:
            p.terminate()
        logs = {p.args[10]: [l for l in p.communicate(timeout=20)[1].splitlines()
                             if l[:23] < stopping] for p in routers}
        for name, peer in (("rb", "rc"), ("rc", "rb")):
            lines = [l for l in logs[name] if f"peer link to {peer} " in l]
            assert [" down: " in l for l in lines] == [False, True, False], (name, lines)
        assert not [l for l in logs["ra"] if " down: " in l], logs["ra"]
    finally:
        _stop_all(procs)
