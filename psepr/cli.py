"""The ``psepr`` command: routers, sending, leasing, stats, keys, PLDB, sensors, benchmarks.

Every client command takes ``--router URL`` (repeatable; default
``PSEPR_ROUTERS``, else the servers file, else ``tcp://127.0.0.1:7600``) and
reports an error as one line on stderr with a non-zero exit status:
1 for a failure at run time, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import orjson

from . import __version__
from .config import DEFAULT_ROUTER, positive_number
from .errors import AddressInUse, ConfigError, PseprError, UsageError

EPILOG_ROUTER = """examples:
  psepr router --listen tcp://127.0.0.1:7600 --name r1
  psepr router --listen tcp://127.0.0.1:0            # ephemeral port, printed on start
  psepr router --listen tcp://10.0.0.1:7600 --curve --key keys/r1.key_secret --acl acl.toml
  psepr router --name r1 --listen tcp://10.0.0.1:7600 --peer-listen tcp://10.0.0.1:7601 \\
               --peer tcp://10.0.0.2:7601 --insecure     # one router of an overlay
  psepr router --config r1.toml                           # the same settings from a file
(docs/operations.md explains running an overlay on several hosts)
"""

EPILOG_SEND = """examples:
  psepr send /example.com/heartbeat/x.example.com/ --type heartbeat --json '{"load": 0.4}'
  psepr send /example.com/heartbeat/x.example.com/ --xml '<payload xmlns="heartbeat"><load>0.4</load></payload>'
  psepr send /example.com/node/x/ --attribute load_avg=0.4 --expire 60
"""

EPILOG_LEASE = """examples:
  psepr lease /example.com/heartbeat/ --type heartbeat --duration 120
  psepr lease /example.com/ --count 1                   # exit after one event
  psepr lease /example.com/ --output xml                # PsEPR XML, one document per line
"""


def count(text: str) -> int:
    """argparse type: a whole number of at least 1 (checked before connecting)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not positive_number(n, whole=True):
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (checked before connecting)."""
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not positive_number(v):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return v


def element(text: str) -> str:
    """argparse type: a name that stands as one channel element (an authority, a
    host, a detector's name): printable, 1 to 1,024 characters, without whitespace,
    '/' or '*'.  Checked before connecting, and named by its option."""
    from .channel import element_ok
    if not element_ok(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} must be one channel element: printable text of 1 to 1,024 "
            f"characters without whitespace, '/' or '*'")
    return text


def local_time(t: float) -> str:
    """Wall-clock time ``t`` as local ``YYYY-MM-DD HH:MM:SS``, for tables.

    A time from the wire is whatever its sender put there: one before year 1 or
    past 9999 is shown as the number rather than ending the command.
    """
    import time
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    except (OverflowError, OSError, ValueError):
        return f"time {t!r}"


def _add_router_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", action="append", metavar="URL",
                   help="router endpoint (repeat for fail-over); default: $PSEPR_ROUTERS, the "
                        "servers file, or tcp://127.0.0.1:7600")
    p.add_argument("--service", help="service name to declare (without CURVE it is your "
                                     "principal)")
    p.add_argument("--key", metavar="FILE", help="CURVE: this client's .key_secret file")
    p.add_argument("--server-key", metavar="KEY", help="CURVE: the router's public key or .key "
                                                        "file")


def _connect(args, **kw):
    from .client import connect
    return connect(args.router, service=args.service, keyfile=args.key,
                   server_key=args.server_key, **kw)


def _payload_from(args):
    """Returns (payload, format, type) from --json/--xml/--attribute/--text.

    The whole event is checked here, before connecting: bad input fails at once,
    even with no router up, rather than after the wait for one.
    """
    from .session import make_entry
    payload, fmt, typ = _read_payload(args)
    make_entry(args.channel, payload, typ, fmt, getattr(args, "to_service", None),
               getattr(args, "to_instance", None))
    return payload, fmt, typ


def _read_payload(args):
    from .event import ATTRIBUTE, attribute
    chosen = [n for n in ("json", "xml", "attribute", "text") if getattr(args, n) is not None]
    if len(chosen) > 1:
        raise UsageError(f"give only one of --json, --xml, --attribute, --text (got "
                         f"{', '.join('--' + c for c in chosen)})")
    if args.expire is not None and args.attribute is None:
        raise UsageError("--expire is an attribute's expiry: give it with --attribute "
                         "FIELD=VALUE")
    if args.json is not None:
        text = sys.stdin.read() if args.json == "-" else args.json
        try:
            return orjson.loads(text), "json", args.type
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"--json is not valid JSON: {exc}") from None
    if args.xml is not None:
        text = sys.stdin.read() if args.xml == "-" else args.xml
        return text, "xml", args.type
    if args.attribute is not None:
        field, sep, value = args.attribute.partition("=")
        if not sep:
            raise UsageError("--attribute needs FIELD=VALUE, e.g. load_avg=0.4")
        try:
            v = orjson.loads(value)
        except orjson.JSONDecodeError:
            v = value
        return attribute(field, v, args.expire), "json", args.type or ATTRIBUTE
    if args.text is not None:
        return args.text, "json", args.type
    return None, "json", args.type


def cmd_send(args) -> int:
    payload, fmt, typ = _payload_from(args)
    with _connect(args) as con:
        for _ in range(args.count):
            eid = con.send(args.channel, payload, type=typ, format=fmt,
                           to_service=args.to_service, to_instance=args.to_instance)
        con.flush(timeout=args.timeout)
    if args.count == 1 and not args.quiet:
        print(eid)
    return 0


def _print_event(ev, output: str) -> None:
    try:
        _write_event(ev, output)
    except PseprError as exc:   # one bad event from someone else must not end the session
        print(f"psepr: event {ev.id} from {ev.from_service} could not be printed: {exc}",
              file=sys.stderr)


def _write_event(ev, output: str) -> None:
    if output == "xml":
        line = ev.to_xml()
    elif output == "payload":
        p = ev.payload
        line = p if isinstance(p, str) and ev.format == "xml" else orjson.dumps(p).decode()
    else:
        line = ev.to_json().decode()
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cmd_lease(args) -> int:
    from .errors import TimeoutError as PTimeout
    with _connect(args) as con:
        # propagated: once this returns, a sender at any router of the overlay reaches us.
        lease = con.lease(args.channel, duration=args.duration, type=args.type,
                          propagated=True)
        if not args.quiet:
            print(f"# leased {lease.channel.text} for {lease.granted:g} s on {con.router} "
                  f"(type {args.type or 'any'})", file=sys.stderr)
        n = 0
        while args.count is None or n < args.count:
            try:
                ev = lease.receive(timeout=args.timeout)
            except PTimeout:
                raise PseprError(f"no event on {lease.channel.text} within {args.timeout} s") \
                    from None
            _print_event(ev, args.output)
            n += 1
    return 0


def cmd_request(args) -> int:
    payload, fmt, typ = _payload_from(args)
    with _connect(args) as con:
        ev = con.request(args.channel, payload, type=typ, format=fmt, timeout=args.timeout)
        _print_event(ev, args.output)
    return 0


def _fmt_stats(st: dict) -> str:
    lines = [f"router {st['router']} (authority {st['authority']}), up {st['uptime']:.0f} s"]
    for key in ("connections", "leases", "channels_leased", "events_in", "events_out",
                "dropped", "undelivered", "errors", "queued_events"):
        lines.append(f"  {key:<16} {st.get(key, 0)}")
    lines.append(f"  {'in_rate':<16} {st['in_rate']:.1f}/s")
    lines.append(f"  {'out_rate':<16} {st['out_rate']:.1f}/s")
    for c in st.get("slow_connections", []):
        lines.append(f"  slow: {c['principal']}/{c['instance']} dropped {c['dropped']}")
    return "\n".join(lines)


def cmd_stats(args) -> int:
    with _connect(args) as con:
        if not args.watch:
            st = con.stats(timeout=args.timeout)
            print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() if args.json
                  else _fmt_stats(st))
            return 0
        from .wire import ROUTER_SERVICE, STATS_TYPE
        w = con.welcome
        ch = f"/{w['authority']}/_sys/routers/{w['router']}/stats/"
        lease = con.lease(ch, type=STATS_TYPE, duration=600)
        print(f"# watching {ch}", file=sys.stderr)
        n = 0
        while args.count is None or n < args.count:
            ev = lease.receive(timeout=max(args.timeout, 30.0))
            if ev.from_service != ROUTER_SERVICE:
                # Anyone may send on the channel; only the router may use its service name.
                print(f"# skipped event {ev.id} from {ev.from_service}/{ev.from_instance}: not "
                      f"the router's", file=sys.stderr)
                continue
            st = ev.payload
            print(orjson.dumps(st).decode() if args.json else _fmt_stats(st) + "\n")
            sys.stdout.flush()
            n += 1
    return 0


def _fmt_status(st: dict) -> str:
    lines = [f"overlay seen from router {st['router']}"]
    lines.append(f"  {'router':<14} {'reach':<6} {'via':<10} {'conns':>6} {'leases':>7} "
                 f"{'events in':>10} {'events out':>11} {'dropped':>8} {'interest':>9}  links (rtt ms)")
    for r in st["routers"]:
        load = r.get("load") or {}
        via = "-" if r.get("self") else (r.get("next_hop") or "-")
        reach = "self" if r.get("self") else ("yes" if r.get("reachable") else "NO")
        links = ", ".join(f"{p} {rtt:g}" for p, rtt in sorted(r.get("links", {}).items())) or "-"
        lines.append(f"  {r['router']:<14} {reach:<6} {via:<10} {load.get('connections', 0):>6} "
                     f"{load.get('leases', 0):>7} {load.get('events_in', 0):>10} "
                     f"{load.get('events_out', 0):>11} {load.get('dropped', 0):>8} "
                     f"{r.get('interest', 0):>9}  {links}")
    if st.get("links"):
        lines.append("  peer links of this router:")
        for l in st["links"]:
            state = "up" if l["up"] else "DOWN"
            rtt = "-" if l["rtt_ms"] is None else f"{l['rtt_ms']:.2f} ms"
            how = f"dialed {l['endpoint']}" if l["dialed"] else "accepted"
            since = f", up {l['since']:.0f} s" if l["up"] else ""
            lines.append(f"    {l['peer'] or '?':<14} {state:<5} rtt {rtt:<10} {how}{since}")
    c = st.get("counters") or {}
    if c:
        lines.append("  " + ", ".join(f"{k} {v}" for k, v in c.items()))
    s = st.get("stats") or {}
    if s:
        lines.append(f"  this router: in {s['in_rate']:.1f}/s, out {s['out_rate']:.1f}/s, "
                     f"dropped {s['dropped']}, errors {s['errors']}")
    return "\n".join(lines)


def cmd_status(args) -> int:
    with _connect(args) as con:
        st = con.status(timeout=args.timeout)
    print(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode() if args.json
          else _fmt_status(st))
    return 0


def cmd_keygen(args) -> int:
    import zmq.auth
    if not args.name or "/" in args.name or args.name in (".", "..") \
            or not args.name.isprintable():
        raise UsageError(f"key name {args.name!r} must be a plain file name (no '/'): the "
                         f"files are NAME.key and NAME.key_secret in --dir")
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    pub = d / f"{args.name}.key"
    if pub.exists() and not args.force:
        raise UsageError(f"{pub} exists; pass --force to overwrite")
    # Created private (pyzmq writes with the process umask, and a chmod afterwards
    # left the secret key readable by anyone for a moment); the public one is then
    # opened up.
    umask = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(d), args.name)
    finally:
        os.umask(umask)
    os.chmod(secret, 0o600)         # an existing file kept its mode (--force)
    os.chmod(public, 0o644)
    key = zmq.auth.load_certificate(public)[0].decode()
    print(f"public key file  {public}\nsecret key file  {secret}  (keep private)\n"
          f"public key       {key}")
    return 0


def _router_config(args):
    from routers.config import RouterConfig, load_router_file
    base: dict = load_router_file(args.config) if args.config else {}
    preset = args.preset or base.pop("preset", "lan")
    base.pop("preset", None)
    try:
        cfg = RouterConfig.preset(preset, **base)
    except KeyError:
        raise UsageError(f"unknown preset {preset!r}; choose from "
                         f"{', '.join(RouterConfig.PRESETS)}") from None
    changes: dict = {}
    for flag, field in (("name", "name"), ("authority", "authority"), ("key", "secret_key_file"),
                        ("acl", "acl_file"), ("max_lease", "max_lease"),
                        ("stats_interval", "stats_interval")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    for flag, field in (("listen", "listen"), ("peer_listen", "peer_listen"), ("peer", "peers")):
        if getattr(args, flag):
            changes[field] = tuple(getattr(args, flag))
    if args.curve:
        changes["curve"] = True
    if args.insecure:
        changes["insecure"] = True
    return cfg.replace(**changes)


def cmd_router(args) -> int:
    from routers.router import serve
    serve(_router_config(args), announce=lambda line: print(line, flush=True))
    return 0


def cmd_run(args) -> int:
    """The embedded local farm: ``--routers`` routers in one process, linked in a full mesh,
    with a PLDB supervisor and a failure detector per router, and this host's sensors and
    heartbeat agent, as their clients."""
    import signal
    import threading
    from routers.config import RouterConfig
    from routers.descriptors import raise_open_files_limit
    from routers.router import Router, is_loopback_endpoint
    from .config import tune_gc
    host, port = _split_tcp(args.listen)
    if not 1 <= args.routers <= 9:
        raise UsageError("--routers must be between 1 and 9")
    # Router i takes port + 10 * i for clients and the next port for peers.
    last = port + 10 * (args.routers - 1) + (args.routers > 1)
    if port == 0:
        raise UsageError("--listen needs a port: router i of the farm listens on port + 10 * i "
                         "(and peers on the next port), so port 0 (any free port) would put "
                         "them on ports 1, 10, 11...; give one such as tcp://127.0.0.1:7600")
    if last > 65535:
        raise UsageError(f"--listen port {port} leaves no room for {args.routers} routers: they "
                         f"would use ports {port} to {last} (router i: port + 10 * i, and the "
                         f"next for peers), and the last port is 65535")
    if not is_loopback_endpoint(args.listen):
        raise UsageError(f"psepr run is the local farm: it listens on loopback only, got "
                         f"{args.listen!r}; routers for other hosts are `psepr router` "
                         f"(docs/operations.md)")
    from pldb.cli import default_data_dir
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir("local-farm")
    farm_lock = _hold_farm_dir(data_dir)
    routers: list = []
    raise_open_files_limit()    # each connection holds a descriptor
    try:
        for i in range(args.routers):
            base = port + 10 * i
            peer_listen = (f"tcp://{host}:{base + 1}",) if args.routers > 1 else ()
            peers = tuple(f"tcp://{host}:{port + 10 * j + 1}" for j in range(i))
            cfg = RouterConfig.preset("local", name=f"r{i + 1}", listen=(f"tcp://{host}:{base}",),
                                      peer_listen=peer_listen, peers=peers)
            routers.append(Router(cfg))
    except PseprError as exc:
        for r in routers:
            r.close()
        if isinstance(exc, AddressInUse) and last + 100 <= 65535:
            raise AddressInUse(f"{exc}; `psepr run --listen tcp://{host}:{port + 100}` would "
                               f"use other ports") from None
        raise
    tune_gc()
    threads = [threading.Thread(target=r.run, name=r.config.name, daemon=True) for r in routers]
    for t in threads:
        t.start()
    urls = [r.endpoints[0] for r in routers]
    lines = [f"  router {r.config.name:<4} clients {r.endpoints[0]:<24} peers "
             f"{r.peer_endpoints[0] if r.peer_endpoints else '-'}" for r in routers]
    cfg = routers[0].config
    from services.localfarm import LocalFarmClients
    farm = LocalFarmClients(urls, data_dir)
    try:
        farm.start()
    except PseprError:
        for r in routers:
            r.stop()
        raise
    n = len(urls)
    export = f"  export PSEPR_ROUTERS={','.join(urls)}"
    # Off the default endpoint, the commands below reach this farm only once the
    # variable is set: say so first.  On it, the variable only adds fail-over.
    first = (export + "   # first: the commands below then use this farm\n"
             if urls[0] != DEFAULT_ROUTER else "")
    last = "" if first else export + "   # clients fail over between them\n"
    print(f"""PsEPR local farm is up: {n} router{'s in a full mesh' if n > 1 else ''} (authority {cfg.authority}).
""" + "\n".join(lines) + f"""
  PLDB     one supervisor per router (simulated host{f's local-1..{n}' if n > 1 else ' local-1'}), {farm.replicas} monitor{'s' if farm.replicas > 1 else ''} of {farm.channel}
           (databases in {data_dir})
  sensors  this host's facts on {farm.channel}{farm.host}/
  members  one failure detector per router ({f'd1..d{n}' if n > 1 else 'd1'}); this host's heartbeat on /{farm.authority}/farm/heartbeat/{farm.host}/

Try, in another terminal (after `. .venv/bin/activate`):
{first}  psepr lease /example.com/ --count 1                     # on r1 ({urls[0]})
  psepr send /example.com/heartbeat/x.example.com/ --type heartbeat --json '{{"load": 0.4}}' \\
        --router {urls[-1]}                   # sent at r{n}{', delivered through the overlay' if n > 1 else ''}
  psepr pldb get {farm.channel}{farm.host}/                # what PLDB remembers of this host
  psepr pldb monitors                                     # who keeps what
  psepr members                                           # which nodes are alive
  psepr status                                            # routers, links, round-trip times
{last}Stop with Ctrl-C.""", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    while not stop.wait(0.5):
        if not all(t.is_alive() for t in threads):
            print("a router thread stopped unexpectedly; shutting down", file=sys.stderr)
            break
    farm.stop()
    for r in routers:
        r.stop()
    for t in threads:
        t.join(5)
    if farm_lock is not None:
        farm_lock.close()
    print("PsEPR local farm stopped.")
    return 0


def _hold_farm_dir(data_dir: Path):
    """Hold ``<data_dir>/farm.lock`` for this run (returns the open lock file, or None
    where the filesystem cannot lock).  A second farm on one data directory started
    its routers, then logged every second that its monitors' databases were taken.

    Raises:
        UsageError: another `psepr run` holds it (named with its process id).
        ConfigError: the directory cannot be made.
    """
    from . import lockfile
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        return lockfile.hold(str(data_dir / "farm.lock"))
    except lockfile.LockHeld as held:
        raise UsageError(f"the data directory {data_dir} is in use by another `psepr run` "
                         f"(process {held.holder}); give this farm its own --data-dir") from None
    except lockfile.LockUnsupported:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot use the data directory {data_dir}: {exc.strerror}") from None


def _split_tcp(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise UsageError(f"--listen must look like tcp://127.0.0.1:7600, got {url!r}")
    return parts.hostname, parts.port


def cmd_bench(args) -> int:
    if args.which == "core":
        from benchmarks.core import main as bench_main
    elif args.which == "overlay":
        from benchmarks.overlay import main as bench_main
    elif args.which == "idle":
        from benchmarks.idle import main as bench_main
    elif args.which == "pldb":
        from benchmarks.pldb import main as bench_main
    elif args.which == "failure":
        from benchmarks.failure import main as bench_main
    elif args.which == "stages":
        from benchmarks.stages import main as bench_main
    else:
        from benchmarks.hop import main as bench_main
    return bench_main(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (like every other error of ``psepr``)
    that points at ``--help`` instead of printing the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="psepr", description="PsEPR-py: event overlay for farms "
                                "of machines (routers, channels, leases).")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    p.add_argument("--version", action="version", version=f"psepr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("router", help="run a router node (with its registry)", epilog=EPILOG_ROUTER,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--listen", action="append", metavar="URL",
                   help="client endpoint (repeatable; port 0 = ephemeral); default "
                        "tcp://127.0.0.1:7600")
    r.add_argument("--name", help="router name, unique in the overlay (default r1)")
    r.add_argument("--authority", help="authority for system channels (default psepr.local)")
    r.add_argument("--preset", help="local, lan or wan (default lan)")
    r.add_argument("--max-lease", type=seconds, metavar="S", help="longest lease grant (3600)")
    r.add_argument("--stats-interval", type=seconds, metavar="S", help="seconds between stats events")
    r.add_argument("--curve", action="store_true", help="require CURVE authentication")
    r.add_argument("--key", metavar="FILE", help="router secret key file (with --curve)")
    r.add_argument("--acl", metavar="FILE",
                   help="ACL file (TOML): principals and grants (with --curve), peer routers "
                        "allowed to link ([routers] table)")
    r.add_argument("--insecure", action="store_true",
                   help="allow non-loopback listening without CURVE")
    r.add_argument("--peer-listen", action="append", metavar="URL",
                   help="endpoint where other routers link to this one (repeatable; port 0 = "
                        "ephemeral)")
    r.add_argument("--peer", action="append", metavar="URL",
                   help="peer endpoint of another router to link to (repeatable); a link "
                        "configured on either side carries traffic both ways")
    r.add_argument("--config", metavar="FILE",
                   help="TOML file with any of these settings ([router] table: name, listen, "
                        "peer_listen, peers, preset, ...); flags override it")
    r.set_defaults(func=cmd_router)

    def add_event_args(p: argparse.ArgumentParser) -> None:
        """The channel and payload options ``send`` and ``request`` share."""
        p.add_argument("channel", help="where the event goes, e.g. /example.com/x/")
        p.add_argument("--type", help="event type (payload namespace)")
        p.add_argument("--json", metavar="JSON", help="JSON payload ('-' reads stdin)")
        p.add_argument("--xml", metavar="XML", help="XML payload element ('-' reads stdin)")
        p.add_argument("--attribute", metavar="FIELD=VALUE", help="PsEPR attribute payload")
        p.add_argument("--expire", type=seconds, metavar="S",
                       help="attribute expiry in seconds")
        p.add_argument("--text", help="a JSON string payload")

    s = sub.add_parser("send", help="send events to a channel", epilog=EPILOG_SEND,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_event_args(s)
    s.add_argument("--to-service", help="deliver only to this service")
    s.add_argument("--to-instance", help="deliver only to this instance")
    s.add_argument("--count", type=count, default=1, help="send N copies (default 1)")
    s.add_argument("--timeout", type=seconds, default=5.0,
                   help="seconds to wait for the router to take the events, once connected "
                        "(default 5)")
    s.add_argument("-q", "--quiet", action="store_true", help="do not print the event id")
    _add_router_arg(s)
    s.set_defaults(func=cmd_send)

    le = sub.add_parser("lease", help="lease a channel and print its events", epilog=EPILOG_LEASE,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    le.add_argument("channel", help="the channel to lease, everything below it included")
    le.add_argument("--type", help="only events of this type")
    le.add_argument("--duration", type=seconds, default=3600.0, help="lease seconds (renewed)")
    le.add_argument("--count", type=count, help="exit after N events")
    le.add_argument("--timeout", type=seconds, help="fail if no event within S seconds")
    le.add_argument("--output", choices=("json", "xml", "payload"), default="json",
                    help="print events as JSON (default), PsEPR XML, or payload only")
    le.add_argument("-q", "--quiet", action="store_true",
                    help="no status line on stderr (it is printed once every router of the "
                         "overlay has the lease)")
    _add_router_arg(le)
    le.set_defaults(func=cmd_lease)

    rq = sub.add_parser("request", help="send a request and print the reply",
                        description="Send one event with a reply channel (this connection's "
                        "inbox) and print the first reply; a responder answers with "
                        "con.reply(event, payload).")
    add_event_args(rq)
    rq.add_argument("--timeout", type=seconds, default=2.0,
                    help="seconds to wait for a reply (default 2)")
    rq.add_argument("--output", choices=("json", "xml", "payload"), default="json",
                    help="print the reply as JSON (default), PsEPR XML, or payload only")
    _add_router_arg(rq)
    rq.set_defaults(func=cmd_request)

    st = sub.add_parser("stats", help="print a router's counters")
    st.add_argument("--watch", action="store_true", help="follow the published stats events")
    st.add_argument("--count", type=count, help="with --watch: exit after N")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--timeout", type=seconds, default=2.0,
                    help="seconds to wait for the router's answer (default 2)")
    _add_router_arg(st)
    st.set_defaults(func=cmd_stats)

    so = sub.add_parser("status", help="print the overlay as a router sees it: routers, links "
                        "(up/down, RTT), leases, event counts, drops")
    so.add_argument("--json", action="store_true", help="print JSON")
    so.add_argument("--timeout", type=seconds, default=2.0,
                    help="seconds to wait for the router's answer (default 2)")
    _add_router_arg(so)
    so.set_defaults(func=cmd_status)

    k = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key, NAME.key_secret)")
    k.add_argument("name", help="the key's name: files NAME.key (public) and NAME.key_secret")
    k.add_argument("--dir", default="keys", help="directory (default ./keys)")
    k.add_argument("--force", action="store_true", help="overwrite existing files")
    k.set_defaults(func=cmd_keygen)

    run = sub.add_parser("run", help="start the embedded local farm (what `make run` does): "
                         "routers in a full mesh on loopback, PLDB and this host's sensors")
    run.add_argument("--listen", default="tcp://127.0.0.1:7600",
                     help="the first router's client endpoint; router i uses port + 10*i for "
                          "clients and the next port for peers (default tcp://127.0.0.1:7600)")
    run.add_argument("--routers", type=int, default=3, help="how many routers (default 3)")
    run.add_argument("--data-dir", metavar="DIR",
                     help="where the farm's PLDB monitors keep their databases (default "
                          "$XDG_DATA_HOME/psepr/pldb/local-farm)")
    run.set_defaults(func=cmd_run)

    from pldb.cli import add_parser as add_pldb_parser
    add_pldb_parser(sub, _add_router_arg)
    from services.cli import add_membership_parsers
    from services.cli import add_parser as add_services_parser
    add_services_parser(sub, _add_router_arg)
    add_membership_parsers(sub, _add_router_arg)

    b = sub.add_parser("bench", help="benchmarks (hop, overlay, pldb, failure, core, idle, "
                                     "stages)")
    b.add_argument("which", choices=("hop", "overlay", "pldb", "failure", "core", "idle",
                                     "stages"),
                   help="hop: sender -> router -> holders, each its own process; "
                        "overlay: across a chain of 3 routers, lease reach on 20 routers, "
                        "memory with 10,000 leases; "
                        "pldb: 1,000 nodes x 20 fields into 3 monitors through 3 routers, "
                        "query latency, monitor memory; "
                        "failure: 200 simulated nodes, 3 routers, 3 detectors: detection time "
                        "after SIGKILL, false failures under full CPU load, detector CPU; "
                        "core: the router and client cores alone, in process; "
                        "idle: CPU of an idle client and router; "
                        "stages: one event's latency split into its stages (sender, "
                        "transit, router, receiver) beside a minimal receiver and raw "
                        "pyzmq, at 5,000 events/s")
    b.add_argument("--events", type=count, default=300_000,
                   help="hop: events per throughput run (default 300,000)")
    b.add_argument("--quick", action="store_true", help="small counts (smoke test)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--nodes", type=count,
                   help="failure: simulated nodes (default 200; quick 20)")
    b.add_argument("--victims", type=count,
                   help="failure: nodes killed with SIGKILL (default 10; quick 2)")
    b.add_argument("--load-seconds", type=seconds, metavar="SECONDS",
                   help="failure: seconds of full CPU load (default 60; quick 3)")
    b.add_argument("--preset", choices=("local", "lan", "wan"),
                   help="failure: timings of routers, detectors and agents (default lan)")
    b.add_argument("--seed", type=int, help="failure: seed of the victims and kill moments "
                                            "(default 1)")
    b.add_argument("--aged", type=count, metavar="EVENTS", default=0,
                   help="overlay: also measure the chain's latency run after run until EVENTS "
                        "events (one segment each) have crossed the same routers, e.g. 200000 "
                        "(state that grows with traffic shows as later runs slower)")
    b.add_argument("--rounds", type=count, metavar="N",
                   help="hop, overlay (its chain and baselines): run every scenario N times, "
                        "interleaved, and report the median run (default 3; quick 1)")
    b.add_argument("--chain", action="store_true",
                   help="stages: also across a chain of 3 routers (and 3 raw forwarders)")
    b.set_defaults(func=cmd_bench)
    return p


def _innermost(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the innermost command ``args`` names (``psepr pldb get``)."""
    while True:
        action = next((a for a in parser._actions
                       if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if name not in getattr(action, "choices", {}):
            return parser
        parser = action.choices[name]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse reports them as the top-level parser's, pointing at `psepr --help`;
        # the command's own help is the one that lists what it takes.
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    # Short-lived client commands report every failure as their one error line;
    # the SDK's warnings would repeat it (-v shows them).  Long-running commands
    # (router, lease, stats --watch) keep warnings: fail-over, drops, expiry.
    quiet = (args.command in ("send", "request", "stats") and not getattr(args, "watch", False)
             or getattr(args, "pldb_command", None) in ("get", "monitors"))
    levels = [logging.ERROR if quiet else logging.WARNING, logging.INFO, logging.DEBUG]
    logging.basicConfig(level=levels[min(args.verbose, 2)],
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.verbose < 2:
        # Its INFO is two lines per job run: four times a second for a supervisor.
        logging.getLogger("apscheduler").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"psepr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PseprError as exc:
        print(f"psepr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read our output left (`psepr lease ... | head -1`): stop quietly, as
        # Unix tools killed by SIGPIPE do (status 128 + 13).  stdout now points at
        # /dev/null so that the interpreter's last flush does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"psepr {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # zmq errors, e.g. address in use
        import zmq
        if isinstance(exc, zmq.ZMQError):
            print(f"psepr {args.command}: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
