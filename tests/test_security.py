"""Security (issue 2, acceptance 5), with real router processes on loopback.

What these tests prove:

* ``psepr keygen`` makes CURVE key pairs that a router started with
  ``--curve --key ... --acl ...`` and the SDK (``keyfile=``, ``server_key=``) accept.
* The principal is the ACL name bound to the client's key: events arrive with
  ``from.service`` set to it, whatever service name the client declares.
* A client whose key the ACL does not name cannot connect (``ConnectionLost``);
  neither can a client without CURVE.
* Sending or leasing outside one's grants raises ``AccessDenied`` naming the
  channel, and a denied event reaches nobody, not even a holder of a covering lease.
* Request/reply works for principals through their implicit inbox grants.
* Without ``--curve`` the router refuses a non-loopback listen address unless
  ``--insecure`` is given.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

import psepr

from .conftest import ROOT

SENSOR_SEND = "/example.com/node/"
AUTHORITY = "/example.com/"


def _keygen(name: str, keydir: Path) -> tuple[Path, Path]:
    """Run the real `psepr keygen` command; return (public file, secret file)."""
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "keygen", name, "--dir", str(keydir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    pub, sec = keydir / f"{name}.key", keydir / f"{name}.key_secret"
    assert pub.is_file() and sec.is_file()
    return pub, sec


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def keys(keydir):
    """Key pairs for the router, 'sensor', 'viewer' and an unlisted 'stranger'."""
    return {name: _keygen(name, keydir / "keys")
            for name in ("router", "sensor", "viewer", "stranger")}


@pytest.fixture(scope="module")
def acl_file(keydir, keys):
    acl = keydir / "acl.toml"
    acl.write_text(f"""
[principals.sensor]
key_file = "keys/sensor.key"
send = ["{SENSOR_SEND}"]
lease = ["{AUTHORITY}"]

[principals.viewer]
key_file = "keys/viewer.key"
lease = ["{AUTHORITY}"]
""")
    return acl


@pytest.fixture
def secure_router(start_router, keys, acl_file):
    return start_router("--curve", "--key", str(keys["router"][1]), "--acl", str(acl_file),
                        name="sec")


@pytest.fixture
def connect_as(secure_router, keys):
    """connect_as(name, **kw) -> a CURVE connection with that key pair; closed afterwards."""
    opened = []

    def _connect(name: str, **kw):
        con = psepr.connect(secure_router.url, keyfile=keys[name][1],
                            server_key=keys["router"][0], **kw)
        opened.append(con)
        return con

    yield _connect
    for con in opened:
        con.close()


def test_keygen_refuses_to_overwrite_without_force(keydir, keys):
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "keygen", "sensor", "--dir",
                          str(keydir / "keys")], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 2
    assert "--force" in res.stderr


def test_principal_is_the_acl_name_not_the_declared_service(connect_as):
    sensor = connect_as("sensor", service="forged-name")
    viewer = connect_as("viewer")
    assert sensor.principal == "sensor"
    assert viewer.principal == "viewer"
    lease = viewer.lease(AUTHORITY, duration=60)
    sensor.send("/example.com/node/n1/", {"load": 0.4}, type="load")
    sensor.flush()
    ev = lease.receive(timeout=5.0)
    assert ev.from_service == "sensor"
    assert ev.from_instance == sensor.instance
    assert ev.payload == {"load": 0.4}


# Each failed handshake is named: before, all three ended in the same "could not
# reach any router ... (is `psepr router` running there? does it need CURVE keys?)".

def test_unknown_key_cannot_connect_and_is_told_so(secure_router, keys):
    # The router's answer (ZAP status 400) names the cause; should the connection close
    # before the client reads it, the client still points at the ACL.
    with pytest.raises(psepr.ConnectionLost, match=r"the router refused this client's CURVE "
                       r"key \(ZAP status 400\): is its public key in the router's ACL\?"
                       r"|this client's key in its ACL\?"):
        psepr.connect(secure_router.url, keyfile=keys["stranger"][1],
                      server_key=keys["router"][0], preset="local")
    assert secure_router.alive()


def test_client_without_curve_cannot_connect_and_is_told_so(secure_router):
    # Which failure the client sees is a race (the router may close before the client
    # reads the mismatch): both words name the keys it lacks.
    with pytest.raises(psepr.ConnectionLost, match="a --curve router needs --key and "
                                                   "--server-key"):
        psepr.connect(secure_router.url, preset="local")
    assert secure_router.alive()


def test_a_wrong_server_key_is_named(secure_router, keys):
    with pytest.raises(psepr.ConnectionLost, match="is --server-key this router's public key"):
        psepr.connect(secure_router.url, keyfile=keys["sensor"][1],
                      server_key=keys["stranger"][0], preset="local")


async def test_the_asyncio_client_names_a_refused_key_too(secure_router, keys):
    import psepr.aio
    with pytest.raises(psepr.ConnectionLost, match="refused this client's CURVE key"):
        await psepr.aio.connect(secure_router.url, keyfile=keys["stranger"][1],
                                server_key=keys["router"][0], preset="local")


def test_send_outside_grants_is_denied_and_delivered_to_nobody(connect_as):
    sensor = connect_as("sensor")
    viewer = connect_as("viewer")
    lease = viewer.lease(AUTHORITY, duration=60)     # covers the denied channel too
    sensor.send("/example.com/secret/", {"n": "denied"})
    with pytest.raises(psepr.AccessDenied) as info:
        sensor.flush()
    assert info.value.channel == "/example.com/secret/"
    assert "/example.com/secret/" in str(info.value)
    # A permitted send right after: it is the first thing the viewer gets, so the
    # denied event (sent earlier on the same connection) was never delivered.
    sensor.send("/example.com/node/n1/", {"n": "allowed"})
    sensor.flush()
    assert lease.receive(timeout=5.0).payload == {"n": "allowed"}
    with pytest.raises(psepr.TimeoutError):
        lease.receive(timeout=0.2)


def test_principal_without_send_grants_is_denied(connect_as):
    viewer = connect_as("viewer")
    lease = viewer.lease(AUTHORITY, duration=60)
    viewer.send("/example.com/node/n1/", {"n": 1})
    with pytest.raises(psepr.AccessDenied) as info:
        viewer.flush()
    assert info.value.channel == "/example.com/node/n1/"
    with pytest.raises(psepr.TimeoutError):
        lease.receive(timeout=0.2)


def test_only_denied_entries_of_a_batch_are_dropped(connect_as):
    sensor = connect_as("sensor")
    viewer = connect_as("viewer")
    lease = viewer.lease(AUTHORITY, duration=60)
    for i in range(10):   # one SEND batch, alternating allowed and denied channels
        sensor.send("/example.com/node/n1/" if i % 2 == 0 else "/example.com/other/", {"i": i})
    with pytest.raises(psepr.AccessDenied):
        sensor.flush()
    got = [lease.receive(timeout=5.0).payload["i"] for _ in range(5)]
    assert got == [0, 2, 4, 6, 8]
    with pytest.raises(psepr.TimeoutError):
        lease.receive(timeout=0.2)


@pytest.mark.parametrize("channel", ["/other.org/", "/", "/other.org/_inbox/sensor/"])
def test_lease_outside_grants_is_denied(connect_as, channel):
    viewer = connect_as("viewer")     # may lease /example.com/ and its own inboxes only
    with pytest.raises(psepr.AccessDenied) as info:
        viewer.lease(channel, duration=60)
    assert info.value.channel == channel
    assert channel in str(info.value)


def test_implicit_inbox_grant_lets_a_principal_lease_its_own_inbox(connect_as):
    viewer = connect_as("viewer")
    lease = viewer.lease("/other.org/_inbox/viewer/x/", duration=60)
    assert lease.granted > 0


def test_request_reply_through_implicit_inbox_grants(connect_as):
    sensor = connect_as("sensor")
    viewer = connect_as("viewer")
    # The viewer answers requests on a channel it may lease but not send to; its
    # reply goes to the sensor's inbox (any principal may send to an inbox).
    service = viewer.lease("/example.com/node/echo/", duration=60)
    errors: list[BaseException] = []

    def responder() -> None:
        try:
            req = service.receive(timeout=10.0)
            viewer.reply(req, {"echo": req.payload, "by": viewer.principal})
            viewer.flush()
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    t = threading.Thread(target=responder, daemon=True)
    t.start()
    reply = sensor.request("/example.com/node/echo/", {"q": 1}, timeout=10.0)
    t.join(10.0)
    assert not errors, errors
    assert reply.payload == {"echo": {"q": 1}, "by": "viewer"}
    assert reply.from_service == "viewer"
    assert reply.channel.parts[1:3] == ("_inbox", "sensor")


def test_router_refuses_non_loopback_listen_without_curve():
    res = subprocess.run([sys.executable, "-m", "psepr.cli", "router", "--name", "open",
                          "--listen", "tcp://0.0.0.0:0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode != 0
    assert "--insecure" in res.stderr
    assert "0.0.0.0" in res.stderr
    assert "listening on" not in res.stdout


def test_router_listens_on_non_loopback_with_insecure(start_router):
    r = start_router("--listen", "tcp://0.0.0.0:0", "--insecure", name="open")
    port = r.url.rsplit(":", 1)[1]
    assert r.url.startswith("tcp://0.0.0.0:")
    with psepr.connect(f"tcp://127.0.0.1:{port}") as con:
        lease = con.lease("/example.com/", duration=60)
        con.send("/example.com/x/", {"ok": True})
        assert lease.receive(timeout=5.0).payload == {"ok": True}
