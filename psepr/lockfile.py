"""Exclusive locks on files: one process at a time per resource.

A PLDB database and a local farm's data directory each belong to one process at
a time; nothing else stops a second one (SQLite lets two share a database).  The
owner holds an exclusive ``flock`` on a lock file that holds its process id, so
that the second is refused with the first one's process named.  The kernel drops
the lock when the owner's descriptor closes, at exit or crash included: a
stale lock file is simply taken.
"""

from __future__ import annotations

import fcntl
import os
from typing import IO


class LockHeld(Exception):
    """Another process holds the lock.

    Attributes:
        holder: the process id written in the lock file ("?" if none was).
    """

    def __init__(self, holder: str) -> None:
        super().__init__(f"held by process {holder}")
        self.holder = holder


class LockUnsupported(Exception):
    """The filesystem cannot lock (some network ones): the caller decides whether to
    run unguarded.  The message is the system's reason."""


def hold(path: str) -> IO:
    """Take the exclusive lock on ``path`` (created if missing) and write our pid.

    Returns:
        The open lock file (closing it releases the lock).

    Raises:
        LockHeld: another process holds it.
        LockUnsupported: the filesystem cannot lock.
        OSError: the file cannot be opened.
    """
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise LockHeld(holder) from None
    except OSError as exc:
        f.close()
        raise LockUnsupported(str(exc)) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f
