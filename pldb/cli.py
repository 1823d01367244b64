"""``psepr pldb ...``: query PLDB, run monitors and supervisors, list monitors.

Hooked into the ``psepr`` command by :func:`add_parser`; errors follow the
command's rules (one line on stderr; exit 1 at run time, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import orjson

from psepr.cli import element, local_time, seconds
from psepr.errors import PseprError, UsageError

EPILOG = """examples:
  psepr pldb get /example.com/node/x.example.com/ load_avg        # last value, with its time
  psepr pldb get /example.com/node/ --since 10m --history         # every field below, with history
  psepr pldb supervisor --channels /example.com/node/ --replicas 3
  psepr pldb supervisor --channels /example.com/node/ --replicas auto --availability 0.9999
  psepr pldb monitor --channel /example.com/node/ --data-dir /var/lib/psepr/pldb
  psepr pldb monitors --authority example.com                     # who keeps what
"""


def default_data_dir(host: str) -> Path:
    """``$XDG_DATA_HOME/psepr/pldb/<host>`` (else ``~/.local/share/...``)."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "psepr" / "pldb" / host


def add_parser(sub, add_router_arg) -> None:
    """Add ``pldb`` and its subcommands to the ``psepr`` subparsers ``sub``."""
    p = sub.add_parser("pldb", help="the tuple store: query it, run monitors and supervisors",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    psub = p.add_subparsers(dest="pldb_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    g = psub.add_parser("get", help="the last values (or history) below a channel")
    g.add_argument("channel", help="the channel; every channel below it is included")
    g.add_argument("field", nargs="?", help="only this field (default: all)")
    g.add_argument("--since", metavar="SPAN", help="only values of the last SPAN (30s, 10m, 2h, 1d)")
    g.add_argument("--history", action="store_true", help="every retained version, oldest first")
    g.add_argument("--follow", action="store_true",
                   help="then print every new value as it is sent, until interrupted (no gap, "
                        "no duplicate between the answer and the live values)")
    g.add_argument("--timeout", type=seconds, default=2.0, help="seconds to wait for monitors (2)")
    g.add_argument("--json", action="store_true", help="one JSON object per tuple")
    add_router_arg(g)
    g.set_defaults(func=cmd_get)

    def add_host_args(x) -> None:
        x.add_argument("--host", default=socket.gethostname(), type=element,
                       help="host name to announce (default: this machine's); several "
                            "simulated hosts may run on one machine")
        x.add_argument("--data-dir", metavar="DIR",
                       help="where databases live (default $XDG_DATA_HOME/psepr/pldb/HOST)")
        x.add_argument("--preset", default="lan", choices=("local", "lan", "wan"),
                       help="timings (default lan; docs/pldb.md explains each)")
        add_router_arg(x)

    m = psub.add_parser("monitor", help="run one monitor of a channel subtree")
    m.add_argument("--channel", required=True, help="the subtree to remember, e.g. /example.com/node/")
    add_host_args(m)
    m.set_defaults(func=cmd_monitor)

    s = psub.add_parser("supervisor", help="keep k monitors on every channel, across hosts")
    s.add_argument("--channels", nargs="+", required=True, metavar="CHANNEL",
                   help="the subtrees to keep")
    s.add_argument("--replicas", default="3",
                   help="k monitors per channel, on distinct hosts, or 'auto' (default 3)")
    s.add_argument("--availability", type=float, default=0.999,
                   help="with --replicas auto: the target availability A (default 0.999)")
    add_host_args(s)
    s.set_defaults(func=cmd_supervisor)

    ls = psub.add_parser("monitors", help="list the monitors announcing themselves")
    ls.add_argument("--authority", default="example.com", type=element,
                    help="whose monitors (default example.com)")
    ls.add_argument("--wait", type=seconds, default=2.0,
                    help="seconds to listen for announcements (default 2; at least one "
                         "announcement period)")
    ls.add_argument("--json", action="store_true", help="one JSON object per monitor")
    add_router_arg(ls)
    ls.set_defaults(func=cmd_monitors)


def _span(d: float) -> str:
    """``d`` seconds as people read them: 42 s, 12 min, 5.0 h, 3.2 d (a sign kept)."""
    a = abs(d)
    if a < 120:
        return f"{d:.0f} s"
    if a < 7200:
        return f"{d / 60:.0f} min"
    if a < 172800:
        return f"{d / 3600:.1f} h"
    if a < 1000 * 86400:
        return f"{d / 86400:.1f} d"
    # An expiry far past any lifetime (a sender's 1e300 s): bounded, not 300 digits.
    return f"{d / 31557600:.3g} years"


def _ago(t: float, now: float) -> str:
    # A sender's clock may run a little fast (monitors take up to max_clock_ahead).
    return f"{_span(now - t)} ago" if t <= now else f"{_span(t - now)} ahead"


def cmd_get(args) -> int:
    from psepr.cli import _connect
    from psepr.pldb import make_query, parse_span, query, watch
    if args.follow and (args.history or args.since):
        raise UsageError("--follow prints the current values, then new ones: it takes neither "
                         "--history nor --since")
    since = time.time() - parse_span(args.since) if args.since else None
    make_query(args.channel, args.field, since, args.history)    # bad input: at once
    with _connect(args) as con:
        if args.follow:
            for t in watch(con, args.channel, field=args.field, timeout=args.timeout):
                _print_tuples([t], args.json)
            return 0
        tuples = query(con, args.channel, field=args.field, since=since, history=args.history,
                       timeout=args.timeout)
    if not tuples and not args.json:
        print(f"# no tuples on {args.channel}" + (f" for field {args.field}" if args.field else ""),
              file=sys.stderr)
    _print_tuples(tuples, args.json)
    return 0


def _print_tuples(tuples: list, as_json: bool) -> None:
    now = time.time()
    out = sys.stdout
    if as_json:
        for t in tuples:
            out.write(orjson.dumps({"channel": t.channel, "field": t.field, "value": t.value,
                                    "time": t.time, "expire": t.expire, "source": t.source,
                                    "id": t.id}).decode() + "\n")
    elif tuples:
        width = max(len(t.channel) for t in tuples)
        fwidth = max(len(t.field) for t in tuples)
        for t in tuples:
            value = orjson.dumps(t.value).decode()
            life = "" if t.expire is None else (
                f"  expires in {_span(t.expires_at - now)}" if t.expires_at > now
                else "  expired")
            out.write(f"{t.channel:<{width}}  {t.field:<{fwidth}}  {value}  "
                      f"({local_time(t.time)}, {_ago(t.time, now)}){life}\n")
    out.flush()


def _run_until_signalled(main) -> int:
    """Run ``main(stop_event)`` in a new loop; SIGTERM/SIGINT set the event."""
    from psepr.config import tune_gc
    tune_gc()      # monitors take tens of thousands of events a second
    async def runner():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)
    asyncio.run(runner())
    return 0


def _data_dir(args) -> Path:
    return Path(args.data_dir) if args.data_dir else default_data_dir(args.host)


def cmd_monitor(args) -> int:
    from .config import PLDBConfig
    from .monitor import Monitor, connect, database_path, first_set, monitor_root
    from .store import TupleStore
    root = monitor_root(args.channel)     # before a database file is made for it
    config = PLDBConfig.preset(args.preset)
    store = TupleStore(database_path(_data_dir(args), root), config.history_rows)

    async def main(stop):
        con = await connect(args.router, config, args.preset, service=args.service,
                            keyfile=args.key, server_key=args.server_key)
        mon = Monitor(con, root, store, host=args.host, config=config)
        try:
            await mon.start()
            print(f"monitor {mon.id} of {root.text} on {con.router} (database {store.path})",
                  flush=True)
            await mon.wait_ready()
            print(f"monitor {mon.id} ready: {mon.store.counts()['latest']} tuples", flush=True)
            await first_set(stop, mon.ended)
            if mon.failed is not None:
                raise PseprError(f"monitor {mon.id} stopped: {mon.failed!r} (the log above "
                                 f"says where)")
        finally:
            await mon.stop()
            await con.close()
    return _run_until_signalled(main)


def cmd_supervisor(args) -> int:
    from .supervisor import Supervisor
    replicas = args.replicas
    if replicas != "auto":
        try:
            replicas = int(replicas)
        except ValueError:
            raise UsageError(f"--replicas must be a positive integer or 'auto', got "
                             f"{args.replicas!r}") from None
    if not 0 < args.availability < 1:
        raise UsageError(f"--availability must be between 0 and 1, got {args.availability}")
    sup = Supervisor(args.router, args.channels, replicas, host=args.host,
                     data_dir=_data_dir(args), preset=args.preset,
                     availability=args.availability)

    async def main(stop):
        try:
            await sup.start()
            print(f"supervisor on {sup.host} keeps {args.replicas} replica(s) of "
                  f"{' '.join(r.text for r in sup.roots)} (data in {sup.data_dir})", flush=True)
            await stop.wait()
        finally:
            await sup.stop()
    return _run_until_signalled(main)


def cmd_monitors(args) -> int:
    from psepr.cli import _connect
    from psepr.errors import EventError, TimeoutError as PTimeout
    from psepr.pldb import ANNOUNCE, monitors_channel
    from .peers import PeerTable, parse_announcement
    table = PeerTable()
    with _connect(args) as con:
        lease = con.lease(monitors_channel(args.authority), type=ANNOUNCE, propagated=True)
        deadline = time.monotonic() + args.wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = lease.receive(timeout=left)
            except PTimeout:
                break
            try:
                table.heard(parse_announcement(ev.payload, time.monotonic()))
            except EventError:
                continue
    monitors = table.all()
    for m in monitors:
        if args.json:
            print(orjson.dumps({"monitor": m.id, "host": m.host, "root": m.root.text,
                                "state": m.state, "tuples": m.tuples, "stored": m.stored,
                                "dropped": m.dropped}).decode())
        else:
            print(f"{m.root.text}  {m.id}  host={m.host}  {m.state}  tuples={m.tuples}  "
                  f"stored={m.stored}" + (f"  DROPPED={m.dropped}" if m.dropped else ""))
    if not monitors and not args.json:
        print(f"# no monitor of {args.authority} announced itself within {args.wait} s",
              file=sys.stderr)
    return 0
