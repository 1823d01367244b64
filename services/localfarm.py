"""The clients of the embedded local farm (``psepr run``, ``make run``).

Theory of operation
-------------------
``psepr run`` starts routers in one process; this module adds what a farm runs
on its hosts, as clients of those routers in the same process: one PLDB
supervisor per router (each router stands for a host, ``local-1`` ...), keeping
``k`` monitors of ``/<authority>/node/``, one failure detector per router
(``d1`` ...), this machine's node sensors on ``/<authority>/node/<hostname>/``
and its heartbeat agent.  They use the SDK like any other client (supervisors
and detectors an asyncio loop in one thread, the sensors and the agent a
thread each), so the farm a new user meets is the real one, only in one
process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import psepr
import psepr.aio
from pldb.config import PLDBConfig
from pldb.supervisor import Supervisor

from .agent import Agent
from .detection import DetectionConfig
from .detector import Detector
from .sensors import SensorConfig, Sensors

log = logging.getLogger("psepr.localfarm")


class LocalFarmClients:
    """PLDB supervisors and this host's sensors for a set of local routers.

    Args:
        urls: the routers' client endpoints (one simulated host each).
        data_dir: where the monitors' databases live (``<data_dir>/local-<i>``).
        authority: the naming authority of the node channels.
        replicas: k monitors per channel (at most the number of routers).
    """

    def __init__(self, urls: list[str], data_dir: "str | Path", authority: str = "example.com",
                 replicas: int = 2) -> None:
        self.urls = urls
        self.data_dir = Path(data_dir)
        self.authority = authority
        self.replicas = max(1, min(replicas, len(urls)))
        self.host = socket.gethostname()
        self.channel = f"/{authority}/node/"
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()      # the supervisors run
        self._sensing = threading.Event()    # the sensors' first round went to PLDB
        self._error: BaseException | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start the supervisors, then the sensors once a monitor listens; return then.

        Raises:
            PseprError: they could not start (the message says why).
        """
        self._threads = [threading.Thread(target=self._run_async, name="pldb", daemon=True),
                         threading.Thread(target=self._run_sensors, name="sensors", daemon=True),
                         threading.Thread(target=self._run_agent, name="agent", daemon=True)]
        for t in self._threads:
            t.start()
        if not (self._ready.wait(timeout) and self._sensing.wait(timeout)) \
                or self._error is not None:
            self.stop()
            raise psepr.PseprError(f"the local farm's PLDB did not start: "
                                   f"{self._error or 'no answer in time'}")

    def _run_async(self) -> None:
        """The PLDB supervisors and the failure detectors, in one event loop."""
        async def main() -> None:
            sups = [Supervisor(url, [self.channel], self.replicas, host=f"local-{i + 1}",
                               data_dir=self.data_dir / f"local-{i + 1}", preset="local",
                               config=PLDBConfig.preset("local"))
                    for i, url in enumerate(self.urls)]
            cons, dets = [], []
            try:
                for s in sups:
                    await s.start()
                for i, url in enumerate(self.urls):
                    con = await psepr.aio.connect(url, preset="local", service="detector")
                    cons.append(con)
                    dets.append(Detector(con, self.authority, f"d{i + 1}",
                                         DetectionConfig.preset("local")))
                    await dets[-1].start()
                self._ready.set()
                while not self._stop.is_set():
                    await asyncio.sleep(0.2)
            finally:
                for d in dets:
                    await d.stop()
                for c in cons:
                    await c.close()
                for s in sups:
                    await s.stop()
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start(), or logged while running
            self._error = exc
            self._ready.set()
            log.error("local farm PLDB stopped: %s", exc)

    def _run_sensors(self) -> None:
        try:
            with psepr.connect(self.urls, preset="local", service="sensors") as con:
                # The first round publishes every fact; wait until a monitor
                # listens, or PLDB would only learn them at the next refresh.
                while not self._stop.is_set():
                    try:
                        psepr.pldb.query(con, self.channel, timeout=0.5)
                        break
                    except psepr.NoMonitor:
                        continue
                Sensors(con, self.authority, self.host, SensorConfig.preset("local")).run(
                    self._stop, on_ready=lambda n: self._sensing.set())
        except psepr.PseprError as exc:
            log.error("local farm sensors stopped: %s", exc)
        finally:
            self._sensing.set()

    def _run_agent(self) -> None:
        try:
            with psepr.connect(self.urls, preset="local", service="agent") as con:
                period = DetectionConfig.preset("local").t_gossip
                Agent(con, self.authority, [self.host], period).run(self._stop)
        except psepr.PseprError as exc:
            log.error("local farm agent stopped: %s", exc)

    def stop(self) -> None:
        """Stop the agent (it says left), the sensors, the detectors and the
        supervisors (their monitors say goodbye)."""
        self._stop.set()
        for t in self._threads:
            t.join(15)
