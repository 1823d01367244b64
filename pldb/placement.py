"""Where monitors run: one supervisor's decisions (pure core), and adaptive k.

Theory of operation
-------------------
Every supervisor watches the monitors channel and, on its own, keeps each of
its channels at ``k`` live monitors on distinct hosts (as the PLDB of PsEPR
did: no leader, no election).  Each round, for each channel:

* fewer than ``k`` live monitors and none here: *start* one here;
* more than ``k`` and one of them here: *stop* it if it is among the surplus.
  The surplus is the same for every supervisor that sees the same table (the
  live monitors ordered ready-first, then by id, minus the first ``k``), so the
  supervisors agree on who leaves without talking.

Acting on a glimpse would make every supervisor start a monitor for the same
gap at once.  So a supervisor that sees a gap first draws a back-off: a random
time in ``[0, backoff)`` plus ``step`` per monitor it runs or is about to start
(hosts with less to do go first); when the back-off ends it looks again and
acts only if the gap is still there.  Announcements of the first mover reach the others
within their back-off, and they stand down.  Decisions come back as data
(:class:`Action`); the shell starts and stops monitors.

Adaptive replication (:func:`replicas_for`): with ``p`` the probability that a
host's monitor is unavailable at a random moment and ``q`` the probability that
a query arrives while the channel depends on its replicas (1 = always, the
safe default), a channel with ``k`` independent replicas answers with
availability ``A = 1 - q * p**k``.  The smallest ``k`` reaching a target ``A``
is ``ceil(log((1 - A) / q) / log p)``, at least 1 and at most the number of
hosts that run supervisors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from psepr.channel import Channel

from .peers import READY, PeerTable

START, STOP = "start", "stop"


@dataclass(frozen=True, slots=True)
class Action:
    """Start or stop this supervisor's monitor of ``root``."""

    kind: str
    root: Channel


def replicas_for(hosts: int, availability: float = 0.999, p: float = 0.1,
                 q: float = 1.0) -> int:
    """The number of replicas that reaches ``availability`` (see module docs).

    Args:
        hosts: hosts that can run a monitor (the upper bound).
        availability: target A, in (0, 1).
        p: probability that one host's monitor is unavailable, in (0, 1).
        q: probability that a query depends on the replicas, in (0, 1].

    Returns:
        k, between 1 and ``max(hosts, 1)``.

    Raises:
        ValueError: a probability out of range.
    """
    if not 0 < availability < 1 or not 0 < p < 1 or not 0 < q <= 1:
        raise ValueError(f"need 0 < availability < 1, 0 < p < 1, 0 < q <= 1; got "
                         f"availability={availability}, p={p}, q={q}")
    needed = 1.0 - availability
    k = 1 if q <= needed else math.ceil(math.log(needed / q) / math.log(p) - 1e-9)
    return max(1, min(k, max(hosts, 1)))


def surplus(live: list, k: int) -> list:
    """The live monitors beyond the ``k`` that stay (ready ones first, then by id)."""
    keep_order = sorted(live, key=lambda m: (m.state != READY, m.id))
    return keep_order[k:]


class Placement:
    """One supervisor's placement decisions.

    Args:
        host: this supervisor's host.
        roots: the channels it supervises.
        backoff: the random part of a back-off, in seconds (see module docs).
        rng: the random generator (injected: tests pass a seeded one).
        step: the back-off added per monitor this host runs or is about to
            start (default ``backoff / 4``).
    """

    def __init__(self, host: str, roots: list[Channel], backoff: float,
                 rng: random.Random, step: float | None = None) -> None:
        self.host = host
        self.roots = list(roots)
        self.backoff = backoff
        self.step = backoff / 4 if step is None else step
        self.rng = rng
        self._due: dict[tuple[str, Channel], float] = {}   # (kind, root) -> when to act

    def decide(self, table: PeerTable, local: dict[Channel, str], k: int,
               now: float) -> list[Action]:
        """This round's actions.

        Args:
            table: the monitors heard of (this host's included once they announced).
            local: ``root -> monitor id`` of the monitors running here.
            k: the target replicas per channel.
            now: monotonic time.

        Returns:
            The actions to take now (at most one per channel).
        """
        actions = []
        for root in self.roots:
            live = table.live_on(root)
            ids = {m.id for m in live}
            mine = local.get(root)
            count = len(live) + (mine is not None and mine not in ids)
            if count < k and mine is None and self.host not in {m.host for m in live}:
                want = START
            elif count > k and mine is not None and mine in {m.id for m in surplus(live, k)}:
                want = STOP
            else:
                want = None
            for kind in (START, STOP):
                if kind != want:
                    self._due.pop((kind, root), None)
            if want is None:
                continue
            due = self._due.get((want, root))
            if due is None:
                # Busier hosts wait longer; starts already planned count as load,
                # so one host does not take every channel of a new farm at once.
                load = len(local) + sum(kind == START for kind, _ in self._due)
                self._due[(want, root)] = now + self.rng.uniform(0, self.backoff) \
                    + self.step * load
            elif now >= due:
                del self._due[(want, root)]
                actions.append(Action(want, root))
        return actions
