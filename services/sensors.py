"""Node sensors: a node's facts published as PLDB attribute tuples.

Theory of operation
-------------------
``psepr sensors`` runs on every host (or once per simulated host).  Each
*round* it reads the node's facts (load, CPUs, memory, swap, disks, boot time
and uptime, kernel, package digests, kernel checksum, network addresses) and
sends the ones worth sending as attribute events (type
:data:`psepr.ATTRIBUTE`) on ``/<authority>/node/<host>/``.  PLDB monitors of
``/<authority>/node/`` remember them; ``psepr.pldb.query`` answers with them.

The module has three layers:

* **Readers** (thin I/O): small functions that read one group of facts with
  psutil, :mod:`platform`, :mod:`importlib.metadata` and plain files under
  ``/proc``, ``/boot`` and ``/var/lib/dpkg``.  Nothing is ever started as a
  subprocess.  Each returns ``{field: value}`` with plain JSON values.  A
  :class:`Sampler` runs them: a reader that raises (missing file, permission,
  odd platform) is logged once, its fields are left out of the round, and
  the sensor goes on; it is logged again only after it worked in between.
* **The core** (:class:`SensorCore`, pure: no clock, no I/O): given ``now``
  and the round's readings it decides what to publish.  A field is published
  when it is new, when its value moved beyond the field's tolerance from the
  value *last published* (so slow creep accumulates and is published in the
  end), or when its last publication is ``refresh`` seconds old.  The refresh
  lets a PLDB monitor that started late, or lost an event (delivery is at
  most once), catch up, and it keeps live values from expiring.
* **The shell** (:class:`Sensors`): samples every ``sample_interval``, runs
  the costly readers (package digests, kernel checksum) only every
  ``slow_interval`` (the core remembers their last readings in between so
  they are still refreshed), sends the core's decisions with
  ``expire = config.expire`` (a few refresh periods: a dead node's facts go
  stale, a live node's never do) and flushes once per round.

Readings that disappear (a reader starts failing) are simply not published
any more; their tuples expire in PLDB ``expire`` seconds after the last
publication, which is how a reader of PLDB tells a stale fact from a live one.

Uptime changes every second, so it would be sent every round under a
change rule: ``uptime`` is published only at refresh (infinite tolerance) and
``boot_time``, which is stable, is published on change.  A reader who needs
the exact uptime computes ``tuple.time - boot_time``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import logging
import math
import platform
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import orjson

from psepr.channel import Channel, parse
from psepr.errors import ChannelError, ConfigError, ConnectionLost, TimeoutError as PseprTimeout
from psepr.event import ATTRIBUTE, attribute
from psepr.pldb import MAX_VALUE_BYTES

log = logging.getLogger("psepr.sensors")

MiB = 1 << 20

#: boot_time is derived from the wall clock minus the kernel's boot-based clock,
#: so NTP steps move it by a second or so without any reboot.
BOOT_TIME_TOLERANCE = 2.0


# -- configuration ----------------------------------------------------------------

@dataclass(frozen=True)
class SensorConfig:
    """How often a node sensor samples and publishes.

    Attributes:
        sample_interval: seconds between rounds (5 s on a LAN: a change of load
            or memory reaches PLDB within 5 s, and a round costs a few
            milliseconds of CPU, well under 0.1 % of one core).
        refresh: every value is re-published at least this often, even if it
            did not change (300 s: a monitor that started late or lost an
            event is repaired within 5 minutes, for about one event per field
            per 5 minutes).
        expire: the ``expire`` of every published tuple (3 refresh periods:
            two lost refreshes in a row are tolerated before a live node's
            facts go stale; a dead node's facts go stale 15 minutes after its
            last round).
        slow_interval: seconds between recomputations of the costly facts:
            Python and Debian package digests and the kernel checksum (600 s:
            they cost tens of milliseconds and change only on installs and
            upgrades).  Between recomputations their last readings are kept,
            and refreshed like the others.
        load_tolerance: ``load_avg`` is published when it moved by more than
            this from the last published value (0.05: below that it is noise).
        memory_tolerance: bytes by which ``mem_available`` and ``swap_used``
            must move to be published (64 MiB: the page cache moves memory by
            a few MiB every second).
        disk_tolerance: bytes by which a disk's ``used`` or ``free`` must move
            (256 MiB: logs grow continuously; a filling disk is still seen
            long before it is full).
        flush_timeout: seconds a round waits for the router to confirm its
            events before it logs a warning and goes on (the SDK keeps the
            events and fails over to another router meanwhile).
    """

    sample_interval: float = 5.0
    refresh: float = 300.0
    expire: float = 900.0
    slow_interval: float = 600.0
    load_tolerance: float = 0.05
    memory_tolerance: float = 64 * MiB
    disk_tolerance: float = 256 * MiB
    flush_timeout: float = 5.0

    PRESETS = {
        # One host, tests and demos: see every change at once, refresh fast.
        "local": dict(sample_interval=1.0, refresh=10.0, expire=30.0, slow_interval=30.0,
                      memory_tolerance=16 * MiB, disk_tolerance=64 * MiB, flush_timeout=2.0),
        # A machine room: the defaults.
        "lan": dict(),
        # Wide area: every event costs more; facts may lag a little longer.
        "wan": dict(sample_interval=15.0, refresh=900.0, expire=2700.0, slow_interval=1800.0,
                    load_tolerance=0.1, flush_timeout=10.0),
    }

    def __post_init__(self) -> None:
        for name in ("sample_interval", "refresh", "expire", "slow_interval", "flush_timeout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool)
                    and math.isfinite(v) and v > 0):
                raise ConfigError(f"sensor {name} must be a positive number of seconds, "
                                  f"got {v!r}")
        for name in ("load_tolerance", "memory_tolerance", "disk_tolerance"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
                raise ConfigError(f"sensor {name} must be a number >= 0, got {v!r}")
        if self.refresh < self.sample_interval:
            raise ConfigError(f"sensor refresh ({self.refresh:g} s) must be at least the "
                              f"sample interval ({self.sample_interval:g} s)")
        if self.expire <= self.refresh:
            raise ConfigError(f"sensor expire ({self.expire:g} s) must be longer than refresh "
                              f"({self.refresh:g} s), or live facts would go stale")

    @classmethod
    def preset(cls, preset: str, /, **overrides) -> "SensorConfig":
        """A configuration from a named preset with overrides.

        Raises:
            KeyError: unknown preset.
            ConfigError: an override makes the configuration inconsistent.
        """
        return cls(**{**cls.PRESETS[preset], **overrides})

    def replace(self, **changes) -> "SensorConfig":
        return dataclasses.replace(self, **changes)

    def tolerances(self) -> dict[str, float]:
        """Per-field tolerances for :class:`SensorCore` (fields not named: exact)."""
        return {"load_avg": self.load_tolerance,
                "mem_available": self.memory_tolerance,
                "swap_used": self.memory_tolerance,
                "disks": self.disk_tolerance,
                "boot_time": BOOT_TIME_TOLERANCE,
                "uptime": math.inf}


# -- the pure core ----------------------------------------------------------------

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def within(a: Any, b: Any, tolerance: float = 0.0) -> bool:
    """Whether ``a`` is the same value as ``b`` up to ``tolerance`` on every number.

    Dicts must have the same keys and lists the same length; the tolerance
    applies to every number inside them.  Booleans, strings and None compare
    exactly.  Two NaNs are the same value (a sensor stuck on NaN must not
    publish every round); ``math.inf`` accepts any change of a number.

    Args:
        a, b: JSON-like values.
        tolerance: the largest difference between two numbers still "the same".

    Returns:
        True if no publication is needed for the change from ``b`` to ``a``.
    """
    if _is_number(a) and _is_number(b):
        a_nan, b_nan = a != a, b != b
        if a_nan or b_nan:
            return a_nan and b_nan
        if tolerance == math.inf:
            return True
        return a == b or abs(a - b) <= tolerance
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(within(a[k], b[k], tolerance) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(within(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b


class SensorCore:
    """Decides which readings to publish (pure: ``now`` is passed in).

    Args:
        refresh: seconds after which a value is re-published even if unchanged.
        slow_interval: seconds between rounds that recompute the slow facts.
        tolerances: ``{field: tolerance}`` (see :func:`within`); other fields
            are published on any change.

    Raises:
        ConfigError: a non-positive interval.
    """

    def __init__(self, refresh: float, slow_interval: float,
                 tolerances: Mapping[str, float] | None = None) -> None:
        if not (refresh > 0 and slow_interval > 0):
            raise ConfigError(f"refresh and slow_interval must be positive, got {refresh!r} "
                              f"and {slow_interval!r}")
        self.refresh = refresh
        self.slow_interval = slow_interval
        self.tolerances = dict(tolerances or {})
        #: field -> (value, time) of its last publication.
        self.published: dict[str, tuple[Any, float]] = {}
        self._slow: dict[str, Any] = {}
        self._slow_at: float | None = None

    @classmethod
    def from_config(cls, config: SensorConfig) -> "SensorCore":
        """A core with ``config``'s refresh, slow interval and tolerances."""
        return cls(config.refresh, config.slow_interval, config.tolerances())

    def slow_due(self, now: float) -> bool:
        """Whether this round should recompute the slow facts (always the first time)."""
        return self._slow_at is None or now - self._slow_at >= self.slow_interval

    def observe(self, now: float, readings: Mapping[str, Any],
                slow: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
        """Take one round's readings; return what to publish.

        Args:
            now: the current time (any monotonic scale, in seconds).
            readings: ``{field: value}`` read this round.  The values must not be
                mutated afterwards (the core keeps them to compare with).
            slow: the slow facts when they were recomputed this round; they
                replace the remembered ones (a slow field missing from them is
                forgotten) and restart the slow interval.  None: the remembered
                ones take part in this round as if read again.

        Returns:
            ``[(field, value), ...]`` sorted by field: every field never published,
            changed beyond its tolerance since its last publication, or whose
            last publication is at least ``refresh`` old.  They are recorded as
            published at ``now``.
        """
        if slow is not None:
            self._slow = dict(slow)
            self._slow_at = now
        current = {**self._slow, **readings}
        out: list[tuple[str, Any]] = []
        for field in sorted(current):
            value = current[field]
            last = self.published.get(field)
            if last is not None and now - last[1] < self.refresh \
                    and within(value, last[0], self.tolerances.get(field, 0.0)):
                continue
            self.published[field] = (value, now)
            out.append((field, value))
        return out

    def next_refresh(self) -> float | None:
        """When the oldest publication is due for refresh (None before any)."""
        if not self.published:
            return None
        return min(t for _, t in self.published.values()) + self.refresh


# -- readers (thin I/O) ------------------------------------------------------------

def read_load() -> dict[str, Any]:
    """``load_avg``: the 1-minute load average, rounded to 2 decimals."""
    import psutil
    return {"load_avg": round(psutil.getloadavg()[0], 2)}


def read_cpus() -> dict[str, Any]:
    """``cpu_count``: logical CPUs.

    Raises:
        OSError: the platform cannot tell.
    """
    import psutil
    n = psutil.cpu_count(logical=True)
    if not n:
        raise OSError("the CPU count is not available on this platform")
    return {"cpu_count": n}


def read_memory() -> dict[str, Any]:
    """``mem_total`` and ``mem_available``, in bytes."""
    import psutil
    m = psutil.virtual_memory()
    return {"mem_total": int(m.total), "mem_available": int(m.available)}


def read_swap() -> dict[str, Any]:
    """``swap_total`` and ``swap_used``, in bytes (0 and 0 without swap)."""
    import psutil
    s = psutil.swap_memory()
    return {"swap_total": int(s.total), "swap_used": int(s.used)}


#: Read-only images (snap packages, CDs): always full, never changing, not storage.
_IMAGE_FSTYPES = frozenset({"squashfs", "iso9660", "udf"})


def read_disks() -> dict[str, Any]:
    """``disks``: ``{mountpoint: {"total", "used", "free"}}`` in bytes.

    Only physical-device filesystems (``psutil.disk_partitions(all=False)``),
    without read-only images (squashfs, iso9660).  A mount that cannot be
    measured (permission, vanished) is left out, not the whole field.
    """
    import psutil
    disks: dict[str, dict[str, int]] = {}
    for part in psutil.disk_partitions(all=False):
        if part.fstype in _IMAGE_FSTYPES or part.mountpoint in disks:
            continue
        try:
            u = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        disks[part.mountpoint] = {"total": int(u.total), "used": int(u.used),
                                  "free": int(u.free)}
    return {"disks": dict(sorted(disks.items()))}


def read_boot(clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """``boot_time`` (seconds since the epoch) and ``uptime`` (seconds), as integers.

    Args:
        clock: the wall clock (tests pass a fixed one).
    """
    import psutil
    boot = psutil.boot_time()
    return {"boot_time": int(boot), "uptime": max(0, int(clock() - boot))}


def read_kernel() -> dict[str, Any]:
    """``kernel`` (the release, as ``uname -r``) and ``arch`` (as ``uname -m``)."""
    u = platform.uname()
    if not u.release:
        raise OSError("the kernel release is not available")
    return {"kernel": u.release, "arch": u.machine}


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def read_kernel_checksum(release: str | None = None, boot_dir: str | Path = "/boot",
                         modules_dir: str | Path = "/lib/modules",
                         proc_modules: str | Path = "/proc/modules",
                         proc_version: str | Path = "/proc/version") -> dict[str, Any]:
    """``kernel_checksum`` (``"sha256:<hex>"``) and ``kernel_checksum_source`` (what was hashed).

    Tried in order, the first readable wins:

    1. the kernel image, ``<boot_dir>/vmlinuz-<release>`` or
       ``<modules_dir>/<release>/vmlinuz`` (usually readable by root only);
    2. the loaded modules, ``/proc/modules``: only the name and size of each,
       sorted (use counts, states and addresses change while the code does not);
    3. the kernel's build banner, ``/proc/version`` (version, compiler, build
       number and date: identifies the build, not its bytes; containers and
       kernels without modules have only this).

    Args:
        release: the kernel release (default: the running one).
        boot_dir, modules_dir, proc_modules, proc_version: where to look.

    Raises:
        OSError: none of them is readable.
    """
    release = release or platform.release()
    for image in (Path(boot_dir) / f"vmlinuz-{release}", Path(modules_dir) / release / "vmlinuz"):
        try:
            return {"kernel_checksum": _sha256_file(image), "kernel_checksum_source": str(image)}
        except OSError:
            continue
    errors = []
    try:
        text = Path(proc_modules).read_text(errors="replace")
        lines = sorted(" ".join(line.split()[:2]) for line in text.splitlines() if line.strip())
        digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()
        return {"kernel_checksum": "sha256:" + digest, "kernel_checksum_source": str(proc_modules)}
    except OSError as exc:
        errors.append(exc)
    try:
        digest = hashlib.sha256(Path(proc_version).read_bytes()).hexdigest()
        return {"kernel_checksum": "sha256:" + digest, "kernel_checksum_source": str(proc_version)}
    except OSError as exc:
        errors.append(exc)
    raise OSError(f"no kernel image, module list or version banner is readable "
                  f"({'; '.join(str(e) for e in errors)})")


_NAME_SEP = re.compile(r"[-_.]+")


def read_python_packages(
        distributions: Callable[[], Iterable[Any]] = importlib.metadata.distributions,
) -> dict[str, Any]:
    """``python_packages_digest`` and ``python_packages`` (count) of this interpreter.

    The digest is the SHA-256 of the sorted, distinct ``name==version`` lines
    (names normalised as PEP 503 does), so two hosts with the same set of
    distributions have the same digest whatever their install order or paths.
    Distributions without a name (broken metadata) are left out.

    Args:
        distributions: where to find them (default: the running interpreter's).
    """
    lines = set()
    for dist in distributions():
        name = dist.metadata["Name"] if dist.metadata is not None else None
        if not name:
            continue
        lines.add(f"{_NAME_SEP.sub('-', name).lower()}=={dist.version}")
    text = "\n".join(sorted(lines))
    return {"python_packages_digest": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
            "python_packages": len(lines)}


def read_debian_packages(status: str | Path = "/var/lib/dpkg/status") -> dict[str, Any]:
    """``debian_packages_digest`` and ``debian_packages`` (count of installed packages).

    The digest is the SHA-256 of the sorted ``package:arch=version`` lines of
    the packages dpkg marks installed, not of the status file itself: the file
    also records removed packages whose configuration stays, conffile hashes
    and field orders, so two hosts with the same installed set would otherwise
    differ.  Not a Debian system (no status file): no fields, and no complaint.

    Args:
        status: dpkg's status database.

    Raises:
        OSError: the file exists but cannot be read.
    """
    path = Path(status)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    packages = []
    pkg = arch = version = state = None
    for line in data.decode("utf-8", "replace").splitlines() + [""]:
        if not line:
            if pkg and state and state.split()[-1:] == ["installed"]:
                packages.append(f"{pkg}:{arch or 'all'}={version or ''}")
            pkg = arch = version = state = None
        elif line[0] in " \t":
            continue            # a continuation line (descriptions, conffiles)
        else:
            key, _, value = line.partition(":")
            if key == "Package":
                pkg = value.strip()
            elif key == "Architecture":
                arch = value.strip()
            elif key == "Version":
                version = value.strip()
            elif key == "Status":
                state = value.strip()
    packages.sort()
    digest = hashlib.sha256("\n".join(packages).encode()).hexdigest()
    return {"debian_packages_digest": "sha256:" + digest, "debian_packages": len(packages)}


def _family_name(family: int) -> str:
    import psutil
    if family == socket.AF_INET:
        return "inet"
    if family == socket.AF_INET6:
        return "inet6"
    if family == psutil.AF_LINK:
        return "link"
    return str(int(family))


def read_net_addrs() -> dict[str, Any]:
    """``net_addrs``: ``{interface: [{"family", "address", "netmask"}, ...]}``.

    Every interface and every address, link-layer (MAC) ones included; families
    are ``inet``, ``inet6`` and ``link``.  Interfaces are sorted by name and
    addresses by (family, address), so the same configuration always gives the
    same value (the kernel's order may vary) and only real changes are sent.
    """
    import psutil
    out: dict[str, list[dict[str, Any]]] = {}
    for name, addrs in sorted(psutil.net_if_addrs().items()):
        items = [{"family": _family_name(a.family), "address": a.address,
                  "netmask": a.netmask} for a in addrs]
        items.sort(key=lambda d: (d["family"], d["address"] or ""))
        out[name] = items
    return {"net_addrs": out}


@dataclass(frozen=True)
class Reader:
    """One group of facts.

    Attributes:
        name: what the logs call it.
        read: returns ``{field: value}``; may raise.
        slow: costly: run only every ``slow_interval``.
    """

    name: str
    read: Callable[[], dict[str, Any]]
    slow: bool = False


def default_readers() -> list[Reader]:
    """The readers ``psepr sensors`` runs (see docs/sensors.md for the fields)."""
    return [
        Reader("load", read_load),
        Reader("cpus", read_cpus),
        Reader("memory", read_memory),
        Reader("swap", read_swap),
        Reader("disks", read_disks),
        Reader("boot", read_boot),
        Reader("kernel", read_kernel),
        Reader("net_addrs", read_net_addrs),
        Reader("kernel_checksum", read_kernel_checksum, slow=True),
        Reader("python_packages", read_python_packages, slow=True),
        Reader("debian_packages", read_debian_packages, slow=True),
    ]


class Sampler:
    """Runs readers; a failing reader is logged once and its fields skipped.

    Args:
        readers: the readers.
        max_value_bytes: a value larger than this as JSON is refused (PLDB
            monitors would refuse it too), like a reader failure.
        logger: where failures go.

    Attributes:
        failing: names of the readers whose last run failed.
    """

    def __init__(self, readers: Iterable[Reader], max_value_bytes: int = MAX_VALUE_BYTES,
                 logger: logging.Logger = log) -> None:
        self.readers = list(readers)
        self.max_value_bytes = max_value_bytes
        self.log = logger
        self.failing: set[str] = set()

    def sample(self, slow: bool) -> dict[str, Any]:
        """Run the slow readers (``slow=True``) or the others; return their fields.

        Never raises because of a reader.
        """
        out: dict[str, Any] = {}
        for r in self.readers:
            if r.slow != slow:
                continue
            try:
                fields = self._checked(r.read())
            except Exception as exc:   # any reader's failure costs its fields, not the sensor
                self._failed(r, exc)
                continue
            if r.name in self.failing:
                self.failing.discard(r.name)
                self.log.warning("sensor %s works again", r.name)
            out.update(fields)
        return out

    def _checked(self, fields: Any) -> dict[str, Any]:
        if not isinstance(fields, dict) or not all(isinstance(k, str) and k for k in fields):
            raise TypeError(f"a reader must return {{field: value}}, got {fields!r:.80}")
        for k, v in fields.items():
            size = len(orjson.dumps(v))   # also refuses what JSON cannot carry
            if size > self.max_value_bytes:
                raise ValueError(f"field {k} is {size} bytes as JSON, more than "
                                 f"{self.max_value_bytes}")
        return fields

    def _failed(self, reader: Reader, exc: Exception) -> None:
        if reader.name in self.failing:
            self.log.debug("sensor %s still fails: %s", reader.name, exc)
            return
        self.failing.add(reader.name)
        self.log.warning("sensor %s failed, its fields are skipped until it works: %s: %s",
                         reader.name, type(exc).__name__, exc)


# -- the shell --------------------------------------------------------------------

def node_channel(authority: str, host: str) -> Channel:
    """``/<authority>/node/<host>/``.

    Raises:
        ChannelError: the authority or host cannot be a channel element (empty,
            whitespace, ``/``, ``*``, too long); the message names the channel.
    """
    text = f"/{authority}/node/{host}/"
    channel = parse(text)
    # "a/b" parses, as a deeper channel: it would silently be another host's place.
    if "/" in authority or "/" in host:
        raise ChannelError(text, "element", f"the authority {authority!r} and the host "
                                            f"{host!r} must each be one element, without '/'")
    return channel


class Sensors:
    """Samples a node's facts and publishes them as attribute tuples.

    Args:
        con: a synchronous :class:`psepr.Connection`.
        authority: the naming authority, e.g. ``example.com``.
        host: the node's name (several simulated hosts may share a machine).
        config: timings and tolerances (default: the lan preset).
        clock: a monotonic clock for the schedule (tests pass a fake one).
        readers: the readers (default :func:`default_readers`).

    Attributes:
        channel: where the tuples go.
        rounds: rounds done.
        sent: attribute events sent.

    Raises:
        ChannelError: ``authority`` and ``host`` do not make a valid channel.
    """

    def __init__(self, con, authority: str, host: str, config: SensorConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 readers: Iterable[Reader] | None = None) -> None:
        self.channel = node_channel(authority, host)
        self.con = con
        self.host = host
        self.config = config or SensorConfig()
        self.clock = clock
        self.core = SensorCore.from_config(self.config)
        self.sampler = Sampler(default_readers() if readers is None else readers)
        self.rounds = 0
        self.sent = 0

    def round(self) -> list[tuple[str, Any]]:
        """Sample, publish what the core decides, flush.

        Returns:
            The ``(field, value)`` pairs sent.

        Raises:
            RemoteError: the router refused the events (e.g. AccessDenied).
        """
        now = self.clock()
        slow = self.sampler.sample(slow=True) if self.core.slow_due(now) else None
        decided = self.core.observe(now, self.sampler.sample(slow=False), slow)
        expire = self.config.expire
        try:
            for field, value in decided:
                self.con.send(self.channel, attribute(field, value, expire=expire),
                              type=ATTRIBUTE)
            self.con.flush(timeout=self.config.flush_timeout)
        except (PseprTimeout, ConnectionLost) as exc:
            # The SDK keeps unsent events and fails over on its own; what was lost
            # with a dead router comes back at the next refresh.
            log.warning("sensors of %s: the router did not confirm this round: %s",
                        self.host, exc)
        self.rounds += 1
        self.sent += len(decided)
        return decided

    def run(self, stop: threading.Event, on_ready: Callable[[int], None] | None = None) -> None:
        """Do rounds every ``sample_interval`` until ``stop`` is set.

        Rounds keep to a fixed grid (no drift); a round that overran its slot
        is followed by the next one a full interval later, not by a burst.

        Args:
            stop: set it (from a signal handler or another thread) to end.
            on_ready: called with the number of fields sent, after the first round.

        Raises:
            RemoteError: the router refused the events.
        """
        interval = self.config.sample_interval
        next_at = self.clock()
        first = True
        while not stop.is_set():
            sent = self.round()
            if first and on_ready is not None:
                on_ready(len(sent))
            first = False
            now = self.clock()
            next_at += interval
            if next_at <= now:
                next_at = now + interval
            stop.wait(next_at - now)


def main(args) -> int:
    """``psepr sensors``: run the node sensor until SIGTERM/SIGINT (or one round).

    Args:
        args: the parsed arguments of :func:`services.cli.add_parser`.

    Returns:
        0 (stopped by a signal, or ``--once`` done).

    Raises:
        UsageError: bad arguments (a host or authority that makes no channel,
            inconsistent intervals).
        PseprError: no router, or the router refused the events.
    """
    import psepr
    overrides = {}
    if args.interval is not None:
        overrides["sample_interval"] = args.interval
    if args.refresh is not None:
        overrides["refresh"] = args.refresh
        overrides["expire"] = 3 * args.refresh
    config = SensorConfig.preset(args.preset, **overrides)
    channel = node_channel(args.authority, args.host)      # fail before connecting
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with psepr.connect(args.router, preset=args.preset, service=args.service or "sensors",
                           keyfile=args.key, server_key=args.server_key) as con:
            sensors = Sensors(con, args.authority, args.host, config)
            if args.once:
                sent = sensors.round()
                print(f"sensors of {args.host} published {len(sent)} fields on {channel.text}",
                      flush=True)
                return 0

            def ready(n: int) -> None:
                print(f"sensors of {args.host} publishing on {channel.text} every "
                      f"{config.sample_interval:g} s, refresh {config.refresh:g} s, expire "
                      f"{config.expire:g} s: {n} fields (ready)", flush=True)
            sensors.run(stop, on_ready=ready)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
