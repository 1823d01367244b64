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
_PEERS = re.compile(r"peers on (\S+)")


class ChildProcess:
    """What the test's child processes share: draining their output, stopping them by pid.

    Subclasses set ``proc`` (a Popen with text pipes) and ``output`` (a list).
    """

    proc: subprocess.Popen
    output: list

    def _drain(self, stream) -> None:
        try:
            for line in stream:
                self.output.append(line)
        except (ValueError, OSError):
            pass

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for f in (self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass
        return self.proc.returncode


class RouterProcess(ChildProcess):
    """A `psepr router` child process.

    Attributes:
        url: the bound client endpoint.
        proc: the Popen object.
        name: router name.
    """

    def __init__(self, *extra: str, name: str = "r1", timeout: float = 10.0,
                 env: dict | None = None, preexec_fn=None) -> None:
        self.name = name
        cmd = [sys.executable, "-m", "psepr.cli", "router", "--name", name, *extra]
        if not any(a == "--listen" for a in extra):
            cmd += ["--listen", "tcp://127.0.0.1:0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)
        self.urls: list[str] = []
        self.peer_url: str | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()
                raise RuntimeError(f"router exited early (rc={self.proc.wait()}): {err}")
            m = _LISTEN.search(line)
            if m:
                self.urls.append(m.group(1))
            m = _PEERS.search(line)
            if m:
                self.peer_url = m.group(1)
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

    def rss(self) -> int:
        import psutil
        return psutil.Process(self.proc.pid).memory_info().rss


@pytest.fixture
def router_proc():
    """A fresh router process per test; yields the RouterProcess."""
    r = RouterProcess()
    yield r
    r.stop()


def _processes(cls):
    """A fixture body: yields ``start(*args, **kw) -> cls(...)``; stops every one afterwards."""
    started: list = []

    def _start(*args: str, **kw):
        p = cls(*args, **kw)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()


@pytest.fixture
def start_router():
    """Factory: start_router(*args, name=...) -> RouterProcess; all stopped afterwards."""
    yield from _processes(RouterProcess)


def start_overlay(start, n: int, edges, preset: str = "local", prefix: str = "r",
                  extra=(), dial=None) -> list[RouterProcess]:
    """Start ``n`` routers linked by ``edges`` (pairs of indexes); wait until converged.

    Router i dials every j < i it has an edge to (a link configured on one side
    carries traffic both ways).  Each router listens for clients and peers on
    ephemeral loopback ports.

    Args:
        start: the ``start_router`` fixture.
        n: number of routers (named ``<prefix>0`` ...).
        edges: iterable of (i, j) index pairs.
        preset: router preset.
        extra: more router arguments for every router.
        dial: ``dial(i, j, url) -> url``: the endpoint router i dials to reach j
            (e.g. a cuttable proxy in front of ``url``); default ``url``.

    Returns:
        The RouterProcess list, in index order.
    """
    dials: dict[int, list[int]] = {i: [] for i in range(n)}
    for a, b in edges:
        a, b = max(a, b), min(a, b)
        if b not in dials[a]:
            dials[a].append(b)
    routers: list[RouterProcess] = []
    for i in range(n):
        args = ["--preset", preset, "--peer-listen", "tcp://127.0.0.1:0", *extra]
        for j in dials[i]:
            url = routers[j].peer_url
            args += ["--peer", dial(i, j, url) if dial is not None else url]
        routers.append(start(*args, name=f"{prefix}{i}"))
    wait_converged(routers)
    return routers


def overlay_view(url: str) -> dict:
    """``{router: reachable}`` as the router at ``url`` sees the overlay."""
    import psepr
    with psepr.connect(url, preset="local") as con:
        st = con.status(timeout=5.0)
    return {r["router"]: r["reachable"] for r in st["routers"]}


def wait_converged(routers: list[RouterProcess], timeout: float = 30.0,
                   expect: list[str] | None = None) -> float:
    """Wait until every router sees exactly ``expect`` (default: all) reachable.

    Returns:
        Seconds it took.

    Raises:
        AssertionError: not converged in time (the message shows the last views).
    """
    names = sorted(expect if expect is not None else [r.name for r in routers])
    t0 = time.monotonic()
    views: dict = {}
    while time.monotonic() - t0 < timeout:
        views = {r.name: overlay_view(r.url) for r in routers if r.name in names}
        if all(sorted(k for k, v in view.items() if v) == names for view in views.values()):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"overlay did not converge within {timeout} s: {views}")


class CLIProcess(ChildProcess):
    """A long-running ``psepr ...`` child (monitor, supervisor, sensors, ...).

    Waits until a line of its stdout contains ``ready`` (readiness is awaited,
    never slept for), then keeps draining both pipes into ``output``.

    Attributes:
        proc: the Popen object.
        lines: stdout lines seen up to readiness.
        output: every line printed afterwards (stdout and stderr).
    """

    def __init__(self, *args: str, router: str, ready: str, timeout: float = 20.0,
                 env: dict | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "psepr.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PSEPR_ROUTERS": router, **(env or {})})
        self.lines: list[str] = []
        self.output: list[str] = []
        threading.Thread(target=self._drain, args=(self.proc.stderr,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                self.stop()
                raise RuntimeError(f"psepr {' '.join(args)} exited early "
                                   f"(rc={self.proc.returncode}): {''.join(self.output)}")
            self.lines.append(line)
            if ready in line:
                break
        else:
            self.stop()
            raise RuntimeError(f"psepr {' '.join(args)} did not print {ready!r} in {timeout} s")
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()


@pytest.fixture
def start_cli():
    """Factory: start_cli(*args, router=url, ready=text) -> CLIProcess; all stopped afterwards."""
    yield from _processes(CLIProcess)


def wait_for(what: str, predicate, timeout: float = 10.0, detail=None):
    """Poll ``predicate`` (bounded in time) until it returns something true; return that.

    Args:
        detail: called for more text for the failure message (what was seen).

    Raises:
        AssertionError: naming ``what``, when it did not happen within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout} s" + (f": {detail()}" if detail else ""))


def start_monitor(start_cli, router: RouterProcess, data_dir, channel: str, host: str = "h1"):
    """A `psepr pldb monitor` process (local preset) of ``channel``, ready to answer."""
    return start_cli("pldb", "monitor", "--channel", channel, "--host", host, "--data-dir",
                     str(data_dir), "--preset", "local", router=router.url, ready=" ready:")


def raw_send(url: str, events: list, service: str | None = None) -> None:
    """Send ``events`` as one SEND from a raw ZeroMQ client (not the SDK, which refuses
    what such a client may send), and wait until the router has read it.

    Args:
        events: ``(id, channel, type, time, fmt, opts, payload_bytes)`` tuples
            (see :func:`psepr.wire.encode_send`); fmt 0 is JSON, 1 XML.
    """
    import zmq

    from psepr import wire
    from psepr.wire import Kind
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    try:
        hello = {"v": wire.PROTOCOL_VERSION} | ({"service": service} if service else {})
        sock.send_multipart(wire.encode(Kind.HELLO, hello))
        assert sock.poll(5000), "no WELCOME"
        assert wire.decode(sock.recv_multipart())[0] == Kind.WELCOME
        sock.send_multipart(wire.encode_send(events))
        sock.send_multipart(wire.encode(Kind.PING, {"req": "done"}))   # the SEND was read
        assert sock.poll(5000), "no PONG"
        assert wire.decode(sock.recv_multipart())[0] == Kind.PONG
    finally:
        sock.close()
