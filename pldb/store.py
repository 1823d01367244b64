"""The tuple store: one monitor's memory, in SQLite.

Theory of operation
-------------------
Two tables.  ``latest`` holds the newest version of every ``(channel, field)``,
keyed by it: an upsert that only ever moves forward in version order (the
order of :attr:`psepr.pldb.Tuple.version`), so tuples may arrive in any order,
live or from peers, without harm.  ``history`` is an append-only log of every
version, in arrival order, bounded by ``history_rows``: :meth:`TupleStore.trim`
cuts the oldest rows off its tail.

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
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterable

import orjson

from psepr.errors import StorageError
from psepr.pldb import Query, Tuple

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
"""

_UPSERT = """
INSERT INTO latest (channel, field, value, time, expire, source, id) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (channel, field) DO UPDATE SET
    value = excluded.value, time = excluded.time, expire = excluded.expire,
    source = excluded.source, id = excluded.id
WHERE excluded.time > latest.time OR (excluded.time = latest.time AND (
    length(excluded.id) > length(latest.id)
    OR (length(excluded.id) = length(latest.id) AND excluded.id > latest.id)))
"""
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
        self.path = str(path)
        self.history_rows = history_rows
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
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
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open PLDB database {self.path}: {exc}", self.path) from None

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"PLDB database {self.path}: {what} failed: {exc}", self.path)

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
        db = self._db
        try:
            db.execute("BEGIN")
            db.executemany(_HISTORY, rows)
            db.executemany(_UPSERT, rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._fail("write", exc) from None
        return len(rows)

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

        Raises:
            StorageError: the read failed.
        """
        lo, hi = _subtree(q.channel.text)
        table = "history" if q.history else "latest"
        sql = (f"SELECT channel, field, value, time, expire, source, id FROM {table} "
               "WHERE channel >= ? AND channel < ?")
        args: list = [lo, hi]
        if q.field is not None:
            sql += " AND field = ?"
            args.append(q.field)
        if q.since is not None:
            sql += " AND time >= ?"
            args.append(q.since)
        if not q.history:
            sql += " AND (expire IS NULL OR time + expire > ?)"
            args.append(now)
        else:
            sql += " ORDER BY rowid"
        try:
            rows = self._db.execute(sql, args).fetchall()
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
        try:
            return self._db.execute(
                "DELETE FROM history WHERE rowid <= (SELECT max(rowid) FROM history) - ?",
                (self.history_rows,)).rowcount
        except sqlite3.Error as exc:
            raise self._fail("trim", exc) from None

    def purge(self, now: float) -> int:
        """Delete expired values from ``latest``.

        Returns:
            How many were deleted.

        Raises:
            StorageError: the write failed.
        """
        try:
            return self._db.execute(
                "DELETE FROM latest WHERE expire IS NOT NULL AND time + expire <= ?",
                (now,)).rowcount
        except sqlite3.Error as exc:
            raise self._fail("purge", exc) from None

    def counts(self) -> dict:
        """``{"latest": n, "history": n, "bytes": file size}`` for announcements and stats."""
        try:
            latest = self._db.execute("SELECT count(*) FROM latest").fetchone()[0]
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
        """Close the database (idempotent)."""
        try:
            self._db.close()
        except sqlite3.Error:
            pass
