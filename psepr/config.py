"""Client configuration: a frozen dataclass with named presets, and router discovery.

Router addresses come from, in order: the argument to ``connect``, the
``PSEPR_ROUTERS`` environment variable (comma- or space-separated), a servers
file (``PSEPR_SERVERS_FILE``, else ``~/.config/psepr/servers``; one URL per
line, ``#`` comments), else ``tcp://127.0.0.1:7600``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .channel import element_ok
from .errors import ConfigError
from .wire import ROUTER_SERVICE

DEFAULT_ROUTER = "tcp://127.0.0.1:7600"
_INF = float("inf")


def positive_number(value, whole: bool = False) -> bool:
    """True for a positive, finite int or float (an int if ``whole``); never a bool.

    The one test behind every count and duration the SDK, the CLI and the configs
    accept: JSON cannot carry inf or NaN (orjson writes null), and a zero or negative
    queue, lease or interval would misbehave later, far from where it was set.
    """
    return (not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
            and 0 < value < _INF)


def check_settings(config, what: str) -> None:
    """Refuse a config dataclass whose numbers are not positive (finite; whole where the
    default is whole): a zero queue, a negative lease or a NaN interval would not
    fail at once but misbehave later, far from where it was set.

    Args:
        config: a dataclass instance whose numeric fields must be positive.
        what: how the message names its settings ("router setting").

    Raises:
        ConfigError: the first bad field, named, with its value.
    """
    for f in dataclasses.fields(config):
        default, value = f.default, getattr(config, f.name)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        whole = isinstance(default, int)
        if not positive_number(value, whole):
            kind = "whole number" if whole else "finite number"
            raise ConfigError(f"{what} {f.name} must be a positive {kind}, got {value!r}")


@dataclass(frozen=True)
class ClientConfig:
    """How a client connection behaves.

    Attributes:
        service: the service name declared in HELLO (the principal when the
            router runs without CURVE; with CURVE the key decides).
        instance: this connection's instance name (default: host-pid-n).
        ping_interval: seconds between liveness pings (1 s: cheap, and it lets a
            dead router be noticed well inside the 3 s fail-over target).
        dead_after: seconds without any message from the router before the
            connection is declared lost and the next router is tried.
        connect_timeout: seconds to wait for WELCOME from one router.
        renew_fraction: leases are renewed at this fraction of the grant (0.8,
            as PsEPR clients did), leaving 20 % for retries.
        renew_retry: seconds between renewal retries when no answer came.
        batch_events / batch_bytes: a SEND message is cut at this many events or
            payload bytes (big enough to amortise ZeroMQ's per-message cost,
            small enough to keep latency and router memory low).
        send_queue: events buffered before ``send`` blocks (back-pressure).
        send_block_timeout: how long ``send`` blocks on a full buffer before it
            raises :class:`~psepr.errors.TimeoutError`.
        lease_queue: events buffered per lease before new ones are dropped and
            counted in ``lease.dropped``.
        lease_window: LEASE requests (new leases, renewals) out at once without
            an answer; more wait their turn.  A router keeps at most 1,000 unsent
            control replies per connection and drops the rest, so a burst of
            thousands (leasing 10,000 channels at once, or re-registering them
            after a fail-over) lost most of its answers and waited for retries.
        max_event_bytes: largest payload accepted locally (1 MiB, as the router).
        curve_server_key: router's Z85 public key (enables CURVE).
        curve_public_key / curve_secret_key: this client's Z85 key pair.
    """

    service: str | None = None
    instance: str | None = None
    ping_interval: float = 1.0
    dead_after: float = 3.0
    connect_timeout: float = 2.0
    renew_fraction: float = 0.8
    renew_retry: float = 1.0
    batch_events: int = 2000
    batch_bytes: int = 256 << 10
    send_queue: int = 100_000
    send_block_timeout: float = 30.0
    lease_queue: int = 100_000
    lease_window: int = 500
    max_event_bytes: int = 1 << 20
    curve_server_key: str | None = None
    curve_public_key: str | None = None
    curve_secret_key: str | None = None

    def __post_init__(self) -> None:
        check_settings(self, "client setting")
        for field in ("service", "instance"):
            # The router's rule, checked here rather than after a HELLO it refuses
            # and connect()'s wait.
            v = getattr(self, field)
            if v and not element_ok(v):
                raise ConfigError(f"client setting {field} {v!r} must be printable text "
                                  f"without whitespace, '/' or '*'")
        if self.service == ROUTER_SERVICE:
            raise ConfigError(f"client setting service {ROUTER_SERVICE!r} is reserved for the "
                              f"routers' own events")
        if not self.renew_fraction < 1:
            raise ConfigError(f"client setting renew_fraction must be below 1 (renew before "
                              f"the grant runs out), got {self.renew_fraction!r}")

    PRESETS = {
        # Same host: routers answer in microseconds; notice death fast.
        "local": dict(ping_interval=0.5, dead_after=1.5, connect_timeout=1.0),
        # A machine room: defaults.
        "lan": dict(),
        # Wide area: tolerate latency spikes and loss before failing over.
        "wan": dict(ping_interval=2.0, dead_after=10.0, connect_timeout=5.0, renew_retry=2.0),
    }

    @classmethod
    def preset(cls, preset: str, /, **overrides) -> "ClientConfig":
        """A configuration from a named preset with overrides (KeyError if unknown)."""
        return cls(**{**cls.PRESETS[preset], **overrides})

    def replace(self, **changes) -> "ClientConfig":
        return dataclasses.replace(self, **changes)


def read_text_file(path: "str | Path", what: str) -> str:
    """The text of a settings file (router config, ACL, servers file), UTF-8.

    Args:
        path: the file.
        what: names it in errors (``"router config"``).

    Raises:
        ConfigError: it cannot be read, or is not UTF-8 text (names the file, and
            the offset of the first bad byte).
    """
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                          f"at offset {exc.start})") from None


def _split(text: str) -> list[str]:
    return [u for u in text.replace(",", " ").split() if u]


def endpoint_ok(url: object) -> bool:
    """True for an endpoint a client can connect to: ``tcp://HOST:PORT`` (port
    1-65535; IPv6 hosts in brackets), ``ipc://PATH`` or ``inproc://NAME``.

    libzmq takes ``tcp://host`` without a port, or port 70000, without a word and
    fails later (or never connects): checked here, where the address was given.
    """
    if not isinstance(url, str) or any(c.isspace() for c in url) or "," in url:
        return False
    scheme, sep, rest = url.partition("://")
    if not sep or not rest:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]                   # an IPv6 address
    elif ":" in host or "[" in host or "]" in host:
        return False
    return bool(colon and host and host != "*" and "/" not in host and port.isdigit()
                and 0 < int(port) < 65536)


def router_list(routers: "str | list[str] | tuple[str, ...] | None" = None) -> list[str]:
    """Resolve the routers to try, in order (see module docs).

    Args:
        routers: a URL, a list of URLs, or None to consult the environment.

    Returns:
        A non-empty list of ZeroMQ endpoints.

    Raises:
        ConfigError: an empty list, an entry that is not such an endpoint (see
            :func:`endpoint_ok`; named in the message), or an unreadable servers file.
    """
    urls = _resolve(routers)
    bad = next((u for u in urls if not endpoint_ok(u)), None)
    if not urls or bad is not None:
        raise ConfigError(f"routers must be ZeroMQ endpoints like tcp://127.0.0.1:7600 "
                          f"(tcp://HOST:PORT, ipc://PATH or inproc://NAME), got "
                          f"{bad if urls else routers!r}")
    return urls


def _resolve(routers) -> list:
    """The routers to try, unchecked: given, ``$PSEPR_ROUTERS``, servers file, default."""
    if routers is None:
        env = os.environ.get("PSEPR_ROUTERS", "").strip()
        if env:
            return _split(env)
        path = Path(os.environ.get("PSEPR_SERVERS_FILE")
                    or Path.home() / ".config" / "psepr" / "servers")
        if path.exists():
            lines = read_text_file(path, "servers file").splitlines()
            urls = [u for line in lines for u in _split(line.split("#", 1)[0])]
            if urls:
                return urls
            raise ConfigError(f"servers file {path} lists no router")
        return [DEFAULT_ROUTER]
    if isinstance(routers, str):
        return _split(routers)
    return list(routers)


def tune_gc(threshold: int = 50_000) -> None:
    """Make CPython's cyclic garbage collector run less often (for high-rate processes).

    A process that receives or routes hundreds of thousands of events per second
    allocates that many tracked objects; with the default threshold (700) the
    collector runs thousands of times per second and rescans every event still
    queued.  This raises the youngest generation's threshold and freezes what
    exists now (start-up objects are never rescanned).  PsEPR's own objects form
    no reference cycles, so memory is not held longer in practice.  Routers call
    it at start; call it in your own high-rate consumers if you wish (it changes
    process-wide state, so the SDK never does it on its own).

    Args:
        threshold: allocations between young-generation collections.
    """
    import gc
    gc.collect()
    gc.freeze()
    gc.set_threshold(threshold, 20, 100)
