"""`psepr bench idle`: what an idle client and router cost.

Starts a router, then measures (with psutil, over a few seconds) the CPU used
by this process while one thread is blocked in ``lease.receive()`` and nothing
is sent, and the router's CPU meanwhile.  A farm runs many idle clients; they
must cost next to nothing.
"""

from __future__ import annotations

import threading
import time


def main(args) -> int:
    """Print idle CPU percentages of a client with a blocked reader, and of its router."""
    import psutil

    import psepr
    from benchmarks.hop import _start_router, _stop

    seconds = 2.0 if args.quick else 5.0
    router, url = _start_router()
    try:
        con = psepr.connect(url)
        lease = con.lease("/bench/idle/")
        reader = threading.Thread(target=lambda: _swallow(lease, seconds + 2), daemon=True)
        reader.start()
        me = psutil.Process()
        rp = psutil.Process(router.pid)
        time.sleep(0.5)
        me.cpu_percent()
        rp.cpu_percent()
        time.sleep(seconds)
        client_cpu = me.cpu_percent()
        router_cpu = rp.cpu_percent()
        con.close()
    finally:
        _stop(router)
    print(f"psepr bench idle  ({seconds:g} s, one connection, one reader blocked in receive())\n")
    print(f"  client process CPU   {client_cpu:5.2f} %")
    print(f"  router process CPU   {router_cpu:5.2f} %")
    return 0


def _swallow(lease, timeout: float) -> None:
    import psepr
    try:
        lease.receive(timeout=timeout)
    except (psepr.TimeoutError, psepr.ClosedError):
        pass
