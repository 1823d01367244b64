"""The tuple store: one monitor's memory, in SQLite.

Theory of operation
-------------------
Two tables.  ``latest`` holds the newest version of every ``(channel, field)``
(an upsert that only ever moves forward in version order, the order of
:attr:`psepr.pldb.Tuple.version`, so tuples may
arrive in any order and from peers without harm).  ``history`` holds every
version seen, keyed by ``(channel, field, time, id)``: a version arriving twice
(live and again from a peer while filling) is stored once, and the key order
is the order trimming and history queries want.  History is bounded per
``(channel, field)``: counts are kept in memory and :meth:`TupleStore.trim`
deletes the oldest versions of the keys that went over the limit.  Expired
values are left out of answers at once and deleted from ``latest`` by
:meth:`TupleStore.purge` (history keeps them until trimmed: the past is the past).

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

#: Versions kept per (channel, field) by default.
HISTORY_LIMIT = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    channel TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, time REAL NOT NULL,
    expire REAL, source TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (channel, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history (
    channel TEXT NOT NULL, field TEXT NOT NULL, time REAL NOT NULL, id TEXT NOT NULL,
    value BLOB NOT NULL, expire REAL, source TEXT NOT NULL,
    PRIMARY KEY (channel, field, time, id)) WITHOUT ROWID;
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
_HISTORY = ("INSERT OR IGNORE INTO history (channel, field, value, time, expire, source, id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _subtree(channel: str) -> tuple[str, str]:
    return channel, channel[:-1] + "0"


class TupleStore:
    """A monitor's tuples in one SQLite file.

    Args:
        path: the database file (created with its directory), or ``":memory:"``.
        history_limit: versions kept per ``(channel, field)``.

    Raises:
        StorageError: the file cannot be opened or is not a PLDB database.
    """

    def __init__(self, path: "str | Path", history_limit: int = HISTORY_LIMIT) -> None:
        self.path = str(path)
        self.history_limit = history_limit
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A monitor's working set is every (channel, field): keep its pages
            # cached (32 MiB), and checkpoint the WAL less often (pages hot in
            # many commits are copied once per checkpoint).
            self._db.execute("PRAGMA cache_size=-32768")
            self._db.execute("PRAGMA wal_autocheckpoint=4000")
            self._db.executescript(_SCHEMA)
            self._counts: dict[tuple[str, str], int] = {
                (c, f): n for c, f, n in
                self._db.execute("SELECT channel, field, count(*) FROM history GROUP BY 1, 2")}
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open PLDB database {self.path}: {exc}", self.path) from None
        self._over: set[tuple[str, str]] = {k for k, n in self._counts.items()
                                             if n > history_limit}

    def _fail(self, what: str, exc: Exception) -> StorageError:
        return StorageError(f"PLDB database {self.path}: {what} failed: {exc}", self.path)

    def apply(self, tuples: Iterable[Tuple]) -> int:
        """Store tuples (one transaction); versions already held are ignored.

        Returns:
            How many versions were new.

        Raises:
            StorageError: the write failed (nothing of this batch is stored).
        """
        return self.apply_rows([(t.channel, t.field, orjson.dumps(t.value), t.time, t.expire,
                                 t.source, t.id) for t in tuples])

    def apply_rows(self, rows: list[tuple]) -> int:
        """:meth:`apply` for rows of :func:`psepr.pldb.attribute_row` (no Tuple objects).

        Returns:
            How many versions were new.

        Raises:
            StorageError: the write failed (nothing of this batch is stored).
        """
        if not rows:
            return 0
        db = self._db
        try:
            db.execute("BEGIN")
            before = db.total_changes
            db.executemany(_HISTORY, rows)
            new = db.total_changes - before
            db.executemany(_UPSERT, rows)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._fail("write", exc) from None
        if new:
            counts, limit, over = self._counts, self.history_limit, self._over
            for r in rows:
                key = (r[0], r[1])
                n = counts.get(key, 0) + 1   # a duplicate only over-counts until trim()
                counts[key] = n
                if n > limit:
                    over.add(key)
        return new

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
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._fail("query", exc) from None
        return [Tuple(c, f, orjson.loads(v), t, e, s, i) for c, f, v, t, e, s, i in rows]

    def trim(self) -> int:
        """Delete the oldest versions of every ``(channel, field)`` over the history limit.

        Returns:
            How many versions were deleted.

        Raises:
            StorageError: the write failed.
        """
        if not self._over:
            return 0
        db, limit = self._db, self.history_limit
        deleted = 0
        try:
            db.execute("BEGIN")
            for channel, field in self._over:
                cur = db.execute(
                    "DELETE FROM history WHERE channel = ? AND field = ? AND (time, id) IN "
                    "(SELECT time, id FROM history WHERE channel = ? AND field = ? "
                    " ORDER BY time DESC, id DESC LIMIT -1 OFFSET ?)",
                    (channel, field, channel, field, limit))
                deleted += cur.rowcount
                self._counts[(channel, field)] = limit
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise self._fail("trim", exc) from None
        self._over.clear()
        return deleted

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
