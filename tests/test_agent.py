"""The node agent's heartbeat core and its handling of accusations (no sockets).

Proves that beats keep a fixed grid (no drift after a late step, no burst to
catch up), counters grow by one per beat, a suspicion or failure of the current
incarnation is refuted with a higher incarnation and an immediate beat, older
or harmless verdicts are ignored, and garbage is counted, never fatal.  The
agent shell is driven with a recording stand-in for the connection; the real
one is exercised in tests/test_e2e_membership.py.
"""

from __future__ import annotations

from services.agent import Agent, Heartbeater
from services.membership import MAX_COUNT, Heartbeat


def test_beats_keep_a_fixed_grid_without_bursts():
    b = Heartbeater("h", 0.5, 1000, now=10.0)
    assert b.due(10.0)
    assert b.beat(10.0).counter == 1 and b.next_at == 10.5
    assert not b.due(10.4)
    b.beat(10.6)                         # a little late: the grid holds
    assert b.next_at == 11.0
    b.beat(13.0)                         # very late: the next one a period later, no burst
    assert b.next_at == 13.5 and b.counter == 3


def test_a_suspicion_of_the_current_incarnation_is_refuted_at_once():
    b = Heartbeater("h", 0.5, 1000, now=0.0)
    b.beat(0.0)
    assert b.accused("suspect", 1000, now=0.2)
    assert b.incarnation == 1001 and b.due(0.2) and b.refutations == 1
    hb = b.beat(0.2)
    assert (hb.incarnation, hb.counter) == (1001, 2)
    assert b.accused("failed", 1005, now=0.3) and b.incarnation == 1006   # past a later one


def test_old_or_harmless_verdicts_are_ignored():
    b = Heartbeater("h", 0.5, 1000, now=0.0)
    assert not b.accused("suspect", 999, now=0.1)      # an older life
    assert not b.accused("alive", 1000, now=0.1)
    assert not b.accused("recovered", 1000, now=0.1)
    assert b.incarnation == 1000


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []

    def send(self, channel, payload, type=None):
        self.sent.append((channel.text, payload, type))


def test_agent_beats_every_host_and_refutes_only_its_own():
    con = Recorder()
    agent = Agent(con, "example.com", ["a", "b"], period=0.5, clock=lambda: 0.0,
                  wall=lambda: 2.0)
    assert agent.step(0.0) == 0.5
    assert [(c, p["host"], p["counter"], t) for c, p, t in con.sent] == [
        ("/example.com/farm/heartbeat/a/", "a", 1, "heartbeat"),
        ("/example.com/farm/heartbeat/b/", "b", 1, "heartbeat")]
    assert con.sent[0][1]["incarnation"] == 2000
    agent.hear({"host": "b", "state": "suspect", "incarnation": 2000}, now=0.1)
    con.sent.clear()
    agent.step(0.1)                                     # b beats at once, a waits
    assert [(p["host"], p["incarnation"]) for _, p, _ in con.sent] == [("b", 2001)]
    for garbage in ("text", {"host": "zz", "incarnation": 1}, {"host": "a"},
                    {"host": "a", "incarnation": True}, None,
                    # Refuted, these would make beats no detector takes, and 2**64 no
                    # beat at all: orjson refused it, and the agent process died.
                    {"host": "a", "state": "suspect", "incarnation": 2**64 - 1},
                    {"host": "a", "state": "failed", "incarnation": MAX_COUNT}):
        agent.hear(garbage, now=0.2)
    assert agent.bad == 7 and agent.beaters["a"].incarnation == 2000
    agent.hear({"host": "a", "state": "suspect", "incarnation": MAX_COUNT - 1}, now=0.3)
    con.sent.clear()
    agent.step(0.3)
    beat = con.sent[0][1]
    assert beat["incarnation"] == MAX_COUNT and Heartbeat.parse(beat).incarnation == MAX_COUNT
