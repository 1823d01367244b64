"""Shared fixtures: real router processes on loopback with ephemeral ports.

``router_proc`` starts ``python -m psepr.cli router --listen tcp://127.0.0.1:0``
as a child process, waits for its "listening on" line (readiness is awaited,
never slept for), and stops it by its own pid at the end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_LISTEN = re.compile(r"listening on (\S+)")


class RouterProcess:
    """A `psepr router` child process.

    Attributes:
        url: the bound client endpoint.
        proc: the Popen object.
        name: router name.
    """

    def __init__(self, *extra: str, name: str = "r1", timeout: float = 10.0,
                 env: dict | None = None) -> None:
        self.name = name
        cmd = [sys.executable, "-m", "psepr.cli", "router", "--name", name, *extra]
        if not any(a == "--listen" for a in extra):
            cmd += ["--listen", "tcp://127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.urls: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()
                raise RuntimeError(f"router exited early (rc={self.proc.wait()}): {err}")
            m = _LISTEN.search(line)
            if m:
                self.urls.append(m.group(1))
            if " ready " in line:
                break
        else:
            self.stop()
            raise RuntimeError("router did not become ready")
        self.url = self.urls[0]
        # Keep reading both pipes so that a chatty router never blocks on a full pipe;
        # what it printed stays available in self.output for assertions.
        self.output: list[str] = []
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=self._drain, args=(stream,), daemon=True).start()

    def _drain(self, stream) -> None:
        try:
            for line in stream:
                self.output.append(line)
        except (ValueError, OSError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass
        return self.proc.returncode


@pytest.fixture
def router_proc():
    """A fresh router process per test; yields the RouterProcess."""
    r = RouterProcess()
    yield r
    r.stop()


@pytest.fixture
def start_router():
    """Factory: start_router(*args, name=...) -> RouterProcess; all stopped afterwards."""
    started: list[RouterProcess] = []

    def _start(*extra: str, **kw) -> RouterProcess:
        r = RouterProcess(*extra, **kw)
        started.append(r)
        return r

    yield _start
    for r in started:
        r.stop()
