"""PLDB configuration: frozen dataclasses with named presets (local, lan, wan)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from psepr.config import check_settings
from psepr.errors import ConfigError
from psepr.pldb import MAX_CLOCK_AHEAD, MAX_VALUE_BYTES

from .peers import MAX_TTL
from .store import HISTORY_ROWS


@dataclass(frozen=True)
class PLDBConfig:
    """How monitors and supervisors behave.

    Attributes:
        announce_every: seconds between a monitor's announcements (1 s on a LAN:
            a few hundred bytes per monitor per second, and replicas are
            recounted within ``announce_ttl`` of a monitor's death).
        announce_ttl: a monitor not heard from for this long is gone (3.5
            periods: two lost announcements in a row are tolerated); at most
            :data:`pldb.peers.MAX_TTL` (peers refuse longer ones).
        fill_wait: how long a new monitor listens for its peers' announcements
            before it fills from them (a little more than ``announce_every``, so
            every live peer has announced once).
        fill_timeout: how long the fill query may take before the monitor gives
            up on it and starts from what it has (and says so).
        history_rows: rows of history a monitor keeps (all keys together; about
            110 bytes each on disk, so the default is about 55 MB).
        max_value_bytes: largest attribute value accepted, as JSON.
        max_clock_ahead: a tuple whose time is more than this many seconds ahead
            of the monitor's clock is refused (and reported): the newest version
            wins by its time, so a sender whose clock runs fast would otherwise
            hide every later value of its field until that time came.
        queue: attribute events a monitor's connection buffers before it drops
            (and counts, announces and reports) the excess: ten batches, a
            second of ingest at 50,000 tuples/s, and a bound on the monitor's
            memory when it is flooded (the SDK's default is 100,000).
        batch: attribute events stored per SQLite transaction at most (bigger
            amortises the commit; smaller keeps a query waiting less).
        commit_every: tuples wait at most this long in memory for their
            transaction (group commit: a commit costs as much as thousands of
            rows).  A query commits what waits first, so answers never miss
            them; a crash loses at most this much, which the peers still hold.
        maintain_every: seconds between checkpoints of the current values (a
            restart replays at most this much of the log), history trims and
            expiry purges.
        report_every: at most one report of bad input per this many seconds per
            monitor (the rest are counted in the next report).
        retry_storage: seconds between retries of a failing database.
        supervise_every: seconds between a supervisor's rounds.
        backoff: a supervisor that sees a channel short of (or over) its replicas
            waits a random time in ``[0, backoff)``, plus ``backoff_step`` for each
            monitor it runs or is about to start, before acting; then it looks
            again.  Hosts with less to do act first and the others usually find
            nothing left.
        backoff_step: see ``backoff`` (a quarter of it: larger than the time an
            announcement takes to travel, small enough that a host running ten
            monitors still helps within a few seconds).
    """

    announce_every: float = 1.0
    announce_ttl: float = 3.5
    fill_wait: float = 1.2
    fill_timeout: float = 10.0
    history_rows: int = HISTORY_ROWS
    max_value_bytes: int = MAX_VALUE_BYTES
    max_clock_ahead: float = MAX_CLOCK_AHEAD
    queue: int = 50_000
    batch: int = 5000
    commit_every: float = 0.05
    maintain_every: float = 10.0
    report_every: float = 5.0
    retry_storage: float = 5.0
    supervise_every: float = 0.5
    backoff: float = 1.0
    backoff_step: float = 0.25

    PRESETS = {
        # One host: everything is near, react fast (tests and `psepr run`).
        "local": dict(announce_every=0.5, announce_ttl=1.75, fill_wait=0.6, backoff=0.5,
                      backoff_step=0.125,
                      supervise_every=0.25, maintain_every=5.0),
        # A machine room: the defaults.
        "lan": dict(),
        # Wide area: announcements may be late; do not recount replicas on a hiccup.
        "wan": dict(announce_every=3.0, announce_ttl=10.5, fill_wait=3.5, fill_timeout=30.0,
                    backoff=3.0, backoff_step=0.75, supervise_every=1.5),
    }

    def __post_init__(self) -> None:
        check_settings(self, "PLDB setting")
        if self.announce_ttl > MAX_TTL:
            raise ConfigError(f"PLDB setting announce_ttl must be at most {MAX_TTL:g} s (peers "
                              f"refuse longer announcements), got {self.announce_ttl!r}")

    @classmethod
    def preset(cls, preset: str, /, **overrides) -> "PLDBConfig":
        """A configuration from a named preset with overrides (KeyError if unknown)."""
        return cls(**{**cls.PRESETS[preset], **overrides})

    def replace(self, **changes) -> "PLDBConfig":
        return dataclasses.replace(self, **changes)
