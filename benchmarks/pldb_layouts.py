"""Why PLDB's history is an append-only log: two SQLite layouts, measured side by side.

``python -m benchmarks.pldb_layouts`` writes 20 rounds of 20,000 keys (1,000
nodes x 20 fields), 2,000 rows per transaction (a monitor's group commit at
about 40,000 tuples/s), into the ``latest`` table plus a history that is either

* ``clustered``:  a B-tree keyed by (channel, field, time, id), or
* ``log``:        an append-only rowid table (what pldb/store.py uses), or
* ``log+index``:  the log with an index on (channel, field),

and prints the cost per tuple and the file size of each.  Same settings as the
store (WAL, synchronous=NORMAL, 32 MiB cache).  Bounded: 400,000 rows each.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time

N, ROUNDS, BATCH = 20_000, 20, 2_000

LATEST = """CREATE TABLE latest (channel TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL,
    time REAL NOT NULL, expire REAL, source TEXT NOT NULL, id TEXT NOT NULL,
    PRIMARY KEY (channel, field)) WITHOUT ROWID;"""
COLUMNS = """channel TEXT NOT NULL, field TEXT NOT NULL, time REAL NOT NULL, id TEXT NOT NULL,
    value BLOB NOT NULL, expire REAL, source TEXT NOT NULL"""
LAYOUTS = {
    "clustered": f"CREATE TABLE history ({COLUMNS}, PRIMARY KEY (channel, field, time, id)) "
                 "WITHOUT ROWID;",
    "log": f"CREATE TABLE history ({COLUMNS});",
    "log+index": f"CREATE TABLE history ({COLUMNS}); CREATE INDEX hk ON history(channel, field);",
}
UPSERT = """INSERT INTO latest (channel, field, value, time, expire, source, id)
VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (channel, field) DO UPDATE SET value = excluded.value,
time = excluded.time, expire = excluded.expire, source = excluded.source, id = excluded.id
WHERE excluded.time > latest.time"""
HISTORY = ("INSERT INTO history (channel, field, value, time, expire, source, id) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")


def measure(directory: str, name: str, schema: str) -> tuple[float, float]:
    """Returns (microseconds per tuple, MiB on disk) for one layout."""
    path = os.path.join(directory, name)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-32768",
                   "wal_autocheckpoint=4000"):
        db.execute(f"PRAGMA {pragma}")
    db.executescript(LATEST + schema)
    now = time.time()
    start = time.perf_counter()
    for r in range(ROUNDS):
        rows = [(f"/bench.example.com/node/n{i // 20:04}/", f"f{i % 20:02}", b"0.5", now + r,
                 3600.0, "anonymous/vm-1-1", f"abcdef012345.{r * N + i}") for i in range(N)]
        for k in range(0, N, BATCH):
            db.execute("BEGIN")
            db.executemany(HISTORY, rows[k:k + BATCH])
            db.executemany(UPSERT, rows[k:k + BATCH])
            db.execute("COMMIT")
    per = (time.perf_counter() - start) / (ROUNDS * N) * 1e6
    db.close()
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
               if f.startswith(name))
    return per, size / 2**20


def main() -> None:
    print(f"{ROUNDS} rounds x {N:,} keys, {BATCH:,} rows per transaction")
    with tempfile.TemporaryDirectory() as d:
        for name, schema in LAYOUTS.items():
            per, mib = measure(d, name, schema)
            print(f"  {name:<10} {per:6.2f} us per tuple   {mib:5.0f} MiB")


if __name__ == "__main__":
    main()
