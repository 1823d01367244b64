"""Router configuration: a frozen dataclass with named presets.

Every default is explained where it is declared.  Build one with
``RouterConfig.preset("local", name="r1")`` or ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from psepr.channel import element_ok
from psepr.config import check_settings, endpoint_ok, read_text_file
from psepr.errors import ConfigError


@dataclass(frozen=True)
class RouterConfig:
    """How one router behaves.

    Attributes:
        name: router name, unique in the overlay; appears in stats channels.
        authority: naming authority for the router's own system channels
            (``/<authority>/_sys/routers/<name>/stats/``).
        listen: ZeroMQ endpoints for clients; port 0 binds an ephemeral port.
        max_lease: longest lease grant in seconds (PsEPR's default was one hour).
        max_event_bytes: largest payload of one event (1 MiB, like PsEPR's bound
            on XML documents; bigger things belong in a file store).
        max_message_bytes: largest incoming message (a SEND batch): room for one
            maximal event and its header.  ZeroMQ drops a peer that exceeds it
            before the router allocates for it.
        deliver_bytes: a DELIVER message takes segments (whole SEND messages, at
            most ``max_message_bytes`` each, 256 KiB from the SDK) until it holds
            about this many bytes, so one message stays small.
        conn_queue: ZeroMQ send high-water mark per connection, in messages; also
            the receive high-water mark per sender.  It bounds the memory one
            slow connection can pin at ``conn_queue * (deliver_bytes + one
            segment)``: about 24 MiB with SDK senders, at most 136 MiB with
            hand-made 2 MiB messages.  Beyond it deliveries are dropped, counted
            and reported to the connection.
        max_leases_per_conn: leases one connection may hold.
        conn_timeout: a connection silent this long is forgotten with its leases
            (clients ping every second while idle, so 30 s is generous).
        detach_grace: a session whose connection vanished (ZeroMQ: host
            unreachable) keeps its leases and undelivered events this long for
            its client to say HELLO again from a new connection (it does at its
            next ping, within a second or two); then it is forgotten.  A dead
            client's interest lingers this long, so it stays short.
        stats_interval: seconds between published stats events.
        max_per_turn: messages drained per loop turn before deliveries are flushed;
            bounds latency and lets ZeroMQ's fair queueing interleave senders.
        max_bytes_per_turn: bytes drained per socket per loop turn (about); what a
            turn reads stays referenced until the flush, so this bounds that
            memory when big SEND batches pile up (4 MiB: still many batches).
        curve: require CURVE authentication (see ``secret_key_file``, ``acl_file``).
        secret_key_file: the router's CURVE secret-key certificate file.
        acl_file: TOML ACL (principals, keys, send/lease grants).
        insecure: allow listening on non-loopback addresses without CURVE.
        peer_listen: ZeroMQ endpoints where other routers link to this one
            (empty: this router only dials out).
        peers: peer-link endpoints of other routers to dial.  A link configured
            on either side carries traffic both ways.
        peer_ping: seconds between liveness pings on an idle peer link.
        peer_dead_after: seconds of silence after which a peer link is down (and
            the overlay routes around it); 3 pings missed.
        lsa_refresh: seconds between refreshes of this router's link-state
            advertisement (changes are flooded at once; refreshes keep soft state).
        lsa_max_age: an advertisement not refreshed for this long is dropped with
            its router's interest: a router that died leaves no ghost interest,
            even where no neighbour saw it go.
        hop_limit: most router hops an event takes; guards loops while routes
            converge (a chain of 32 routers is far beyond any sane overlay).
        barrier_timeout: longest wait for every reachable router to confirm a
            lease's interest (``propagated=True``).
        seen_cache: forwarded segments remembered per router to refuse duplicates
            while the overlay converges (at most this many; always the last half).
        peer_queue: ZeroMQ high-water mark per peer link, in messages.
    """

    name: str = "r1"
    authority: str = "psepr.local"
    listen: tuple[str, ...] = ("tcp://127.0.0.1:7600",)
    max_lease: float = 3600.0
    max_event_bytes: int = 1 << 20
    max_message_bytes: int = 2 << 20
    deliver_bytes: int = 128 << 10
    conn_queue: int = 64
    max_leases_per_conn: int = 100_000
    conn_timeout: float = 30.0
    detach_grace: float = 5.0
    stats_interval: float = 5.0
    max_per_turn: int = 1000
    max_bytes_per_turn: int = 4 << 20
    curve: bool = False
    secret_key_file: str | None = None
    acl_file: str | None = None
    insecure: bool = False
    peer_listen: tuple[str, ...] = ()
    peers: tuple[str, ...] = ()
    peer_ping: float = 0.5
    peer_dead_after: float = 1.5
    lsa_refresh: float = 10.0
    lsa_max_age: float = 35.0
    hop_limit: int = 32
    barrier_timeout: float = 2.0
    seen_cache: int = 100_000
    peer_queue: int = 1000

    def __post_init__(self) -> None:
        check_settings(self, "router setting")
        for field in ("name", "authority"):
            # Both are elements of the router's system channels
            # (/<authority>/_sys/routers/<name>/...): say so before a channel error does.
            v = getattr(self, field)
            if not element_ok(v):
                raise ConfigError(f"router setting {field} {v!r} must be printable text "
                                  f"without whitespace, '/' or '*' (one channel element)")
        for field in ("listen", "peer_listen", "peers"):
            # An ephemeral port (tcp://127.0.0.1:0, :*) binds a new port each time.
            endpoints = [e for e in getattr(self, field) if not e.endswith((":0", ":*"))]
            twice = next((e for i, e in enumerate(endpoints) if e in endpoints[:i]), None)
            if twice is not None:
                raise ConfigError(f"router setting {field} lists {twice} twice")
        bad = next((e for e in self.peers if not endpoint_ok(e)), None)
        if bad is not None:
            raise ConfigError(f"router setting peers: {bad!r} is not an endpoint to dial "
                              f"(tcp://HOST:PORT, ipc://PATH or inproc://NAME)")
        both = next((e for e in self.listen if e in self.peer_listen
                     and not e.endswith((":0", ":*"))), None)
        if both is not None:
            raise ConfigError(f"router settings listen and peer_listen both name {both}: "
                              f"clients and peers need an endpoint each")
        own = next((e for e in self.peers if e in self.peer_listen), None)
        if own is not None:
            raise ConfigError(f"router setting peers names {own}, this router's own peer "
                              f"endpoint: a router does not dial itself")

    PRESETS = {
        # One host, loopback only: fast stats for humans watching `psepr stats`,
        # faster soft-state refresh (links never lose packets here).
        "local": dict(stats_interval=2.0, peer_ping=0.25, peer_dead_after=0.75,
                      lsa_refresh=5.0, lsa_max_age=17.0),
        # A machine room: defaults.
        "lan": dict(),
        # Wide area: longer silence before forgetting a client or a peer (lossy
        # links, long round trips).
        "wan": dict(conn_timeout=90.0, detach_grace=15.0, stats_interval=10.0, peer_ping=2.0,
                    peer_dead_after=8.0, lsa_refresh=30.0, lsa_max_age=100.0,
                    barrier_timeout=10.0),
    }

    @classmethod
    def preset(cls, preset: str, /, **overrides) -> "RouterConfig":
        """A configuration from a named preset, with overrides.

        Raises:
            KeyError: unknown preset name.
        """
        return cls(**{**cls.PRESETS[preset], **overrides})

    def replace(self, **changes) -> "RouterConfig":
        return dataclasses.replace(self, **changes)




def load_router_file(path: str) -> dict:
    """Read a router TOML file: the ``[router]`` table, keys named like the fields.

    Example::

        [router]
        name = "r1"
        preset = "lan"
        listen = ["tcp://10.0.0.1:7600"]
        peer_listen = ["tcp://10.0.0.1:7601"]
        peers = ["tcp://10.0.0.2:7601", "tcp://10.0.0.3:7601"]

    Returns:
        The settings as keyword arguments for :meth:`RouterConfig.preset` (plus
        ``preset``), lists turned into tuples.

    Raises:
        ConfigError: unreadable file, bad TOML, an unknown key or a wrong type;
            the message names the file and the key.
    """
    import tomllib

    try:
        data = tomllib.loads(read_text_file(path, "router config"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"router config {path} is not valid TOML: {exc}") from None
    table = data.get("router")
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: needs a [router] table")
    fields = {f.name: f for f in dataclasses.fields(RouterConfig)}
    out: dict = {}
    for key, value in table.items():
        if key == "preset":
            if value not in RouterConfig.PRESETS:
                raise ConfigError(f"{path}: router.preset must be one of "
                                  f"{', '.join(RouterConfig.PRESETS)}, got {value!r}")
            out[key] = value
            continue
        f = fields.get(key)
        if f is None:
            raise ConfigError(f"{path}: unknown key router.{key}; known: preset, "
                              f"{', '.join(sorted(fields))}")
        default = f.default
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{path}: router.{key} must be a list of strings")
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{path}: router.{key} must be true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{path}: router.{key} must be a positive integer, "
                                  f"got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{path}: router.{key} must be a positive number of "
                                  f"seconds, got {value!r}")
            value = float(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{path}: router.{key} must be a string")
        out[key] = value
    return out
