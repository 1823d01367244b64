"""The `psepr` command as a user runs it: real subprocesses against a real router.

Proves that ``psepr lease`` prints the events ``psepr send`` sends (JSON and XML
payloads, JSON and PsEPR-XML output), ``psepr stats`` prints the router's counters,
``psepr keygen`` writes a CURVE key pair, ``psepr router`` prints the address it bound
and refuses an unauthenticated non-loopback listen address, ``--help`` works, and
every error is one line on stderr with exit status 2 (usage) or 1 (run time).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import orjson
import pytest
import zmq.auth

import psepr
from tests.conftest import ROOT, raw_send

CH = "/cli.example.com/heartbeat/"


def _env(router_url: str | None) -> dict:
    env = {**os.environ}
    env.pop("PSEPR_SERVERS_FILE", None)
    if router_url is None:
        env.pop("PSEPR_ROUTERS", None)
    else:
        env["PSEPR_ROUTERS"] = router_url
    return env


def psepr_cmd(*args: str, router: str | None = None, timeout: float = 20.0,
              **kw) -> subprocess.CompletedProcess:
    """Run ``psepr ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "psepr.cli", *args], cwd=ROOT,
                          env=_env(router), capture_output=True, text=True, timeout=timeout,
                          **kw)


class LeaseProc:
    """A running ``psepr lease`` whose '# leased' status line was seen."""

    def __init__(self, router: str, *args: str, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "psepr.cli", "lease", *args],
                                     cwd=ROOT, env=_env(router), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        self.status = ""
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()   # the status line comes promptly, or EOF
            if not line:
                break
            if line.startswith("# leased"):
                self.status = line
                return
        self.stop()
        raise AssertionError(f"psepr lease never reported its lease (rc={self.proc.poll()})")

    def finish(self, timeout: float = 10.0) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=5)


@pytest.fixture
def lease_procs():
    started: list[LeaseProc] = []

    def _start(*a, **kw) -> LeaseProc:
        p = LeaseProc(*a, **kw)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("psepr "), lines[0]
    return lines[0]


def _free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# -- send / lease ------------------------------------------------------------------------------

def test_lease_count_one_prints_the_json_event_sent(router_proc, lease_procs):
    lp = lease_procs(router_proc.url, CH, "--count", "1", "--type", "heartbeat")
    assert CH in lp.status and "type heartbeat" in lp.status
    sent = psepr_cmd("send", CH + "x.example.com/", "--type", "heartbeat", "--json",
                     '{"load": 0.4}', router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    eid = sent.stdout.strip()
    rc, out, err = lp.finish()
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    ev = psepr.from_json(lines[0])
    assert ev.id == eid and ev.payload == {"load": 0.4} and ev.type == "heartbeat"
    assert ev.channel.text == CH + "x.example.com/"
    assert ev.from_service == "anonymous"


def test_xml_payload_is_printed_as_psepr_xml(router_proc, lease_procs):
    lp = lease_procs(router_proc.url, CH, "--count", "1", "--output", "xml")
    xml = '<payload xmlns="heartbeat"><load>0.4</load></payload>'
    sent = psepr_cmd("send", CH + "x.example.com/", "--xml", xml, "--service", "probe",
                     router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    rc, out, err = lp.finish()
    assert rc == 0, err
    line, = out.splitlines()
    assert line.startswith('<event xmlns="http://psepr.org/xs/event">')
    ev = psepr.from_xml(line)
    assert ev.id == sent.stdout.strip()
    assert ev.format == "xml" and ev.type == "heartbeat"
    assert ev.xml_element().find("{heartbeat}load").text == "0.4"
    assert ev.from_service == "probe"


def test_json_event_printed_as_xml_round_trips(router_proc, lease_procs):
    lp = lease_procs(router_proc.url, CH, "--count", "1", "--output", "xml")
    sent = psepr_cmd("send", CH, "--type", "t", "--json", '{"a": [1, "two"]}',
                     router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    rc, out, err = lp.finish()
    assert rc == 0, err
    ev = psepr.from_xml(out.strip())
    assert ev.payload == {"a": [1, "two"]} and ev.type == "t"


def test_lease_count_two_with_payload_output(router_proc, lease_procs):
    lp = lease_procs(router_proc.url, CH, "--count", "2", "--output", "payload")
    sent = psepr_cmd("send", CH, "--attribute", "load_avg=0.5", "--expire", "60", "--count", "2",
                     router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    rc, out, err = lp.finish()
    assert rc == 0, err
    payloads = [orjson.loads(line) for line in out.splitlines()]
    assert len(payloads) == 2
    assert payloads[0]["field"] == "load_avg" and payloads[0]["value"] == 0.5


def test_lease_stops_quietly_when_its_reader_leaves(router_proc, lease_procs):
    # `psepr lease CH | head -1`: once head exits, the next event finds the pipe closed.
    lp = lease_procs(router_proc.url, CH)
    assert psepr_cmd("send", CH, "--json", "1", router=router_proc.url).returncode == 0
    assert psepr.from_json(lp.proc.stdout.readline()).payload == 1
    lp.proc.stdout.close()
    deadline = time.monotonic() + 10
    while lp.proc.poll() is None and time.monotonic() < deadline:
        psepr_cmd("send", CH, "--json", "2", router=router_proc.url)
    assert lp.proc.wait(5) == 141
    assert lp.proc.stderr.read() == ""       # no traceback, no error line


def test_lease_timeout_is_a_one_line_error(router_proc):
    r = psepr_cmd("lease", CH, "--timeout", "0.3", "--quiet", router=router_proc.url)
    assert r.returncode == 1
    assert "no event on " + CH in _one_line_error(r)


# -- stats --------------------------------------------------------------------------------------

def test_stats_prints_counters(router_proc):
    r = psepr_cmd("stats", router=router_proc.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("router r1 (authority psepr.local)")
    for key in ("connections", "leases", "events_in", "events_out", "dropped"):
        assert re.search(rf"^\s+{key}\s+\d+$", r.stdout, re.M), key


def test_stats_json_counts_the_events_sent(router_proc):
    assert psepr_cmd("send", CH, "--count", "3", "--json", "1",
                     router=router_proc.url).returncode == 0
    r = psepr_cmd("stats", "--json", router=router_proc.url)
    assert r.returncode == 0, r.stderr
    st = orjson.loads(r.stdout)
    assert st["router"] == "r1" and st["events_in"] == 3 and st["connections"] == 1


# -- keygen -------------------------------------------------------------------------------------

def test_keygen_writes_a_key_pair(tmp_path):
    r = psepr_cmd("keygen", "alice", "--dir", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    pub, sec = tmp_path / "keys" / "alice.key", tmp_path / "keys" / "alice.key_secret"
    public, none = zmq.auth.load_certificate(str(pub))
    public2, secret = zmq.auth.load_certificate(str(sec))
    assert none is None and public == public2 and secret is not None
    assert public.decode() in r.stdout
    assert sec.stat().st_mode & 0o077 == 0
    again = psepr_cmd("keygen", "alice", "--dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "--force" in _one_line_error(again)
    # A name that is not a file name: one line saying so, nothing written.
    for name in ("a/b", ""):
        bad = psepr_cmd("keygen", name, "--dir", str(tmp_path / "other"))
        assert bad.returncode == 2 and "plain file name" in _one_line_error(bad), bad.stderr
    assert not (tmp_path / "other").exists()


def test_keygen_never_leaves_the_secret_key_readable_by_others(tmp_path, monkeypatch):
    # pyzmq writes both files with the process umask; the secret one was made
    # private only by a chmod afterwards.
    import argparse

    import zmq.auth

    from psepr.cli import cmd_keygen
    real = zmq.auth.create_certificates
    seen = {}

    def create(d, name):
        public, secret = real(d, name)
        seen["mode"] = os.stat(secret).st_mode & 0o777      # before anything else runs
        return public, secret

    monkeypatch.setattr(zmq.auth, "create_certificates", create)
    old = os.umask(0o022)
    try:
        assert cmd_keygen(argparse.Namespace(name="bob", dir=str(tmp_path), force=False)) == 0
    finally:
        os.umask(old)
    assert seen["mode"] & 0o077 == 0, oct(seen["mode"])
    assert (tmp_path / "bob.key").stat().st_mode & 0o777 == 0o644
    assert os.umask(0o022) == 0o022        # the process's umask is back


# -- errors -------------------------------------------------------------------------------------

def test_unknown_arguments_point_at_the_commands_own_help():
    for args, prog in ((("detector", "--bogus"), "psepr detector"),
                       (("pldb", "get", "/x/", "--bogus"), "psepr pldb get"),
                       (("send", "/x/", "--json", "1", "extra"), "psepr send")):
        r = psepr_cmd(*args, timeout=10)
        assert r.returncode == 2, args
        line = _one_line_error(r)
        assert line.startswith(f"{prog}: error: unrecognized arguments: ") and \
            line.endswith(f"(see {prog} --help)"), line


def test_invalid_channel_is_a_usage_error(router_proc):
    r = psepr_cmd("send", "not-a-channel", "--json", "1", router=router_proc.url)
    assert r.returncode == 2
    assert "not-a-channel" in _one_line_error(r)


def test_invalid_json_is_a_usage_error():
    r = psepr_cmd("send", CH, "--json", "{nope", router=_free_url())
    assert r.returncode == 2
    assert "--json is not valid JSON" in _one_line_error(r)


def test_no_router_is_a_runtime_error_with_a_clear_message():
    url = _free_url()
    r = psepr_cmd("send", CH, "--json", "1", router=url)
    assert r.returncode == 1
    line = _one_line_error(r)
    assert "could not reach any router" in line and url in line


def test_lease_with_no_router_is_one_line_error():
    url = _free_url()
    r = psepr_cmd("lease", CH, router=url)
    assert r.returncode == 1
    line = _one_line_error(r)
    assert "could not reach any router" in line and url in line

def test_router_flag_overrides_environment(router_proc):
    r = psepr_cmd("stats", "--json", "--router", router_proc.url, router=_free_url())
    assert r.returncode == 0, r.stderr
    assert orjson.loads(r.stdout)["router"] == "r1"


# -- router -------------------------------------------------------------------------------------

def test_router_refuses_non_loopback_without_curve():
    r = psepr_cmd("router", "--listen", "tcp://0.0.0.0:0", timeout=10)
    assert r.returncode == 2
    line = _one_line_error(r)
    assert "--insecure" in line and "0.0.0.0" in line


def test_router_refuses_settings_that_are_not_positive_numbers():
    for flag, value in (("--max-lease", "-5"), ("--stats-interval", "0"),
                        ("--max-lease", "nan")):
        r = psepr_cmd("router", "--listen", "tcp://127.0.0.1:0", flag, value, timeout=10)
        assert r.returncode == 2, (flag, value, r.stdout)
        line = _one_line_error(r)
        assert flag in line and value in line, line
    # The same values from a config file (or the Python API) are refused by the
    # config itself, naming the setting.
    from routers.config import RouterConfig
    with pytest.raises(psepr.errors.ConfigError, match="max_lease"):
        RouterConfig(max_lease=-5.0)



@pytest.mark.parametrize("flag, value", [("--name", "a b"), ("--name", "r/1"),
                                         ("--authority", "/x/"), ("--authority", "ex*")])
def test_router_name_and_authority_are_named_when_they_cannot_be_channel_elements(flag, value):
    # They read as "invalid channel '/psepr.local/_sys/routers/a b/stats/': ...".
    r = psepr_cmd("router", "--listen", "tcp://127.0.0.1:0", flag, value, timeout=10)
    assert r.returncode == 2
    assert _one_line_error(r).endswith(
        f"router setting {flag[2:]} {value!r} must be printable text without whitespace, "
        f"'/' or '*' (one channel element)")

def test_router_refuses_an_endpoint_listed_twice_and_dialing_itself():
    peer = "tcp://127.0.0.1:7797"
    r = psepr_cmd("router", "--listen", "tcp://127.0.0.1:0", "--peer", peer, "--peer", peer,
                  timeout=10)
    assert r.returncode == 2
    assert _one_line_error(r).endswith(f"router setting peers lists {peer} twice")
    r = psepr_cmd("router", "--listen", "tcp://127.0.0.1:0", "--peer-listen", peer,
                  "--peer", peer, timeout=10)
    assert r.returncode == 2
    assert "this router's own peer endpoint" in _one_line_error(r)
    # The same endpoint for clients and peers read as "in use (is another router
    # listening there?)", sending the operator to look for a router that is not there.
    r = psepr_cmd("router", "--listen", peer, "--peer-listen", peer, timeout=10)
    assert r.returncode == 2
    assert _one_line_error(r).endswith(f"listen and peer_listen both name {peer}: clients and "
                                       f"peers need an endpoint each")
    r = psepr_cmd("router", "--listen", "tcp://127.0.0.1:0", "--peer", "tcp://127.0.0.1:70000",
                  timeout=10)
    assert r.returncode == 2 and "tcp://127.0.0.1:70000" in _one_line_error(r)
    from routers.config import RouterConfig
    for field in ("listen", "peer_listen"):
        with pytest.raises(psepr.errors.ConfigError, match=f"{field} lists"):
            RouterConfig(**{field: ("tcp://127.0.0.1:1", "tcp://127.0.0.1:1")})
        RouterConfig(**{field: ("tcp://127.0.0.1:0", "tcp://127.0.0.1:0")})   # two ports


def test_router_endpoints_are_checked_where_they_are_given(monkeypatch):
    from psepr.config import router_list
    # libzmq connects to all of these without a word (and the client's I/O thread
    # then crashed opening its socket, or waited for a port that cannot exist).
    for bad in ("127.0.0.1:7600", "tcp://127.0.0.1", "tcp://127.0.0.1:7600,",
                "tcp://127.0.0.1:70000", "tcp://:7600", "tcp://::1:7600", "udp://h:1"):
        with pytest.raises(psepr.errors.ConfigError, match=re.escape(bad)):
            router_list(["tcp://127.0.0.1:7600", bad])
        with pytest.raises(psepr.errors.ConfigError, match=re.escape(bad)):
            psepr.connect([bad])
    assert router_list("tcp://127.0.0.1:7600, tcp://[::1]:7610 ipc:///tmp/r.sock") == \
        ["tcp://127.0.0.1:7600", "tcp://[::1]:7610", "ipc:///tmp/r.sock"]
    monkeypatch.setenv("PSEPR_ROUTERS", "tcp://127.0.0.1:7600,tcp://127.0.0.1")
    with pytest.raises(psepr.errors.ConfigError, match="got 'tcp://127.0.0.1'$"):
        router_list()
    r = psepr_cmd("send", "/x/", "--json", "1", "--router", "tcp://127.0.0.1:7600,", timeout=10)
    assert r.returncode == 2
    assert "tcp://127.0.0.1:7600," in _one_line_error(r)


def test_counts_and_seconds_are_checked_before_connecting():
    # No router runs at this address: a bad number must not first wait for one.
    url = _free_url()
    for args in (("send", "/x/", "--json", "1", "--count", "0"),
                 ("send", "/x/", "--json", "1", "--timeout", "-1"),
                 ("lease", "/x/", "--count", "-3"), ("lease", "/x/", "--duration", "inf"),
                 ("lease", "/x/", "--duration", "abc"), ("request", "/x/", "--timeout", "0"),
                 ("stats", "--watch", "--count", "0"), ("pldb", "get", "/x/", "--timeout", "nan")):
        t0 = time.monotonic()
        r = psepr_cmd(*args, "--router", url, timeout=10)
        assert r.returncode == 2, (args, r.stderr)
        line = _one_line_error(r)
        assert args[-2] in line and "--help" in line, line
        assert time.monotonic() - t0 < 2.5, args     # connecting alone gives up after 3 s


def test_names_that_become_channel_elements_are_named_by_their_option():
    # They used to be refused as "invalid channel '/a b/farm/...'" (or, for a PLDB
    # monitor's --host, accepted with the space), naming a channel the user never typed.
    url = _free_url()
    for args, flag, value in ((("agent",), "--authority", "a b"),
                              (("agent",), "--host", "a/b"),
                              (("sensors", "--once"), "--host", "my host"),
                              (("detector",), "--name", "x y"),
                              (("detector",), "--authority", ""),
                              (("members",), "--authority", "*"),
                              (("pldb", "monitors"), "--authority", "a b"),
                              (("pldb", "monitor", "--channel", "/x/"), "--host", "h h")):
        t0 = time.monotonic()
        r = psepr_cmd(*args, flag, value, "--router", url, timeout=10)
        assert r.returncode == 2, (args, r.stderr)
        line = _one_line_error(r)
        assert f"argument {flag}: {value!r} must be one channel element" in line, line
        assert time.monotonic() - t0 < 2.5, args


def test_expire_without_an_attribute_is_refused():
    # It was silently dropped: the event went out with no expiry anywhere.
    url = _free_url()
    for cmd in ("send", "request"):
        r = psepr_cmd(cmd, "/x/", "--json", "1", "--expire", "60", "--router", url, timeout=10)
        assert r.returncode == 2
        assert "--expire is an attribute's expiry" in _one_line_error(r)


def test_config_dataclasses_refuse_numbers_that_would_misbehave_later():
    from psepr import ClientConfig
    from psepr.errors import ConfigError
    from routers.config import RouterConfig
    for cls, bad in ((ClientConfig, {"lease_window": 0}), (ClientConfig, {"ping_interval": -1.0}),
                     (ClientConfig, {"batch_events": 2.5}), (ClientConfig, {"dead_after": True}),
                     (ClientConfig, {"renew_fraction": 1.0}),
                     (RouterConfig, {"conn_queue": 0}), (RouterConfig, {"max_lease": float("inf")}),
                     (RouterConfig, {"peer_ping": float("nan")})):
        name = next(iter(bad))
        with pytest.raises(ConfigError, match=name):
            cls(**bad)
    # Every preset is itself valid, and whole numbers are fine where seconds are asked.
    for cls in (ClientConfig, RouterConfig):
        for preset in cls.PRESETS:
            cls.preset(preset)
    assert RouterConfig(max_lease=60).max_lease == 60


def test_service_and_instance_names_are_checked_before_connecting():
    # The router refuses these in HELLO; connect() used to wait 3 s to say so.
    from psepr import ClientConfig
    from psepr.errors import ConfigError
    url = _free_url()
    for kw in ({"service": "a b"}, {"instance": "x/y"}, {"service": "s*"}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            ClientConfig(**kw)
        t0 = time.monotonic()
        with pytest.raises(ConfigError):
            psepr.connect(url, **kw)
        assert time.monotonic() - t0 < 1.0
    with pytest.raises(ConfigError, match="must be a psepr.ClientConfig, got int"):
        psepr.connect(url, config=5)
    r = psepr_cmd("send", "/x/", "--json", "1", "--service", "a b", "--router", url, timeout=10)
    assert r.returncode == 2 and "service 'a b'" in _one_line_error(r)


def test_router_prints_the_bound_address():
    proc = subprocess.Popen([sys.executable, "-m", "psepr.cli", "router", "--listen",
                             "tcp://127.0.0.1:0", "--name", "cli-r"], cwd=ROOT,
                            env=_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = proc.stdout.readline()
        m = re.fullmatch(r"psepr router cli-r listening on tcp://127\.0\.0\.1:(\d+)\n", first)
        assert m and int(m.group(1)) > 0, first
        assert " ready " in proc.stdout.readline()
        url = first.split()[-1]
        with psepr.connect(url) as con:       # the printed address is the one that serves
            assert con.welcome["router"] == "cli-r"
            con.send("/x/", 1)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    # and says it stopped, with what it carried
    assert re.fullmatch(r"psepr router cli-r stopped \(events: \d+ in, \d+ out, 0 dropped\)\n", out), out


# -- help ---------------------------------------------------------------------------------------

def test_help():
    r = psepr_cmd("--help")
    assert r.returncode == 0
    for cmd in ("router", "send", "lease", "stats", "keygen"):
        assert cmd in r.stdout


def test_send_refuses_stdin_that_is_not_utf8_in_one_line():
    r = subprocess.run([sys.executable, "-m", "psepr.cli", "send", "/a/b/", "--xml", "-"],
                       cwd=ROOT, env=_env("tcp://127.0.0.1:9"), input=b'<p xmlns="t">\xff</p>',
                       capture_output=True, timeout=20)
    assert r.returncode == 2
    assert r.stderr == (b"psepr send: error: XML refused: character 13 ('\\udcff') is not "
                        b"text: was the input UTF-8?\n")


def test_send_help():
    r = psepr_cmd("send", "--help")
    assert r.returncode == 0
    for opt in ("--router", "--json", "--xml", "--type", "examples:"):
        assert opt in r.stdout



def test_pldb_get_prints_any_stored_time_and_expiry_on_one_bounded_line(capsys):
    """What a monitor stored is printed whatever its numbers: an expiry of 1e300 s as
    years (not 300 digits), a time past year 9999 as the number (not a traceback)."""
    from pldb.cli import _print_tuples
    from psepr.pldb import Tuple
    now = time.time()
    _print_tuples([Tuple("/a/x/", "far", 1, now - 3 * 86400, 1e300, "s/i", "e1"),
                   Tuple("/a/x/", "odd", 2, 1e20, None, "s/i", "e2"),
                   Tuple("/a/x/", "soon", 3, now + 30, 7200.0, "s/i", "e3")], as_json=False)
    far, odd, soon = capsys.readouterr().out.splitlines()
    assert far.endswith("3.0 d ago)  expires in 3.17e+292 years")
    assert "(time 1e+20, " in odd
    assert re.search(r"\(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d, 30 s ahead\)  expires in 2\.\d h$", soon)


def test_a_port_in_use_is_named_with_its_likely_cause():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        url = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        r = psepr_cmd("router", "--name", "x", "--listen", url)
        assert r.returncode == 2
        assert r.stderr == (f"psepr router: error: cannot listen on {url}: the address is in "
                            f"use (is another router, or `psepr run`, listening there?)\n")
        r = psepr_cmd("run", "--routers", "1", "--listen", url)
        assert r.returncode == 2
        assert r.stderr.endswith(f"listening there?); `psepr run --listen tcp://127.0.0.1:"
                                 f"{held.getsockname()[1] + 100}` would use other ports\n")



def test_an_ipc_path_a_live_router_listens_on_is_not_taken_from_it(tmp_path, start_router):
    # libzmq unlinks the file before binding: a second router took the path over
    # silently, and the first was left with no address.
    url = f"ipc://{tmp_path}/r.sock"
    first = start_router("--listen", url, name="first")
    r = psepr_cmd("router", "--name", "second", "--listen", url)
    assert r.returncode == 2
    assert r.stderr == (f"psepr router: error: cannot listen on {url}: the address is in use "
                        f"(is another router, or `psepr run`, listening there?); ZeroMQ would "
                        f"take the path from it\n")
    with psepr.connect(url, preset="local") as con:
        assert con.stats(timeout=5)["router"] == "first"
    first.stop()
    # The file a stopped router left behind is no obstacle.
    again = start_router("--listen", url, name="again")
    with psepr.connect(url, preset="local") as con:
        assert con.stats(timeout=5)["router"] == "again"
    again.stop()

def test_pldb_monitor_and_get_of_the_root_are_refused_before_anything_is_made(tmp_path):
    # It made `_root.sqlite`, then waited 3 s for a router before refusing "/".
    r = psepr_cmd("pldb", "monitor", "--channel", "/", "--data-dir", str(tmp_path / "d"),
                  router="tcp://127.0.0.1:9")
    assert r.returncode == 2
    assert r.stderr == ("psepr pldb: error: a monitor needs a channel below the root, e.g. "
                        "/example.com/node/\n")
    assert not (tmp_path / "d").exists()
    # pldb get checks its query before connecting too (it waited 3 s for a router).
    for extra in ((), ("--follow",)):
        r = psepr_cmd("pldb", "get", "/", *extra, router="tcp://127.0.0.1:9")
        assert (r.returncode, r.stderr) == (2, "psepr pldb: error: a PLDB query needs a channel "
                                               "below the root, e.g. /example.com/node/\n")


def test_lease_output_xml_outlives_an_event_nested_too_deep(router_proc, lease_procs):
    # A raw client (not the SDK, which refuses it) sends a payload nested 5,000 deep;
    # `psepr lease --output xml` died of RecursionError on it. Now it says why and
    # prints the next event.
    lp = lease_procs(router_proc.url, CH, "--count", "2", "--output", "xml")
    deep = '<payload xmlns="t">' + "<a>" * 5000 + "</a>" * 5000 + "</payload>"
    raw_send(router_proc.url, [("deep.1", CH, "t", time.time(), 1, None, deep.encode())])
    sent = psepr_cmd("send", CH, "--type", "t", "--json", '{"after": 1}', router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    rc, out, err = lp.finish()
    assert rc == 0, err
    assert "event deep.1" in err and "nested more than" in err
    line, = out.splitlines()
    assert psepr.from_xml(line).payload == {"after": 1}


@pytest.mark.parametrize("output", ["json", "xml", "payload"])
def test_lease_outlives_a_json_payload_nested_too_deep(router_proc, lease_procs, output):
    # orjson reads JSON nested up to 1,024 levels but writes at most 254: a raw
    # client's payload in between ended `psepr lease` with "TypeError: Recursion
    # limit reached" in every output mode.
    lp = lease_procs(router_proc.url, CH, "--count", "2", "--output", output)
    deep = b"[" * 600 + b"]" * 600
    raw_send(router_proc.url, [("deep.1", CH, "t", time.time(), 0, None, deep)])
    sent = psepr_cmd("send", CH, "--type", "t", "--json", '{"after": 1}', router=router_proc.url)
    assert sent.returncode == 0, sent.stderr
    rc, out, err = lp.finish()
    assert rc == 0, err
    assert "event deep.1" in err and "nested more than 253 levels" in err, err
    assert "Traceback" not in err
    line, = out.splitlines()
    payload = {"json": lambda: orjson.loads(line)["payload"],
               "xml": lambda: psepr.from_xml(line).payload,
               "payload": lambda: orjson.loads(line)}[output]()
    assert payload == {"after": 1}


def test_settings_files_that_are_not_text_are_named(tmp_path):
    # A router config, an ACL or a servers file holding binary bytes (a key file
    # given by mistake, a damaged copy) ended in a UnicodeDecodeError traceback.
    junk = tmp_path / "junk"
    junk.write_bytes(b"name = \"r1\"\n\xec\x9a\x00")
    key = tmp_path / "r.key_secret"
    assert psepr_cmd("keygen", "r", "--dir", str(tmp_path)).returncode == 0
    for args, what in ((("router", "--config", str(junk)), "router config"),
                       (("router", "--curve", "--key", str(key), "--acl", str(junk),
                         "--listen", _free_url()), "ACL file")):
        r = psepr_cmd(*args, timeout=10)
        assert r.returncode == 2, r.stderr
        assert _one_line_error(r).endswith(f"{what} {junk} is not UTF-8 text (byte 0xec at "
                                           f"offset 12)"), r.stderr
    env = {**_env(None), "PSEPR_SERVERS_FILE": str(junk)}
    r = subprocess.run([sys.executable, "-m", "psepr.cli", "send", "/x/", "--json", "1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "servers file" in _one_line_error(r), r.stderr


def test_run_refuses_ports_it_cannot_use_and_other_hosts(tmp_path):
    # Port 0 put the farm's routers on ports 1, 10, 11, 20, 21 (as root); 65530
    # was refused as "router setting peers: 'tcp://127.0.0.1:65541' is not an
    # endpoint", and then suggested 65630; a non-loopback address was told to
    # "pass --insecure", which `psepr run` does not have.
    for listen, words in (("tcp://127.0.0.1:0", "--listen needs a port"),
                          ("tcp://127.0.0.1:65530", "--listen port 65530 leaves no room for 3 "
                                                    "routers: they would use ports 65530 to 65551"),
                          ("tcp://0.0.0.0:7700", "it listens on loopback only")):
        r = psepr_cmd("run", "--listen", listen, "--data-dir", str(tmp_path), timeout=20)
        assert r.returncode == 2, r.stderr
        assert words in _one_line_error(r)


def test_stats_watch_prints_only_the_routers_own_stats(router_proc):
    # Anyone may send on a router's stats channel: one event whose payload was
    # not a stats object ended `psepr stats --watch` with a TypeError traceback.
    from psepr.wire import STATS_TYPE
    p = subprocess.Popen([sys.executable, "-m", "psepr.cli", "stats", "--watch", "--count", "1",
                          "--json"], cwd=ROOT, env=_env(router_proc.url), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert p.stderr.readline().startswith("# watching /psepr.local/_sys/routers/")
        ch = "/psepr.local/_sys/routers/r1/stats/"
        raw_send(router_proc.url, [("fake.1", ch, STATS_TYPE, time.time(), 0, None, b"[1,2]")])
        r = psepr_cmd("send", ch, "--type", STATS_TYPE, "--json", "1", "--service",
                      "psepr-router", router=router_proc.url)
        assert r.returncode == 2 and "is reserved" in _one_line_error(r)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert err == "# skipped event fake.1 from anonymous/" + err.split("anonymous/")[1]
    assert err.endswith(": not the router's\n")
    st = orjson.loads(out)
    assert st["router"] == "r1" and "events_in" in st
