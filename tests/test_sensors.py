"""Node sensors (services/sensors.py): the pure core, the readers, the shell, end to end.

* The core (:class:`SensorCore`) decides what to publish from ``now`` and the
  readings: tested with a hand-driven clock, no sockets or sleeps, plus a
  hypothesis property (what subscribers see tracks every reading within its
  tolerance and is never older than the refresh interval, and nothing is sent
  without a reason).
* The readers run on this machine (types and units), and against missing or
  fake files (a missing file costs the fields, never the sensor).
* End to end: a real router, a real ``psepr pldb monitor`` and real
  ``psepr sensors`` processes; PLDB answers with the node's facts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import signal
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import psepr
from psepr import pldb
from psepr.errors import ChannelError, ConfigError, TimeoutError as PseprTimeout
from services import sensors as S
from services.sensors import Reader, Sampler, SensorConfig, SensorCore, Sensors, within

from .conftest import ROOT, wait_for
from .conftest import start_monitor as conftest_start_monitor

AUTH = "sensors.example.com"
NODE = f"/{AUTH}/node/"


# -- configuration ---------------------------------------------------------------------------------

def test_presets_are_consistent_and_explained():
    for name in SensorConfig.PRESETS:
        c = SensorConfig.preset(name)
        assert c.sample_interval <= c.refresh < c.expire
        assert c.slow_interval >= c.sample_interval
    lan, local = SensorConfig.preset("lan"), SensorConfig.preset("local")
    assert (lan.sample_interval, lan.refresh, lan.slow_interval, lan.load_tolerance) == \
        (5.0, 300.0, 600.0, 0.05)
    assert (local.sample_interval, local.refresh, local.slow_interval) == (1.0, 10.0, 30.0)
    assert lan.expire == 3 * lan.refresh
    doc = SensorConfig.__doc__
    for f in ("sample_interval", "refresh", "expire", "slow_interval", "load_tolerance",
              "memory_tolerance", "disk_tolerance", "flush_timeout"):
        assert f + ":" in doc, f
    with pytest.raises(KeyError):
        SensorConfig.preset("moon")


@pytest.mark.parametrize("changes, message", [
    (dict(sample_interval=0), "sample_interval must be a positive number"),
    (dict(refresh=float("nan")), "refresh must be a positive number"),
    (dict(expire=True), "expire must be a positive number"),
    (dict(load_tolerance=-1), "load_tolerance must be a number >= 0"),
    (dict(sample_interval=400.0), "refresh (300 s) must be at least the sample interval"),
    (dict(expire=300.0), "expire (300 s) must be longer than refresh (300 s)"),
])
def test_bad_configurations_are_refused_with_a_clear_message(changes, message):
    with pytest.raises(ConfigError) as info:
        SensorConfig(**changes)
    assert message in str(info.value)


# -- within ----------------------------------------------------------------------------------------

def test_within_compares_numbers_with_tolerance_and_the_rest_exactly():
    assert within(0.40, 0.44, 0.05) and not within(0.40, 0.46, 0.05)
    assert within(1, 1.0) and not within(1, 2)
    assert within(5, 10**9, math.inf)
    assert within({"a": {"used": 100}}, {"a": {"used": 150}}, 64)
    assert not within({"a": {"used": 100}}, {"a": {"used": 200}}, 64)
    assert not within({"a": 1}, {"a": 1, "b": 1}, 10)          # a new key is a change
    assert not within([1, 2], [1, 2, 3], 10)
    assert within([1, 2], (1, 2))
    assert not within(True, 1) and not within(1, True) and within(False, False)
    assert not within("1", 1) and not within(None, 0) and within(None, None)
    assert within(float("nan"), float("nan")) and not within(float("nan"), 1.0, math.inf)
    assert not within(1.0, float("nan"), 5)


# -- the core --------------------------------------------------------------------------------------

def core(refresh=10.0, slow=30.0, **tol):
    return SensorCore(refresh, slow, tol)


def test_first_round_publishes_everything_sorted_then_only_changes():
    c = core()
    assert c.observe(0.0, {"b": 1, "a": "x"}) == [("a", "x"), ("b", 1)]
    assert c.observe(1.0, {"b": 1, "a": "x"}) == []
    assert c.observe(2.0, {"b": 2, "a": "x"}) == [("b", 2)]
    assert c.observe(3.0, {"b": 2, "a": "x", "c": None}) == [("c", None)]
    assert c.published == {"a": ("x", 0.0), "b": (2, 2.0), "c": (None, 3.0)}


def test_unchanged_values_are_republished_exactly_at_refresh_per_field():
    c = core(refresh=10.0)
    c.observe(0.0, {"a": 1})
    c.observe(4.0, {"a": 1, "b": 1})
    assert c.next_refresh() == 10.0
    assert c.observe(9.999, {"a": 1, "b": 1}) == []
    assert c.observe(10.0, {"a": 1, "b": 1}) == [("a", 1)]
    assert c.observe(14.0, {"a": 1, "b": 1}) == [("b", 1)]
    assert c.next_refresh() == 20.0
    assert core().next_refresh() is None


def test_noisy_floats_wait_for_a_change_beyond_tolerance_from_the_last_publication():
    c = core(load_avg=0.05)
    assert c.observe(0, {"load_avg": 0.40}) == [("load_avg", 0.40)]
    assert c.observe(1, {"load_avg": 0.44}) == []
    assert c.observe(2, {"load_avg": 0.36}) == []
    # creep: 0.40 -> 0.44 -> 0.48 is published although each step is small
    assert c.observe(3, {"load_avg": 0.44}) == []
    assert c.observe(4, {"load_avg": 0.48}) == [("load_avg", 0.48)]
    assert c.observe(5, {"load_avg": 0.50}) == []
    assert c.observe(14, {"load_avg": 0.50}) == [("load_avg", 0.50)]     # refresh


def test_uptime_is_published_only_at_refresh_and_disks_with_nested_tolerance():
    tol = SensorConfig.preset("local").tolerances()
    c = SensorCore(10.0, 30.0, tol)
    disks = lambda used: {"/": {"total": 1000 * S.MiB, "used": used * S.MiB,
                                "free": (1000 - used) * S.MiB}}
    assert [f for f, _ in c.observe(0, {"uptime": 100, "disks": disks(10)})] == \
        ["disks", "uptime"]
    for i in range(1, 10):
        assert c.observe(i, {"uptime": 100 + i, "disks": disks(10 + i)}) == []
    assert c.observe(9.5, {"uptime": 109, "disks": disks(80)}) == [("disks", disks(80))]
    assert c.observe(10, {"uptime": 110, "disks": disks(80)}) == [("uptime", 110)]
    # a new mount point is a change whatever the tolerance
    new = {**disks(80), "/data": {"total": 1, "used": 0, "free": 1}}
    assert c.observe(11, {"uptime": 111, "disks": new}) == [("disks", new)]


def test_slow_facts_are_recomputed_on_their_own_interval_and_refreshed_in_between():
    c = core(refresh=10.0, slow=30.0)
    assert c.slow_due(0.0)
    assert c.observe(0.0, {"load": 1}, slow={"digest": "d1"}) == [("digest", "d1"), ("load", 1)]
    assert not c.slow_due(29.9) and c.slow_due(30.0)
    assert c.observe(5.0, {"load": 1}) == []
    # refresh includes the remembered slow value although no slow reading came
    assert c.observe(10.0, {"load": 1}) == [("digest", "d1"), ("load", 1)]
    assert c.observe(15.0, {"load": 1}, slow={"digest": "d1"}) == []   # recomputed, same
    assert c.observe(16.0, {"load": 1}, slow={"digest": "d2"}) == [("digest", "d2")]
    assert not c.slow_due(45.9) and c.slow_due(46.0)
    # a slow field that is no longer read is forgotten, not republished
    assert c.observe(46.0, {"load": 1}, slow={}) == [("load", 1)]
    assert c.observe(60.0, {"load": 1}) == [("load", 1)]


def test_a_field_that_vanishes_is_not_published_and_returns_under_the_same_rules():
    c = core(refresh=10.0)
    c.observe(0.0, {"a": 1, "b": 1})
    assert c.observe(5.0, {"b": 1}) == []
    assert c.observe(8.0, {"a": 1, "b": 1}) == []       # same value, published 8 s ago
    assert c.observe(9.0, {"a": 2}) == [("a", 2)]
    assert c.observe(20.0, {"a": 2}) == [("a", 2)]


def test_the_core_survives_a_clock_going_backwards_and_odd_values():
    c = core(refresh=10.0, x=1.0)
    c.observe(100.0, {"x": 1.0, "y": [1, {"z": None}]})
    assert c.observe(50.0, {"x": 1.5, "y": [1, {"z": None}]}) == []
    assert c.observe(50.0, {"x": float("nan"), "y": "text"}) == [("x", c.published["x"][0]),
                                                                  ("y", "text")]
    assert c.observe(51.0, {"x": float("nan"), "y": "text"}) == []
    with pytest.raises(ConfigError):
        SensorCore(0, 10)


# hypothesis: a subscriber's view (the last published values) always tracks the readings

_FIELDS = ("a", "b", "c")
_values = st.one_of(st.floats(-100, 100, allow_nan=False), st.integers(-5, 5),
                    st.sampled_from(["x", "y"]), st.none(),
                    st.lists(st.floats(-10, 10, allow_nan=False), max_size=3))
_steps = st.lists(st.tuples(st.floats(0, 25, allow_nan=False),
                            st.dictionaries(st.sampled_from(_FIELDS), _values)),
                  min_size=1, max_size=40)


def _same(a, b, tol) -> bool:
    """A test oracle for ``within`` on the values generated above."""
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if num(a) and num(b):
        return abs(a - b) <= tol
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(steps=_steps, refresh=st.floats(1, 30), tol=st.floats(0, 3))
def test_property_view_tracks_readings_within_tolerance_and_refresh(steps, refresh, tol):
    c = SensorCore(refresh, 1000.0, {"a": tol, "b": tol})
    view: dict = {}                        # what a subscriber holds: field -> (value, time)
    now = 0.0
    for dt, readings in steps:
        now += dt
        before = dict(view)
        out = c.observe(now, readings)
        assert [f for f, _ in out] == sorted(f for f, _ in out)
        for field, value in out:
            assert readings[field] is value
            old = before.get(field)
            t_ol = c.tolerances.get(field, 0.0)
            # nothing is sent without a reason: new, changed, or due for refresh
            assert old is None or now - old[1] >= refresh or not _same(value, old[0], t_ol)
            view[field] = (value, now)
        for field, value in readings.items():
            seen, at = view[field]
            assert now - at < refresh
            assert _same(value, seen, c.tolerances.get(field, 0.0))
        assert view == {f: v for f, v in c.published.items()}


# -- the sampler -----------------------------------------------------------------------------------

def test_a_failing_reader_is_logged_once_and_its_fields_skipped(caplog):
    state = {"fail": True}

    def flaky():
        if state["fail"]:
            raise FileNotFoundError(2, "No such file or directory", "/nowhere")
        return {"flaky": 1}

    s = Sampler([Reader("ok", lambda: {"ok": 1}), Reader("flaky", flaky),
                 Reader("slow", lambda: {"digest": "d"}, slow=True)])
    with caplog.at_level(logging.DEBUG, logger="psepr.sensors"):
        assert s.sample(slow=False) == {"ok": 1}
        assert s.sample(slow=False) == {"ok": 1}
        assert s.failing == {"flaky"}
        state["fail"] = False
        assert s.sample(slow=False) == {"ok": 1, "flaky": 1}
        assert s.sample(slow=True) == {"digest": "d"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "sensor flaky failed, its fields are skipped until it works: FileNotFoundError: "
        "[Errno 2] No such file or directory: '/nowhere'",
        "sensor flaky works again"]
    assert s.failing == set()


def test_readers_returning_garbage_or_huge_values_are_skipped(caplog):
    s = Sampler([Reader("list", lambda: [1]), Reader("set", lambda: {"s": {1, 2}}),
                 Reader("big", lambda: {"big": "x" * 100}), Reader("empty", lambda: {"": 1}),
                 Reader("good", lambda: {"g": True})], max_value_bytes=64)
    with caplog.at_level(logging.WARNING, logger="psepr.sensors"):
        assert s.sample(slow=False) == {"g": True}
    assert s.failing == {"list", "set", "big", "empty"}
    assert "field big is 102 bytes as JSON, more than 64" in caplog.text


# -- the readers, on this machine ------------------------------------------------------------------

def test_readers_on_this_machine_give_typed_values():
    f = {}
    for r in S.default_readers():
        f.update(r.read())
    assert isinstance(f["load_avg"], float) and f["load_avg"] >= 0
    assert f["load_avg"] == round(f["load_avg"], 2)
    assert isinstance(f["cpu_count"], int) and f["cpu_count"] >= 1
    assert isinstance(f["mem_total"], int) and 0 < f["mem_available"] <= f["mem_total"]
    assert isinstance(f["swap_total"], int) and 0 <= f["swap_used"] <= max(f["swap_total"], 0)
    assert f["disks"] and all(set(d) == {"total", "used", "free"} and
                              all(isinstance(v, int) for v in d.values())
                              for d in f["disks"].values())
    assert all(m.startswith("/") for m in f["disks"])
    assert isinstance(f["boot_time"], int) and f["boot_time"] < time.time()
    assert isinstance(f["uptime"], int) and abs(f["uptime"] - (time.time() - f["boot_time"])) < 5
    assert isinstance(f["kernel"], str) and f["kernel"] and isinstance(f["arch"], str)
    assert f["kernel_checksum"].startswith("sha256:") and len(f["kernel_checksum"]) == 71
    assert f["kernel_checksum_source"].startswith(("/boot/", "/lib/modules/", "/proc/"))
    assert f["python_packages_digest"].startswith("sha256:")
    assert isinstance(f["python_packages"], int) and f["python_packages"] >= 5
    if "debian_packages" in f:
        assert f["debian_packages_digest"].startswith("sha256:") and f["debian_packages"] > 0
    addrs = f["net_addrs"]
    assert list(addrs) == sorted(addrs) and "lo" in addrs
    assert {"family": "inet", "address": "127.0.0.1", "netmask": "255.0.0.0"} in addrs["lo"]
    for items in addrs.values():
        assert items == sorted(items, key=lambda d: (d["family"], d["address"] or ""))
    # stable facts read twice are equal (no spurious changes)
    again = S.read_net_addrs()["net_addrs"]
    assert again == addrs
    assert S.read_python_packages() == {k: f[k] for k in ("python_packages_digest",
                                                          "python_packages")}


def test_boot_reader_uses_the_given_clock():
    import psutil
    got = S.read_boot(clock=lambda: psutil.boot_time() + 1234.7)
    assert got["uptime"] == 1234


def test_kernel_checksum_prefers_the_image_then_modules_then_the_banner(tmp_path):
    boot, mods = tmp_path / "boot", tmp_path / "lib-modules"
    boot.mkdir()
    (mods / "6.1.0").mkdir(parents=True)
    version = tmp_path / "version"
    version.write_text("Linux version 6.1.0 (gcc) #1 SMP\n")
    proc_modules = tmp_path / "modules"
    kw = dict(release="6.1.0", boot_dir=boot, modules_dir=mods, proc_modules=proc_modules,
              proc_version=version)
    # only the banner
    got = S.read_kernel_checksum(**kw)
    assert got == {"kernel_checksum": "sha256:" + hashlib.sha256(version.read_bytes()).hexdigest(),
                   "kernel_checksum_source": str(version)}
    # modules: use counts, states and addresses do not count
    proc_modules.write_text("ext4 1000 1 - Live 0x0\nzfs 5000 0 - Live 0x0\n")
    a = S.read_kernel_checksum(**kw)
    proc_modules.write_text("zfs 5000 3 - Live 0xffff\next4 1000 2 mbcache, Live 0x0\n")
    assert S.read_kernel_checksum(**kw) == a and a["kernel_checksum_source"] == str(proc_modules)
    proc_modules.write_text("ext4 1000 1 - Live 0x0\nzfs 5008 0 - Live 0x0\n")
    assert S.read_kernel_checksum(**kw)["kernel_checksum"] != a["kernel_checksum"]
    # the image, under /lib/modules/<release>/ then /boot
    (mods / "6.1.0" / "vmlinuz").write_bytes(b"image-a")
    assert S.read_kernel_checksum(**kw)["kernel_checksum"] == \
        "sha256:" + hashlib.sha256(b"image-a").hexdigest()
    (boot / "vmlinuz-6.1.0").write_bytes(b"image-b")
    assert S.read_kernel_checksum(**kw) == {
        "kernel_checksum": "sha256:" + hashlib.sha256(b"image-b").hexdigest(),
        "kernel_checksum_source": str(boot / "vmlinuz-6.1.0")}


def test_kernel_checksum_with_nothing_readable_is_a_skipped_reader(tmp_path, caplog):
    nowhere = tmp_path / "missing"
    read = lambda: S.read_kernel_checksum(release="x", boot_dir=nowhere, modules_dir=nowhere,
                                          proc_modules=nowhere / "m", proc_version=nowhere / "v")
    with pytest.raises(OSError, match="no kernel image, module list or version banner"):
        read()
    s = Sampler([Reader("kernel_checksum", read, slow=True)])
    with caplog.at_level(logging.WARNING, logger="psepr.sensors"):
        assert s.sample(slow=True) == {}
    assert "sensor kernel_checksum failed" in caplog.text


_DPKG = """\
Package: zlib1g
Status: install ok installed
Architecture: amd64
Version: 1:1.2.13
Description: compression library
 a continuation line: Package: fake

Package: oldpkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2
"""


def test_debian_digest_covers_the_installed_set_only(tmp_path):
    status = tmp_path / "status"
    assert S.read_debian_packages(status) == {}        # not a Debian system: no fields
    status.write_text(_DPKG)
    got = S.read_debian_packages(status)
    expected = "bash:amd64=5.2\nzlib1g:amd64=1:1.2.13"
    assert got == {"debian_packages": 2,
                   "debian_packages_digest": "sha256:" + hashlib.sha256(expected.encode())
                   .hexdigest()}
    # removed packages, descriptions and order do not change the set
    stanzas = _DPKG.split("\n\n")
    status.write_text("\n\n".join([stanzas[2], stanzas[0].replace("compression", "zip")]))
    assert S.read_debian_packages(status) == got
    status.write_text(_DPKG.replace("5.2", "5.3"))
    assert S.read_debian_packages(status)["debian_packages_digest"] != \
        got["debian_packages_digest"]
    unreadable = tmp_path / "dir"
    unreadable.mkdir()
    with pytest.raises(OSError):
        S.read_debian_packages(unreadable)                 # a directory: logged and skipped


def test_python_digest_is_order_and_duplicate_free_and_skips_nameless():
    class D:
        def __init__(self, name, version):
            self.metadata = {"Name": name} if name is not None else None
            self.version = version
    a = S.read_python_packages(lambda: [D("Foo_Bar", "1.0"), D("zmq", "26"), D(None, "1"),
                                        D("", "2")])
    b = S.read_python_packages(lambda: [D("zmq", "26"), D("foo.bar", "1.0"), D("zmq", "26")])
    assert a == b and a["python_packages"] == 2
    assert a["python_packages_digest"] == \
        "sha256:" + hashlib.sha256(b"foo-bar==1.0\nzmq==26").hexdigest()


# -- the shell, with a fake connection -------------------------------------------------------------

class FakeCon:
    def __init__(self, flush_error=None):
        self.sent: list = []
        self.flushes = 0
        self.flush_error = flush_error

    def send(self, channel, payload, type=None):
        self.sent.append((str(channel), payload, type))
        return f"e{len(self.sent)}"

    def flush(self, timeout=5.0):
        self.flushes += 1
        if self.flush_error:
            raise self.flush_error


def fake_sensors(con, clock, **kw):
    readers = [Reader("load", lambda: {"load_avg": clock.load}),
               Reader("cpus", lambda: {"cpu_count": 4}),
               Reader("pkgs", lambda: {"python_packages_digest": "sha256:x"}, slow=True)]
    return Sensors(con, AUTH, "h1", SensorConfig.preset("local", **kw), clock=clock,
                   readers=readers)


class Clock:
    def __init__(self):
        self.now = 0.0
        self.load = 0.5

    def __call__(self):
        return self.now


def test_a_round_sends_attribute_events_with_expire_and_flushes():
    con, clock = FakeCon(), Clock()
    s = fake_sensors(con, clock)
    assert s.channel.text == NODE + "h1/"
    assert [f for f, _ in s.round()] == ["cpu_count", "load_avg", "python_packages_digest"]
    assert con.sent[0] == (NODE + "h1/", {"field": "cpu_count", "value": 4, "expire": 30.0},
                           psepr.ATTRIBUTE)
    assert con.flushes == 1
    clock.now, clock.load = 1.0, 0.9
    assert s.round() == [("load_avg", 0.9)]
    clock.now = 2.0
    assert s.round() == [] and con.flushes == 3      # an empty round flushes nothing harmful
    clock.now = 10.0
    assert [f for f, _ in s.round()] == ["cpu_count", "python_packages_digest"]
    assert (s.rounds, s.sent) == (4, 6)


def test_a_round_survives_a_router_that_does_not_confirm(caplog):
    con = FakeCon(flush_error=PseprTimeout("no answer"))
    s = fake_sensors(con, Clock())
    with caplog.at_level(logging.WARNING, logger="psepr.sensors"):
        assert len(s.round()) == 3
    assert "the router did not confirm this round: no answer" in caplog.text
    con.flush_error = psepr.AccessDenied("denied", channel=NODE + "h1/")
    with pytest.raises(psepr.AccessDenied):
        s.round()


def test_run_stops_on_the_event_and_reports_the_first_round():
    con, clock = FakeCon(), Clock()
    s = fake_sensors(con, clock)
    stop = threading.Event()
    ready = []
    s.run(stop, on_ready=lambda n: (ready.append(n), stop.set()))
    assert ready == [3] and s.rounds == 1


@pytest.mark.parametrize("authority, host", [("example.com", "my host"), ("example.com", "a/b"),
                                             ("", "h1"), ("example.com", "*"), ("x", "")])
def test_authority_and_host_must_make_a_channel(authority, host):
    with pytest.raises(ChannelError) as info:
        Sensors(FakeCon(), authority, host, readers=[])
    assert "invalid channel" in str(info.value)


# -- end to end: router, monitor, sensors processes ------------------------------------------------

def start_monitor(start_cli, router, data_dir):
    return conftest_start_monitor(start_cli, router, data_dir, NODE, "m1")


def start_sensors(start_cli, router, host, *extra):
    return start_cli("sensors", "--authority", AUTH, "--host", host, "--preset", "local",
                     *extra, router=router.url, ready="(ready)")


def fields_of(con, channel):
    try:
        return {t.field: t for t in pldb.query(con, channel)}
    except psepr.NoMonitor:
        return {}


@pytest.mark.slow
def test_pldb_answers_a_nodes_facts_published_by_a_sensors_process(router_proc, start_cli,
                                                                   tmp_path):
    start_monitor(start_cli, router_proc, tmp_path)
    sens = start_sensors(start_cli, router_proc, "simhost1")
    assert f"sensors of simhost1 publishing on {NODE}simhost1/ every 1 s" in sens.lines[-1]
    want = {"load_avg", "cpu_count", "mem_total", "mem_available", "disks", "boot_time",
            "uptime", "kernel", "kernel_checksum", "kernel_checksum_source",
            "python_packages_digest", "python_packages", "net_addrs"}
    with psepr.connect(router_proc.url, preset="local") as con:
        got = wait_for("the node's facts",
                       lambda: (f := fields_of(con, NODE + "simhost1/")) and want <= set(f) and f, timeout=15.0)
    assert all(t.expire == 30.0 and t.channel == NODE + "simhost1/" for t in got.values())
    assert all(t.source.startswith("sensors/") for t in got.values())
    assert isinstance(got["load_avg"].value, float)
    assert got["cpu_count"].value == S.read_cpus()["cpu_count"]
    assert got["kernel"].value == S.read_kernel()["kernel"]
    assert got["net_addrs"].value == S.read_net_addrs()["net_addrs"]
    assert got["python_packages_digest"].value.startswith("sha256:")
    assert sens.alive()
    assert sens.stop() == 0
    assert not [line for line in sens.output if "Traceback" in line]


@pytest.mark.slow
def test_two_simulated_hosts_publish_on_their_own_channels(router_proc, start_cli, tmp_path):
    start_monitor(start_cli, router_proc, tmp_path)
    start_sensors(start_cli, router_proc, "simhost1")
    start_sensors(start_cli, router_proc, "simhost2")
    with psepr.connect(router_proc.url, preset="local") as con:
        def both():
            ts = pldb.query(con, NODE, "cpu_count")
            return len(ts) == 2 and ts
        got = wait_for("cpu_count of both hosts", both, timeout=15.0)
    assert [t.channel for t in got] == [NODE + "simhost1/", NODE + "simhost2/"]
    assert got[0].source != got[1].source


@pytest.mark.slow
def test_unchanged_values_are_not_resent_before_the_refresh(router_proc, start_cli):
    # The lease comes first, so the sensor's first round is seen in full.
    with psepr.connect(router_proc.url, preset="local") as con:
        lease = con.lease(NODE + "simhost3/", type=psepr.ATTRIBUTE)
        start_sensors(start_cli, router_proc, "simhost3", "--interval", "0.2", "--refresh", "3")
        seen: dict[str, list[float]] = {}
        t0 = time.monotonic()
        # about 25 rounds: the first, 15 unchanged ones, a refresh, and some more
        while (left := t0 + 5.0 - time.monotonic()) > 0:
            try:
                ev = lease.receive(timeout=left)
            except psepr.TimeoutError:
                break
            seen.setdefault(ev.payload["field"], []).append(time.monotonic())
            assert ev.payload["expire"] == 9.0
    for field in ("cpu_count", "mem_total", "kernel", "boot_time", "uptime",
                  "python_packages_digest", "net_addrs"):
        times = seen.get(field, [])
        assert len(times) == 2, (field, seen)          # the first round, then the refresh
        assert 2.5 <= times[1] - times[0] <= 4.5, (field, times)


@pytest.mark.slow
def test_once_publishes_everything_and_exits(router_proc):
    with psepr.connect(router_proc.url, preset="local") as con:
        lease = con.lease(NODE + "cronhost/", type=psepr.ATTRIBUTE)
        r = subprocess.run([sys.executable, "-m", "psepr.cli", "sensors", "--authority", AUTH,
                            "--host", "cronhost", "--once", "--router", router_proc.url],
                           cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        n = int(r.stdout.split(" published ")[1].split()[0])
        assert r.stdout == f"sensors of cronhost published {n} fields on {NODE}cronhost/\n"
        fields = [lease.receive(timeout=5).payload["field"] for _ in range(n)]
    assert {"cpu_count", "kernel", "load_avg", "net_addrs"} <= set(fields)
    assert len(set(fields)) == n


@pytest.mark.slow
def test_cli_errors_are_one_line_and_signals_stop_cleanly(router_proc, start_cli):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "psepr.cli", "sensors", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=30,
                              env={"PSEPR_ROUTERS": router_proc.url, "PATH": "/usr/bin:/bin"})
    r = run("--host", "my host", "--once")
    assert r.returncode == 2
    assert r.stderr.startswith("psepr sensors: error: argument --host: 'my host' must be "
                               "one channel element") and r.stderr.count("\n") == 1
    r = run("--interval", "500", "--once")
    assert r.returncode == 2 and r.stderr == (
        "psepr sensors: error: sensor refresh (300 s) must be at least the sample interval "
        "(500 s)\n")
    r = run("--interval", "-1")
    assert r.returncode == 2 and "must be a positive number of seconds, got '-1'" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--once" in r.stdout
    for sig in (signal.SIGINT, signal.SIGTERM):
        p = start_sensors(start_cli, router_proc, f"sig{int(sig)}")
        assert p.stop(sig) == 0
