"""``psepr sensors``, ``psepr agent``, ``psepr detector``, ``psepr members``.

Hooked into the ``psepr`` command by :func:`add_parser`; errors follow the
command's rules (one line on stderr; exit 1 at run time, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import socket

from psepr.cli import element, seconds

EPILOG = """examples:
  psepr sensors --authority example.com                    # this host, lan timings (every 5 s)
  psepr sensors --authority example.com --once             # one full round, then exit (cron)
  psepr sensors --authority example.com --host sim1 --preset local &   # simulated hosts
  psepr sensors --authority example.com --host sim2 --preset local &   #   on one machine
  psepr pldb monitor --channel /example.com/node/          # somewhere: remember them
  psepr pldb get /example.com/node/sim1/                   # what sim1 published
(docs/sensors.md lists the fields, their units and when each is sent)
"""


def add_parser(sub, add_router_arg) -> None:
    """Add the ``sensors`` subcommand to the ``psepr`` subparsers ``sub``.

    Args:
        sub: the ``psepr`` command's subparsers.
        add_router_arg: adds ``--router``, ``--service``, ``--key``, ``--server-key``.
    """
    p = sub.add_parser(
        "sensors", help="publish this node's facts (load, memory, disks, packages, kernel, "
                        "addresses) as attribute tuples on /AUTHORITY/node/HOST/",
        description="Sample this node's facts and publish each as an attribute tuple on "
                    "/AUTHORITY/node/HOST/ when it changes, and at least every refresh "
                    "interval, with expire set so that a dead node's facts go stale.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authority", default="example.com", type=element,
                   help="naming authority of the channel (default example.com)")
    p.add_argument("--host", default=socket.gethostname(), type=element,
                   help="node name in the channel (default: this machine's, "
                        f"{socket.gethostname()}); give each simulated host its own")
    p.add_argument("--preset", default="lan", choices=("local", "lan", "wan"),
                   help="timings: local samples every 1 s and refreshes every 10 s, lan every "
                        "5 s / 300 s, wan every 15 s / 900 s (default lan)")
    p.add_argument("--interval", type=seconds, metavar="SECONDS",
                   help="seconds between samples (overrides the preset)")
    p.add_argument("--refresh", type=seconds, metavar="SECONDS",
                   help="re-publish unchanged values this often (overrides the preset; "
                        "expire becomes 3 times it)")
    p.add_argument("--once", action="store_true",
                   help="sample once, publish every field, exit")
    add_router_arg(p)
    p.set_defaults(func=cmd_sensors)


FD_EPILOG = """examples:
  psepr agent --authority example.com                      # on every host: heartbeats + sensors
  psepr detector --authority example.com --preset lan      # on any 3 hosts (--name must differ)
  psepr members --authority example.com                    # the current view
  psepr lease /example.com/farm/membership/ --type membership   # changes as they happen
  psepr agent --authority example.com --host sim1 --host sim2 --no-sensors   # simulated hosts
(docs/membership.md explains the presets, the quorum rule and the traffic per node)
"""


def add_membership_parsers(sub, add_router_arg) -> None:
    """Add ``agent``, ``detector`` and ``members`` to the ``psepr`` subparsers."""
    import socket as _socket
    host = _socket.gethostname()
    presets = ("local", "lan", "wan")
    p = sub.add_parser(
        "agent", help="heartbeats (and sensors) for this host, on /AUTHORITY/farm/heartbeat/HOST/",
        description="Send this host's heartbeat (incarnation and counter) every period, refute "
                    "suspicions of it, say 'left' on SIGTERM/SIGINT, and run its node sensors.",
        epilog=FD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authority", default="example.com", type=element,
                   help="naming authority of the channels (default example.com)")
    p.add_argument("--host", action="append", metavar="NAME", type=element,
                   help=f"node name (default: this machine's, {host}); repeat it to simulate "
                        "several hosts in one process")
    p.add_argument("--preset", default="lan", choices=presets,
                   help="timings: heartbeat every 0.2 s (local), 0.5 s (lan), 2 s (wan); "
                        "default lan")
    p.add_argument("--period", type=seconds, metavar="SECONDS",
                   help="seconds between heartbeats (overrides the preset; detectors must "
                        "use a t_fail of several periods)")
    p.add_argument("--no-sensors", action="store_true",
                   help="heartbeats only (no node sensors)")
    add_router_arg(p)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser(
        "detector", help="a failure detector: suspects silent nodes; the leader publishes views",
        description="Lease the heartbeats under /AUTHORITY/farm/, suspect nodes that fall "
                    "silent, share opinions with the other detectors, and (the live healthy "
                    "detector with the smallest name) publish numbered membership views.",
        epilog=FD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authority", default="example.com", type=element,
                   help="naming authority of the channels (default example.com)")
    p.add_argument("--name", default=f"det-{host}", type=element,
                   help=f"this detector's name, unique among detectors (default det-{host})")
    p.add_argument("--preset", default="lan", choices=presets,
                   help="timings: local suspects after 1 s of silence, lan after 2 s, wan "
                        "after 10 s (default lan)")
    p.add_argument("--method", choices=("gossip", "phi"),
                   help="gossip: counter + fixed timeout (default); phi: accrual detector")
    add_router_arg(p)
    p.set_defaults(func=cmd_detector)

    p = sub.add_parser(
        "members", help="the current membership view: node, state, incarnation, since",
        description="Ask the detectors for the current view and print it.",
        epilog=FD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authority", default="example.com", type=element,
                   help="naming authority of the channels (default example.com)")
    p.add_argument("--timeout", type=seconds, default=2.0, metavar="SECONDS",
                   help="how long to wait for a detector's answer (default 2)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    add_router_arg(p)
    p.set_defaults(func=cmd_members)


def cmd_agent(args) -> int:
    from .agent import main
    return main(args)


def cmd_detector(args) -> int:
    from .detector import main
    return main(args)


def cmd_members(args) -> int:
    import json

    import psepr
    from psepr.cli import local_time

    from .membership import members
    with psepr.connect(args.router, preset="lan", service=args.service,
                       keyfile=args.key, server_key=args.server_key) as con:
        view, answer = members(con, args.authority, timeout=args.timeout)
    if args.json:
        print(json.dumps({**answer, "view": view.payload()}, indent=2))
        return 0
    print(f"view {view.number} by {view.leader or '-'}; detectors: "
          f"{', '.join(answer.get('detectors') or []) or '-'}")
    if not view.members:
        print("(no members)")
        return 0
    width = max(4, *(len(h) for h in view.members))
    print(f"{'node':<{width}}  {'state':<9} {'incarnation':>14}  since")
    for host, m in sorted(view.members.items()):
        print(f"{host:<{width}}  {m.state:<9} {m.incarnation:>14}  {local_time(m.since)}")
    return 0


def cmd_sensors(args) -> int:
    from .sensors import main
    return main(args)
