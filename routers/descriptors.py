"""A router's file descriptors: the limit raised at start, and a warning near it.

Theory of operation
-------------------
Every client connection and peer link holds a descriptor in the router's
process.  Linux usually gives a process a soft limit of 1,024 open files under
a far larger hard limit; :func:`raise_open_files_limit`, called by the
processes that run routers (``psepr router``, ``psepr run``), lifts the soft
limit to the hard one, as servers commonly do at start.

At the limit, ``accept()`` fails with ``EMFILE``, the connection stays queued
in the kernel, and libzmq's listener, woken again at once, retries: its I/O
thread spins at full CPU for as long as a connection waits, and libzmq says
nothing (pyzmq issue #1642; measured: a router under ``ulimit -n 200`` with 400
connecting clients used 2.99 s of CPU in 3 s).  Sessions already open carry
on.  Nothing outside libzmq can pause its listener short of ``unbind``, which
closes every session accepted through that endpoint too, so the spin is left
to the raised limit.  What PsEPR adds is the word: :class:`DescriptorWatch`,
run at the router's periodic ticks, counts the descriptors the process holds
and warns, at most once a minute, when they reach 90 % of the limit or the
limit itself, naming the limit and what to change.  (``EVENT_ACCEPT_FAILED``
from a socket monitor would name the failures themselves, but a listener that
spins sends thousands a second, and libzmq blocks its I/O thread, every
session with it, whenever the monitor's reader falls 1,000 events behind.)
"""

from __future__ import annotations

import errno
import logging
import os
import resource

log = logging.getLogger("psepr.router")

#: The share of the limit at which the watch starts warning.
NEAR = 0.9


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files (``RLIMIT_NOFILE``) to its hard limit.

    An unlimited hard limit is read as the kernel's ``fs.nr_open``.

    Returns:
        ``(before, after)``: the soft limit before and after (equal when it could
        not be raised, or needed no raising).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = int(f.read())
        except (OSError, ValueError):
            want = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:
        log.debug("could not raise the open-files limit from %d to %d: %s", soft, want, exc)
        return soft, soft
    return soft, want


def open_files() -> tuple[int | None, int]:
    """The descriptors this process holds, and its soft limit.

    Returns:
        ``(held, limit)``; ``held`` is None when it cannot be counted, and equals
        ``limit`` when counting failed for want of a descriptor (``EMFILE``).
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        held = len(os.listdir("/proc/self/fd")) - 1     # less the listing's own
    except OSError as exc:
        held = limit if exc.errno == errno.EMFILE else None
    return held, limit


class DescriptorWatch:
    """Warns when the router's process nears its open-files limit.

    Args:
        router: the router's name (for log lines).
        every: seconds between counts.
        say_every: seconds between warnings.
        count: returns ``(held, limit)`` (:func:`open_files`; tests pass their own).
    """

    def __init__(self, router: str, every: float = 5.0, say_every: float = 60.0,
                 count=open_files) -> None:
        self.router = router
        self.every = every
        self.say_every = say_every
        self._count = count
        self._next = float("-inf")
        self._said = float("-inf")

    def check(self, now: float) -> str | None:
        """Count the descriptors if due, and warn if they near the limit.

        Args:
            now: the monotonic time.

        Returns:
            The warning logged, or None.
        """
        if now < self._next:
            return None
        self._next = now + self.every
        held, limit = self._count()
        if held is None or held < NEAR * limit or now - self._said < self.say_every:
            return None
        self._said = now
        if held >= limit:
            line = (f"router {self.router}: this process holds all the {limit} descriptors "
                    f"it may open (one per connection): new connections wait, and ZeroMQ "
                    f"retries them at full CPU")
        else:
            line = (f"router {self.router}: this process holds {held} of the {limit} "
                    f"descriptors it may open (one per connection); at the limit new "
                    f"connections wait, and ZeroMQ retries them at full CPU")
        line += "; raise the limit (`ulimit -n`, or LimitNOFILE= in a systemd unit)"
        log.warning("%s", line)
        return line
