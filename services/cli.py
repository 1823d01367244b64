"""``psepr sensors``: publish this node's facts as PLDB attribute tuples.

Hooked into the ``psepr`` command by :func:`add_parser`; errors follow the
command's rules (one line on stderr; exit 1 at run time, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import socket

EPILOG = """examples:
  psepr sensors --authority example.com                    # this host, lan timings (every 5 s)
  psepr sensors --authority example.com --once             # one full round, then exit (cron)
  psepr sensors --authority example.com --host sim1 --preset local &   # simulated hosts
  psepr sensors --authority example.com --host sim2 --preset local &   #   on one machine
  psepr pldb monitor --channel /example.com/node/          # somewhere: remember them
  psepr pldb get /example.com/node/sim1/                   # what sim1 published
(docs/sensors.md lists the fields, their units and when each is sent)
"""


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return v


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
    p.add_argument("--authority", default="example.com",
                   help="naming authority of the channel (default example.com)")
    p.add_argument("--host", default=socket.gethostname(),
                   help="node name in the channel (default: this machine's, "
                        f"{socket.gethostname()}); give each simulated host its own")
    p.add_argument("--preset", default="lan", choices=("local", "lan", "wan"),
                   help="timings: local samples every 1 s and refreshes every 10 s, lan every "
                        "5 s / 300 s, wan every 15 s / 900 s (default lan)")
    p.add_argument("--interval", type=_positive, metavar="SECONDS",
                   help="seconds between samples (overrides the preset)")
    p.add_argument("--refresh", type=_positive, metavar="SECONDS",
                   help="re-publish unchanged values this often (overrides the preset; "
                        "expire becomes 3 times it)")
    p.add_argument("--once", action="store_true",
                   help="sample once, publish every field, exit")
    add_router_arg(p)
    p.set_defaults(func=cmd_sensors)


def cmd_sensors(args) -> int:
    from .sensors import main
    return main(args)
