"""Overlay security, router config files and topology events, end to end.

Real `psepr router` child processes on loopback (127.0.0.1, ephemeral ports).
What these tests prove:

* CURVE on peer links: two routers started with ``--curve --key ... --acl ...``
  (keys made by ``psepr keygen``; each router's key and peer endpoint listed in
  the ACL's ``[routers]`` table) link up, and an event sent by a CURVE client at
  router A reaches a CURVE client leasing at router B, stamped with the
  sender's principal.  A router without CURVE, and a CURVE router whose key the
  ACL does not list, both dial A's peer endpoint and never become reachable.
* A router refuses a peer its ACL does not name: with ``[routers.friend]`` only,
  router ``stranger`` dialing it never shows as reachable (in the SDK status
  view nor in ``psepr status --json``) and the refusing router logs
  "peer 'stranger' is not allowed by this router's ACL"; router ``friend``
  dialing the same endpoint is accepted.
* ``psepr router --config FILE`` takes name, preset, authority, listen,
  peer_listen and peers from a ``[router]`` table and links two routers; a bad
  file (unknown key, wrong type) exits non-zero with one error line naming the
  key.
* Topology as events: a lease on ``/psepr.local/_sys/topology/`` at router A
  receives both routers' link-state adverts and, once a client at router B
  leases ``/t.org/x/``, B's interest delta with ``["/t.org/x/", null]`` added.

A dialer refused by its peer's ACL says why in its log and retries at the ping
pace (no hot hello/refusal loop); the refusing router logs it once, not per retry.
A second live router started under a name in use is refused by the neighbour
both dial (the newer run keeps the name, and gets the events); both say why.
Endpoints mixed up say which is which: a router dialing a client endpoint logs
that peers dial ``--peer-listen``, and ``psepr send`` given a peer endpoint exits
1 quoting the router's answer that clients connect to ``--listen``.

Every wait is bounded and polls; nothing sleeps for readiness.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import psepr
from tests.conftest import ROOT, overlay_view, wait_converged

pytestmark = pytest.mark.slow

AUTH = "psepr.local"
TOPOLOGY = f"/{AUTH}/_sys/topology/"
LINKSTATE_TYPE = "http://psepr.org/xs/payload/linkstate"
INTEREST_TYPE = "http://psepr.org/xs/payload/interest"
REFUSED = "peer 'stranger' is not allowed by this router's ACL"


# -- helpers ---------------------------------------------------------------------------------

def _free_port() -> int:
    """A loopback port that was free a moment ago (the ACL needs peer ports in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(name: str, keydir: Path) -> tuple[Path, Path]:
    """Run the real `psepr keygen`; return (public .key, secret .key_secret)."""
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "keygen", name, "--dir",
                          str(keydir)], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pub, sec = keydir / f"{name}.key", keydir / f"{name}.key_secret"
    assert pub.is_file() and sec.is_file()
    return pub, sec


def _wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred()`` until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _never(pred, duration: float, interval: float = 0.1) -> None:
    """Assert ``pred()`` stays falsy for ``duration`` seconds (polled)."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        got = pred()
        assert not got, got
        time.sleep(interval)


def _reachable(view: dict) -> list[str]:
    return sorted(r for r, up in view.items() if up)


def _output(r) -> str:
    return "".join(list(r.output))


def _cli_status(url: str) -> dict:
    """``psepr status --json --router URL``, the real command."""
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "status", "--json", "--router", url],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# -- 1. CURVE on peer links ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def curve_setup(tmp_path_factory):
    """Keys for routers ra, rb, rogue and clients sender, viewer; one shared ACL file.

    The ACL lists ra and rb (keys and peer endpoints, on ports picked now), not
    rogue.  rogue has its own ACL that trusts ra, so it can dial ra.
    """
    d = tmp_path_factory.mktemp("overlay_curve")
    keys = {n: _keygen(n, d / "keys") for n in ("ra", "rb", "rogue", "sender", "viewer")}
    ports = {"ra": _free_port(), "rb": _free_port()}
    peer = {n: f"tcp://127.0.0.1:{p}" for n, p in ports.items()}
    acl = d / "acl.toml"
    acl.write_text(f"""
[principals.sender]
key_file = "keys/sender.key"
send = ["/t.org/"]

[principals.viewer]
key_file = "keys/viewer.key"
lease = ["/t.org/"]

[routers.ra]
key_file = "keys/ra.key"
endpoint = "{peer['ra']}"

[routers.rb]
key_file = "keys/rb.key"
endpoint = "{peer['rb']}"
""")
    rogue_acl = d / "rogue_acl.toml"
    rogue_acl.write_text(f"""
[routers.ra]
key_file = "keys/ra.key"
endpoint = "{peer['ra']}"

[routers.rogue]
key_file = "keys/rogue.key"
""")
    return {"keys": keys, "peer": peer, "acl": acl, "rogue_acl": rogue_acl}


def _curve_view(url: str, keys: dict, router: str) -> dict:
    """``{router: reachable}`` as a CURVE router sees the overlay (asked as 'viewer')."""
    with psepr.connect(url, preset="local", keyfile=keys["viewer"][1],
                       server_key=keys[router][0]) as con:
        st = con.status(timeout=5.0)
    return {r["router"]: r["reachable"] for r in st["routers"]}


def test_curve_peer_link_carries_events_between_curve_clients(start_router, curve_setup):
    keys, peer, acl = curve_setup["keys"], curve_setup["peer"], curve_setup["acl"]
    ra = start_router("--preset", "local", "--curve", "--key", str(keys["ra"][1]),
                      "--acl", str(acl), "--peer-listen", peer["ra"], name="ra")
    rb = start_router("--preset", "local", "--curve", "--key", str(keys["rb"][1]),
                      "--acl", str(acl), "--peer-listen", peer["rb"], "--peer", peer["ra"],
                      name="rb")
    for r in (ra, rb):
        _wait_for(lambda r=r: _reachable(_curve_view(r.url, keys, r.name)) == ["ra", "rb"],
                  15.0, f"{r.name} to see ra and rb reachable over the CURVE peer link")

    viewer = psepr.connect(rb.url, preset="local", keyfile=keys["viewer"][1],
                           server_key=keys["rb"][0])
    sender = psepr.connect(ra.url, preset="local", keyfile=keys["sender"][1],
                           server_key=keys["ra"][0], service="forged")
    try:
        assert viewer.principal == "viewer" and sender.principal == "sender"
        lease = viewer.lease("/t.org/", duration=60, propagated=True)
        for i in range(5):
            sender.send(f"/t.org/n{i}/", {"i": i}, type="t")
        sender.flush(timeout=5.0)
        got = [lease.receive(timeout=5.0) for _ in range(5)]
        assert [e.payload["i"] for e in got] == list(range(5))
        assert {e.from_service for e in got} == {"sender"}    # principal, not "forged"
        with pytest.raises(psepr.TimeoutError):
            lease.receive(timeout=0.2)
    finally:
        sender.close()
        viewer.close()

    # Negative controls on the same CURVE peer endpoint: a router without CURVE,
    # and a CURVE router whose key ra's ACL does not list, never link.
    plain = start_router("--preset", "local", "--peer", peer["ra"], name="plain")
    rogue = start_router("--preset", "local", "--curve", "--key", str(keys["rogue"][1]),
                         "--acl", str(curve_setup["rogue_acl"]), "--peer", peer["ra"],
                         name="rogue")
    _never(lambda: {"plain", "rogue"} & set(_reachable(_curve_view(ra.url, keys, "ra"))), 1.5)
    assert _reachable(overlay_view(plain.url)) == ["plain"]
    assert _reachable(_curve_view(rb.url, keys, "rb")) == ["ra", "rb"]
    for r in (ra, rb, plain, rogue):
        assert r.alive(), _output(r)


# -- 2. a router refuses a peer its ACL does not name ------------------------------------------

@pytest.fixture
def acl_friend_only(tmp_path) -> Path:
    acl = tmp_path / "acl.toml"
    acl.write_text("[routers.friend]\n")
    return acl


def test_router_refuses_peer_not_named_in_acl_and_accepts_named_one(start_router,
                                                                      acl_friend_only):
    a = start_router("--preset", "local", "--peer-listen", "tcp://127.0.0.1:0",
                     "--acl", str(acl_friend_only), name="ra")
    stranger = start_router("--preset", "local", "--peer", a.peer_url, name="stranger")
    _wait_for(lambda: REFUSED in _output(a), 5.0, "ra to log that it refused 'stranger'")
    _never(lambda: "stranger" in overlay_view(a.url), 2.0)
    assert _reachable(overlay_view(stranger.url)) == ["stranger"]
    st = _cli_status(a.url)
    assert st["router"] == "ra"
    assert [r["router"] for r in st["routers"]] == ["ra"]
    assert not any(link["up"] for link in st["links"]), st["links"]

    # Positive control: the same endpoint accepts the router the ACL names.
    friend = start_router("--preset", "local", "--peer", a.peer_url, name="friend")
    wait_converged([a, friend], timeout=10.0)
    st = _cli_status(a.url)
    assert {r["router"]: r["reachable"] for r in st["routers"]} == {"ra": True, "friend": True}
    assert "stranger" not in overlay_view(friend.url)
    for r in (a, stranger, friend):
        assert r.alive(), _output(r)[-2000:]


# -- 3. router TOML config files -----------------------------------------------------------------

class ConfigRouter:
    """``psepr router --config FILE`` and nothing else; awaits its " ready " line."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "psepr.cli", "router", "--config",
                                      str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.url = self.peer_url = None
        result: dict = {}

        def read() -> None:          # readline() cannot time out: read in a thread
            for line in self.proc.stdout:
                self.lines.append(line)
                if " listening on " in line and self.url is None:
                    self.url = line.split(" listening on ")[1].split()[0]
                if " peers on " in line:
                    self.peer_url = line.split(" peers on ")[1].split()[0]
                if " ready " in line:
                    result["ready"] = True

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        try:
            _wait_for(lambda: result.get("ready") or self.proc.poll() is not None, timeout,
                      f"router --config {path} to be ready")
        except AssertionError:
            self.stop()
            raise
        if not result.get("ready"):
            self.stop()
            raise RuntimeError(f"router exited early: {''.join(self.lines)}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def config_router():
    started: list[ConfigRouter] = []

    def _start(path: Path) -> ConfigRouter:
        r = ConfigRouter(path)
        started.append(r)
        return r

    yield _start
    for r in started:
        r.stop()


def test_router_config_file_links_two_routers(tmp_path, config_router):
    f1 = tmp_path / "c1.toml"
    f1.write_text("""
[router]
name = "cfg1"
preset = "local"
authority = "cfg.test"
listen = ["tcp://127.0.0.1:0"]
peer_listen = ["tcp://127.0.0.1:0"]
""")
    r1 = config_router(f1)
    assert r1.url and r1.peer_url
    assert any("psepr router cfg1 ready (authority cfg.test" in line for line in r1.lines)
    f2 = tmp_path / "c2.toml"
    f2.write_text(f"""
[router]
name = "cfg2"
preset = "local"
authority = "cfg.test"
listen = ["tcp://127.0.0.1:0"]
peers = ["{r1.peer_url}"]
""")
    r2 = config_router(f2)
    assert any(f"psepr router cfg2 dialing peer {r1.peer_url}" in line for line in r2.lines)
    for r in (r1, r2):
        _wait_for(lambda r=r: _reachable(overlay_view(r.url)) == ["cfg1", "cfg2"], 10.0,
                  "cfg1 and cfg2 to link")
    # Events cross the link configured only in the file.
    with psepr.connect(r2.url, preset="local") as c2, psepr.connect(r1.url, preset="local") as c1:
        lease = c2.lease("/t.org/", duration=60, propagated=True)
        c1.send("/t.org/a/", {"k": 1})
        c1.flush(timeout=5.0)
        assert lease.receive(timeout=5.0).payload == {"k": 1}


@pytest.mark.parametrize("body, key", [
    ('colour = "red"', "router.colour"),                          # unknown key
    ('peer_ping = "fast"', "router.peer_ping"),                   # string for a number
    ('peers = "tcp://127.0.0.1:1"', "router.peers"),              # string for a list
    ("name = 7", "router.name"),                                  # number for a string
    ("curve = 1", "router.curve"),                                # number for a boolean
], ids=["unknown-key", "number", "list", "string", "bool"])
def test_bad_router_config_file_exits_with_one_line_naming_the_key(tmp_path, body, key):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[router]\nlisten = ["tcp://127.0.0.1:0"]\n{body}\n')
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "router", "--config", str(bad)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("psepr router: error: "), lines[0]
    assert key in lines[0] and str(bad) in lines[0], lines[0]
    assert "ready" not in res.stdout


# -- 4. topology as events -----------------------------------------------------------------------

def _collect_until(lease, pred, timeout: float, what: str) -> list:
    """Receive events until ``pred(events)`` holds; bounded by ``timeout``."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not pred(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; got "
                                 f"{[(e.channel.text, e.type, e.payload) for e in got]}")
        try:
            got.append(lease.receive(timeout=min(left, 0.5)))
        except psepr.TimeoutError:
            pass
    return got


def test_topology_events_show_linkstate_and_interest(start_router):
    a = start_router("--preset", "local", "--peer-listen", "tcp://127.0.0.1:0", name="ra")
    watcher = psepr.connect(a.url, preset="local", service="watcher")
    try:
        topo = watcher.lease(TOPOLOGY, duration=60)
        # Leased first, so rb's first advert (and ra's, re-originated when the link
        # comes up) arrive fresh rather than after a 5 s refresh.
        b = start_router("--preset", "local", "--peer", a.peer_url, name="rb")

        def linkstate_from(events) -> set:
            return {e.channel.text for e in events if e.type == LINKSTATE_TYPE}

        want = {f"{TOPOLOGY}ra/", f"{TOPOLOGY}rb/"}
        got = _collect_until(topo, lambda ev: want <= linkstate_from(ev), 8.0,
                             "linkstate adverts of ra and rb")
        for e in got:
            assert e.channel.text.startswith(TOPOLOGY)
            assert e.from_service is not None
        wait_converged([a, b], timeout=10.0)

        with psepr.connect(b.url, preset="local", service="holder") as holder:
            holder.lease("/t.org/x/", duration=60, propagated=True)

            def interest_added(events) -> list:
                return [e for e in events
                        if e.type == INTEREST_TYPE and e.channel.text == f"{TOPOLOGY}rb/"
                        and ["/t.org/x/", None] in e.payload.get("add", [])]

            got = _collect_until(topo, interest_added, 8.0,
                                 "rb's interest delta adding /t.org/x/")
            ev = interest_added(got)[0]
            assert ev.payload["r"] == "rb"
            assert ev.payload["full"] is False
    finally:
        watcher.close()


# -- a refused dialer ---------------------------------------------------------------------------

def test_refused_dialer_backs_off_and_logs_the_refusal(start_router, acl_friend_only):
    a = start_router("--preset", "local", "--peer-listen", "tcp://127.0.0.1:0",
                     "--acl", str(acl_friend_only), name="ra")
    stranger = start_router("--preset", "local", "--peer", a.peer_url, name="stranger")
    _wait_for(lambda: REFUSED in _output(a), 5.0, "ra to refuse 'stranger'")

    def refusals() -> int:
        with psepr.connect(a.url, preset="local") as con:
            return con.status()["counters"]["peer_errors"]

    n0, t0 = refusals(), time.monotonic()
    time.sleep(2.0)     # measuring a rate: the window is the point
    rate = (refusals() - n0) / (time.monotonic() - t0)
    # Re-dialing at the ping interval (0.25 s with preset local) gives about 4 a second.
    assert rate < 10, f"{rate:.0f} refused hellos a second"
    _wait_for(lambda: "refused the link" in _output(stranger)
              and "not allowed" in _output(stranger), 5.0, "the dialer to log the refusal")
    # Warnings are not repeated for every retry.
    assert _output(a).count(REFUSED) <= 2


# -- two live routers with one name ---------------------------------------------------------------

def test_second_live_router_with_a_taken_name_is_refused_and_both_say_why(start_router):
    b = start_router("--preset", "local", "--peer-listen", "tcp://127.0.0.1:0", name="rb")
    first = start_router("--preset", "local", "--peer", b.peer_url, name="ra")
    wait_converged([b, first], timeout=10.0)
    # The same name again (a copied configuration): its hello looks like ra's
    # restart, so rb takes it; the first ra, alive, says hello again and is refused.
    second = start_router("--preset", "local", "--peer", b.peer_url, name="ra")
    _wait_for(lambda: "router name 'ra' is taken by another live router" in _output(b),
              5.0, "rb to refuse the older ra")
    _wait_for(lambda: "refused the link" in _output(first)
              and "names must be unique" in _output(first), 5.0, "the older ra to log why")
    _never(lambda: sum(link["up"] for link in _cli_status(b.url)["links"]) != 1, 1.5)
    # One router called ra, the newer run: a lease there gets what is sent at rb.
    with psepr.connect(second.url, preset="local") as holder, \
            psepr.connect(b.url, preset="local") as sender:
        lease = holder.lease("/t.org/twins/", propagated=True)
        sender.send("/t.org/twins/x/", {"k": 1})
        assert lease.receive(timeout=5.0).payload == {"k": 1}
    for r in (b, first, second):
        assert r.alive(), _output(r)[-2000:]


# -- endpoints mixed up ---------------------------------------------------------------------------

def test_client_and_peer_endpoints_mixed_up_say_which_is_which(start_router):
    b = start_router("--preset", "local", "--peer-listen", "tcp://127.0.0.1:0", name="rb")
    # A router whose --peer names rb's client endpoint.
    a = start_router("--preset", "local", "--peer", b.url, name="ra")
    _wait_for(lambda: "PEER_HELLO on a client endpoint: peer routers dial a router's "
                      "--peer-listen endpoint" in _output(a), 5.0, "ra to log where to dial")
    # A client given rb's peer endpoint.
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "send", "/t.org/x/", "--json", "1",
                          "--router", b.peer_url], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 1, res
    assert res.stderr.strip().endswith(f"{b.peer_url} answered: this is a router's peer "
                                       f"endpoint (--peer-listen): clients connect to its "
                                       f"--listen endpoint"), res.stderr
    # Listed first of several, the peer endpoint refuses the HELLO and the client
    # moves on at once (it waited connect_timeout for a WELCOME that never comes).
    t0 = time.monotonic()
    config = psepr.ClientConfig.preset("local", connect_timeout=20.0)
    with psepr.connect([b.peer_url, b.url], config=config) as con:
        assert con.stats()["router"] == "rb"
    assert time.monotonic() - t0 < 10.0         # not the 20 s of connect_timeout
    for r in (a, b):
        assert r.alive(), _output(r)[-2000:]
