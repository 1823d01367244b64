"""The tuple store: one monitor's memory, in SQLite.

Theory of operation
-------------------
``history`` is an append-only log of every version, in arrival order: the
durable record, one INSERT per tuple, bounded by ``history_rows``
(:meth:`TupleStore.trim` cuts the oldest rows off its tail).  The newest version
of every ``(channel, field)`` lives in memory (a sorted dict, so a subtree is a
key range) and only moves forward in version order (the order of
:attr:`psepr.pldb.Tuple.version`), so tuples may arrive in any order, live or
from peers, without harm.  :meth:`TupleStore.checkpoint` writes the keys that
changed into the ``latest`` table with the log position it reflects (the
*watermark*); opening a store loads ``latest`` and replays the log after the
watermark, so a crash between checkpoints loses nothing the log has.  Trimming
never cuts above the watermark.  Keeping ``latest`` as a checkpoint instead of
an upsert per tuple halves the SQLite work of ingest, and answers for current
values come from memory.

Why a log and not a table clustered by key: tuples of many keys arrive mixed,
and a B-tree ordered by ``(channel, field, time)`` takes each new version in
the middle of the keys' earlier ones, so every commit rewrites pages all over
the file: about twice the cost per tuple of the log (``python -m
benchmarks.pldb_layouts`` measures both; figures in docs/benchmarks.md).
History queries, rare and exploratory, scan the log instead; the bound keeps
that scan bounded.  The bound is on rows, not per key: a chatty key can push a
quiet key's old versions out, but never its latest value.

The live stream delivers each event once, so appends are not checked for
duplicates; :meth:`TupleStore.merge` (a new monitor filling from its peers, who
send versions it may already hold) skips ids it has.

A subtree is a range of channel texts: every channel below ``/a/b/`` starts with
``/a/b/`` and so sorts in ``['/a/b/', '/a/b0')`` ('0' follows '/').

The database runs in WAL mode with ``synchronous=NORMAL``: a crash of the
machine may lose the last transaction, never corrupt the file; a restarted
monitor has its tuples back.  SQLite failures (disk full, read-only file,
corruption) surface as :class:`psepr.errors.StorageError`, for the monitor to
report as an event instead of dying.

One store per file: a store holds an exclusive ``flock`` on ``<file>.lock``
while it is open.  SQLite would let two monitors share a database, each
announcing itself as a replica, so that PLDB counted two copies where one disk
held them (a copied command line, two supervisors given one ``--data-dir``).
The second is refused, naming the first one's process.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import Iterable

import orjson
from sortedcontainers import SortedDict

from psepr import lockfile
from psepr.errors import StorageError
from psepr.pldb import Query, Tuple

log = logging.getLogger("psepr.pldb")

#: Rows of history kept by default (about 110 bytes each on disk).
HISTORY_ROWS = 500_000
#: Bumped when the schema changes; a file of another version is refused.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    channel TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, time REAL NOT NULL,
    expire REAL, source TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (channel, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    channel TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, time REAL NOT NULL,
    expire REAL, source TEXT NOT NULL, id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_COLUMNS = "channel, field, value, time, expire, source, id"


def _newer(row: tuple, old: tuple) -> bool:
    """Whether storage row ``row`` is a newer version than ``old`` (Tuple.version order)."""
    return (row[3], len(row[6]), row[6]) > (old[3], len(old[6]), old[6])

_HISTORY = ("INSERT INTO history (channel, field, value, time, expire, source, id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _subtree(channel: str) -> tuple[str, str]:
    return channel, channel[:-1] + "0"


class TupleStore:
    """A monitor's tuples in one SQLite file.

    Args:
        path: the database file (created with its directory), or ``":memory:"``.
        history_rows: rows of history kept (the log's bound).

    Raises:
        StorageError: the file cannot be opened or is not a PLDB database of
            this schema version.
    """

    def __init__(self, path: "str | Path", history_rows: int = HISTORY_ROWS) -> None:
        if history_rows < 1:
            raise StorageError(f"history_rows must be at least 1, got {history_rows}", str(path))
        self.path = str(path)
        self.history_rows = history_rows
        self._lock = None
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._lock = _lock_file(self.path)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if version != SCHEMA_VERSION and (version or tables):
                self._db.close()
                raise StorageError(f"{self.path} is not a PLDB database of schema version "
                                   f"{SCHEMA_VERSION} (it says {version}); move it away", self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A monitor's working set is every (channel, field): keep its pages
            # cached (32 MiB), and checkpoint the WAL less often (pages hot in
            # many commits are copied once per checkpoint).
            self._db.execute("PRAGMA cache_size=-32768")
            self._db.execute("PRAGMA wal_autocheckpoint=4000")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._latest: SortedDict = SortedDict(
                ((r[0], r[1]), r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM latest"))
            row = self._db.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchone()
            self._watermark = row[0] if row else 0
            self._dirty: set[tuple[str, str]] = set()    # keys changed since the checkpoint
            self._gone: set[tuple[str, str]] = set()     # keys purged since the checkpoint
            # The log after the watermark: versions the last checkpoint did not see.
            self._remember(self._db.execute(
                f"SELECT {_COLUMNS} FROM history WHERE rowid > ? ORDER BY rowid",
                (self._watermark,)).fetchall())
            self._last_rowid = self._db.execute(
                "SELECT coalesce(max(rowid), 0) FROM history").fetchone()[0]
        except StorageError:
            self._unlock()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise StorageError(f"cannot open PLDB database {self.path}: {exc}", self.path) from None

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()          # closing the descriptor releases the flock
            self._lock = None

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"PLDB database {self.path}: {what} failed: {exc}", self.path)

    @contextlib.contextmanager
    def _transaction(self, what: str):
        """One transaction; a failure rolls it back and raises StorageError naming ``what``."""
        db = self._db
        try:
            db.execute("BEGIN")
            yield db
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._fail(what, exc) from None

    def apply(self, tuples: Iterable[Tuple]) -> int:
        """Store tuples (one transaction).

        Returns:
            How many rows were written to the history.

        Raises:
            StorageError: the write failed (nothing of this batch is stored).
        """
        return self.apply_rows([(t.channel, t.field, orjson.dumps(t.value), t.time, t.expire,
                                 t.source, t.id) for t in tuples])

    def apply_rows(self, rows: list[tuple]) -> int:
        """:meth:`apply` for rows of :func:`psepr.pldb.attribute_row` (no Tuple objects).

        Returns:
            How many rows were written to the history.

        Raises:
            StorageError: the write failed (nothing of this batch is stored).
        """
        if not rows:
            return 0
        with self._transaction("write") as db:
            db.executemany(_HISTORY, rows)
            last = db.execute("SELECT max(rowid) FROM history").fetchone()[0]
        self._last_rowid = last
        self._remember(rows)
        return len(rows)

    def _remember(self, rows: Iterable[tuple]) -> None:
        """Move the in-memory newest versions forward with these stored rows."""
        latest, dirty = self._latest, self._dirty
        get, put = latest.get, dict.__setitem__     # a known key: no sorted-list work
        for row in rows:
            key = (row[0], row[1])
            old = get(key)
            if old is None:
                latest[key] = row
            elif row[3] > old[3] or (row[3] == old[3] and _newer(row, old)):
                put(latest, key, row)
            else:
                continue
            dirty.add(key)

    def checkpoint(self) -> int:
        """Write the newest versions that changed into ``latest``, with the watermark.

        Returns:
            How many keys were written or deleted.

        Raises:
            StorageError: the write failed (the next checkpoint retries them).
        """
        if not self._dirty and not self._gone:
            return 0
        latest = self._latest
        rows = [latest[k] for k in self._dirty if k in latest]
        with self._transaction("checkpoint") as db:
            db.executemany(f"INSERT OR REPLACE INTO latest ({_COLUMNS}) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            db.executemany("DELETE FROM latest WHERE channel = ? AND field = ?", self._gone)
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('watermark', ?)",
                       (self._last_rowid,))
        n = len(rows) + len(self._gone)
        self._watermark = self._last_rowid
        self._dirty, self._gone = set(), set()
        return n

    def merge(self, tuples: Iterable[Tuple]) -> int:
        """Store tuples that may already be here (a fill from peers): known ids are skipped.

        Returns:
            How many versions were new.

        Raises:
            StorageError: the read or write failed.
        """
        try:
            have = {i for (i,) in self._db.execute("SELECT id FROM history")}
        except sqlite3.Error as exc:
            raise self._fail("read", exc) from None
        return self.apply([t for t in tuples if t.id not in have])

    def query(self, q: Query, now: float) -> list[Tuple]:
        """The tuples answering ``q`` at wall-clock ``now`` (see :meth:`Query.wants`).

        Current values come from memory, history from the log.

        Raises:
            StorageError: the read failed.
        """
        lo, hi = _subtree(q.channel.text)
        if not q.history:
            since = q.since
            rows = [r for r in self._latest.values()[self._latest.bisect_left((lo, "")):
                                                   self._latest.bisect_left((hi, ""))]
                    if (q.field is None or r[1] == q.field)
                    and (since is None or r[3] >= since)
                    and (r[4] is None or r[3] + r[4] > now)]
        else:
            sql = f"SELECT {_COLUMNS} FROM history WHERE channel >= ? AND channel < ?"
            args: list = [lo, hi]
            if q.field is not None:
                sql += " AND field = ?"
                args.append(q.field)
            if q.since is not None:
                sql += " AND time >= ?"
                args.append(q.since)
            try:
                rows = self._db.execute(sql + " ORDER BY rowid", args).fetchall()
            except sqlite3.Error as exc:
                raise self._fail("query", exc) from None
        return [Tuple(c, f, orjson.loads(v), t, e, s, i) for c, f, v, t, e, s, i in rows]

    def trim(self) -> int:
        """Cut the history log down to its newest ``history_rows`` rows.

        Returns:
            How many rows were deleted.

        Raises:
            StorageError: the write failed.
        """
        # Never above the watermark: the log after it is what a restart replays.
        cut = min(self._last_rowid - self.history_rows, self._watermark)
        if cut <= 0:
            return 0
        try:
            return self._db.execute("DELETE FROM history WHERE rowid <= ?", (cut,)).rowcount
        except sqlite3.Error as exc:
            raise self._fail("trim", exc) from None

    def purge(self, now: float) -> int:
        """Forget expired current values (the next checkpoint deletes them from ``latest``).

        Returns:
            How many were forgotten.
        """
        gone = [k for k, r in self._latest.items() if r[4] is not None and r[3] + r[4] <= now]
        for k in gone:
            del self._latest[k]
            self._dirty.discard(k)
            self._gone.add(k)
        return len(gone)

    def __len__(self) -> int:
        """How many current values (one per ``(channel, field)``) the store holds."""
        return len(self._latest)

    def counts(self) -> dict:
        """``{"latest": n, "history": n, "bytes": file size}`` for stats and the CLI."""
        latest = len(self._latest)
        try:
            history = self._db.execute("SELECT count(*) FROM history").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._fail("count", exc) from None
        size = 0
        if self.path != ":memory:":
            for suffix in ("", "-wal"):
                p = Path(self.path + suffix)
                if p.exists():
                    size += p.stat().st_size
        return {"latest": latest, "history": history, "bytes": size}

    def close(self) -> None:
        """Checkpoint (best effort: the log has everything anyway) and close.  Idempotent."""
        try:
            self.checkpoint()
        except StorageError:
            pass
        try:
            self._db.close()
        except sqlite3.Error:
            pass
        self._unlock()


def _lock_file(path: str):
    """Hold ``<path>.lock`` exclusively (see the module docstring); returns the open file,
    or None where the filesystem cannot lock.

    Raises:
        StorageError: another store holds it; the message names its process.
        OSError: the lock file cannot be opened.
    """
    try:
        return lockfile.hold(path + ".lock")
    except lockfile.LockHeld as held:
        raise StorageError(f"PLDB database {path} is in use by another monitor (process "
                           f"{held.holder}): one monitor per database; give this one its own "
                           f"--data-dir", path) from None
    except lockfile.LockUnsupported as exc:
        log.warning("PLDB database %s: cannot lock %s.lock (%s); nothing stops a second "
                    "monitor from using this file", path, path, exc)
        return None
