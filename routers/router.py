"""The router process shell: ZeroMQ sockets, CURVE, the poll loop.

Theory of operation
-------------------
One thread, one ROUTER socket per listen address, one :class:`RouterCore`;
with an overlay, one more ROUTER socket where peers dial in (``peer_listen``)
and one DEALER per configured peer (``peers``), whose messages go to the
core's :class:`~routers.overlay.OverlayCore`.
Each loop turn polls (with a timeout up to the core's next deadline), then
*drains* each readable socket without blocking, up to ``max_per_turn``
messages, handing each to the core; then it flushes the core's grouped output
(one DELIVER per connection) and runs the core's periodic ``tick`` when due.
Draining before flushing is what makes batching happen under load while a
lone event still goes out at once.  (Flushing a woken socket's first message
before asking for more was tried: a paced sender's catch-up pairs then left as
two messages each, and a chain of three used 6 % more CPU per event.)  After
each of the first ``_ASK`` messages of a turn the loop asks ZeroMQ whether
another waits (``ZMQ_EVENTS``, 1.5 us)
rather than trying a receive that fails (pyzmq raises ``Again``: 3.5 us, and
several times that with cold caches), so a lone message or a pair (a fifth of
the turns at 5,000 events/s) pays no failed receive; a busy turn drains until
``Again``.

The loop sleeps in ``select.poll`` on the sockets' own descriptors
(``ZMQ_FD``), not in ``zmq_poll``: ``zmq_poll`` asks every socket for
``ZMQ_EVENTS`` before and after it sleeps, one ``poll`` system call each, so a
router with a client socket, a peer socket and a dialer paid about six of them
per event.  A ZeroMQ descriptor is edge-triggered: it signals that commands
arrived (a message, a connection), and any operation on the socket may consume
that signal while a message stays queued.  So the loop keeps ``touched``, the
sockets used since ZeroMQ last said they were empty (a receive that failed, or
``ZMQ_EVENTS`` without ``POLLIN``), and asks each of them before it sleeps.  A
socket whose descriptor fired is received from directly: a non-blocking
receive that finds no message processes the socket's commands, which re-arms
the descriptor, before it fails.  Only the sockets that were used, or that
fired, cost a system call.

A router with a single socket (one listen address, no peers) needs no
descriptors: it waits inside ZeroMQ's own receive, with ``RCVTIMEO`` bounding
the wait by the next deadline.  That receive looks for a message before it
sleeps on the socket's commands, so nothing is asked before sleeping: a lone
event costs the main thread two system calls fewer than the descriptor loop
(``poll`` 5.2 -> 3.5 and ``getpid`` 6.2 -> 5.5 per event, one hop at 5,000
events/s).

Sends use ``ROUTER_MANDATORY`` and ``NOBLOCK``: a full per-connection queue
raises ``Again`` (counted as a drop, reported to the client) and a vanished
peer raises ``EHOSTUNREACH`` (its session is kept, detached, for a HELLO from the
same client on a new connection; see ``RouterCore.detach``).  Nothing blocks.
Peer DEALERs use ``IMMEDIATE``: nothing queues for a peer that is not
connected (the overlay routes around it instead), and a restarted peer gets
no stale messages meant for its former run.

The poll loop is the router's scheduler: periodic work is a deadline the loop
already computes, so APScheduler (used by the services) would only add a
thread hand-off here.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import select
import signal
import socket
import sys
import time
from urllib.parse import urlsplit

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.auth.thread import ThreadAuthenticator

from psepr.config import tune_gc
from psepr.errors import AddressInUse, ConfigError
from psepr.wire import KIND_BYTES, Kind
from psepr.zmqio import NOBLOCK, readable, recv_frames, recv_frames_user, send_frames
from registry.acl import ACL, load_acl
from .config import RouterConfig
from .core import Conn, RouterCore
from .descriptors import DescriptorWatch, raise_open_files_limit

log = logging.getLogger("psepr.router")
FORWARD_KIND = KIND_BYTES[Kind.FORWARD]
RCVTIMEO = int(zmq.RCVTIMEO)
#: Messages of a turn after which the loop asks whether another waits; past
#: them, a busy turn drains until a receive fails (one failure for many messages).
_ASK = 3
#: How long a stopping router's peer sockets may take to deliver its goodbyes, and
#: how long it waits for the peers that dialed it to answer them: on a live link
#: it takes a round trip; a dead one must not hold the stop up.
_BYE_LINGER_MS = 200
_BYE_WAIT = 0.5


def is_loopback_endpoint(endpoint: str) -> bool:
    """True if a ZeroMQ endpoint only listens on this host (loopback, ipc, inproc)."""
    scheme = endpoint.split("://", 1)[0]
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_IN_USE = "the address is in use (is another router, or `psepr run`, listening there?)"


def _bind(sock: zmq.Socket, endpoint: str, what: str) -> str:
    """Bind ``sock`` to ``endpoint``.

    Args:
        what: the purpose, for the error ("listen", "listen for peers").

    Returns:
        The bound endpoint (an ephemeral port resolved).

    Raises:
        AddressInUse: another process listens there.
        ConfigError: another reason, named with the endpoint.
    """
    if endpoint.startswith("ipc://") and _ipc_listened(endpoint[len("ipc://"):]):
        raise AddressInUse(f"cannot {what} on {endpoint}: {_IN_USE}; ZeroMQ would take the "
                           f"path from it")
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        if exc.errno == zmq.EADDRINUSE:
            raise AddressInUse(f"cannot {what} on {endpoint}: {_IN_USE}") from None
        raise ConfigError(f"cannot {what} on {endpoint}: {exc}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _ipc_listened(path: str) -> bool:
    """True if a process accepts connections on the Unix socket at ``path``.

    libzmq unlinks whatever file an ``ipc://`` path names before it binds, so a
    second router given a live router's path silently took it over: new clients
    reached the second, and the first was left with no address.  An abstract
    name (``@name``) needs no check: the kernel refuses a taken one itself.
    """
    if not path or path.startswith("@") or path == "*":
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:         # no file, a stale one (refused), not a socket...
            return False
    return True


class _PrincipalAuthenticator(ThreadAuthenticator):
    """ZAP handler that admits only keys in the ACL and names them by principal."""

    def __init__(self, ctx: zmq.Context, acl: ACL) -> None:
        super().__init__(ctx)
        self._acl = acl

    def curve_user_id(self, client_public_key: bytes) -> str:
        # pyzmq passes the raw 32-byte key here (the credentials callback gets Z85).
        key = zmq.utils.z85.encode(client_public_key).decode("ascii")
        return self._acl.by_key.get(key, "anonymous")


class _KeyProvider:
    """Credentials provider for pyzmq's authenticator: admit keys the ACL names."""

    def __init__(self, acl: ACL) -> None:
        self._acl = acl

    def callback(self, domain: str, key: bytes) -> bool:
        return key.decode("ascii") in self._acl.by_key


class Router:
    """A router with its registry, bound and ready to :meth:`run`.

    Args:
        config: the router configuration.
        context: ZeroMQ context (by default a new one, which :meth:`close` ends).

    Raises:
        ConfigError: insecure non-loopback listen address, missing keys, bad ACL,
            an address that cannot be bound (in use, malformed).
    """

    def __init__(self, config: RouterConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        # Its own context unless given one: closing the router then ends it, which is
        # what makes ZeroMQ deliver the goodbyes a stop leaves queued (a context
        # left to the interpreter's exit drops them).
        self._own_ctx = context is None
        self.ctx = zmq.Context() if context is None else context
        self._stopping = False     # a plain flag: the loop reads it every turn
        self._auth = None
        acl = None
        if config.curve:
            if not config.secret_key_file or not config.acl_file:
                raise ConfigError("--curve needs the router's secret key (--key) and an ACL "
                                  "file (--acl)")
            acl = load_acl(config.acl_file)
            try:
                public, secret = zmq.auth.load_certificate(config.secret_key_file)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot load router key {config.secret_key_file}: {exc}") from None
            if secret is None:
                raise ConfigError(f"{config.secret_key_file} holds no secret key (use the "
                                  f".key_secret file from `psepr keygen`)")
            self._auth = _PrincipalAuthenticator(self.ctx, acl)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=_KeyProvider(acl))
        else:
            if config.acl_file:
                acl = load_acl(config.acl_file)
            bad = [e for e in (*config.listen, *config.peer_listen)
                   if not is_loopback_endpoint(e)]
            if bad and not config.insecure:
                raise ConfigError(f"refusing to listen on non-loopback {', '.join(bad)} without "
                                  f"--curve; pass --insecure to allow unauthenticated clients "
                                  f"and peers")
        now = time.monotonic()
        self.core = RouterCore(config, acl, now=now, epoch=time.time_ns(),
                               peer_allowed=acl.peer_allowed if acl is not None else None)
        self.sockets: list[zmq.Socket] = []
        self.endpoints: list[str] = []
        self.peer_sock: zmq.Socket | None = None
        self.peer_endpoints: list[str] = []
        self.dialers: dict[str, zmq.Socket] = {}
        try:
            for endpoint in config.listen:
                s = self.ctx.socket(zmq.ROUTER)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.ROUTER_MANDATORY, 1)
                s.setsockopt(zmq.SNDHWM, config.conn_queue)
                s.setsockopt(zmq.RCVHWM, config.conn_queue)
                s.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes + 65536)
                if config.curve:
                    s.curve_server = True
                    s.curve_publickey = public
                    s.curve_secretkey = secret
                self.sockets.append(s)
                self.endpoints.append(_bind(s, endpoint, "listen"))
            if config.peer_listen:
                ps = self.peer_sock = self.ctx.socket(zmq.ROUTER)
                self._peer_options(ps)
                ps.setsockopt(zmq.ROUTER_MANDATORY, 1)
                ps.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a redialing peer takes its id over
                if config.curve:
                    ps.curve_server = True
                    ps.curve_publickey = public
                    ps.curve_secretkey = secret
                for endpoint in config.peer_listen:
                    self.peer_endpoints.append(_bind(ps, endpoint, "listen for peers"))
            for url in config.peers:
                d = self.ctx.socket(zmq.DEALER)
                self._peer_options(d)
                d.setsockopt(zmq.IMMEDIATE, 1)
                if config.curve:
                    key = acl.router_key_for(url)
                    if key is None:
                        raise ConfigError(f"peer {url}: with --curve the ACL needs its public "
                                          f"key ([routers.<name>] with key and endpoint "
                                          f"= \"{url}\")")
                    d.curve_serverkey = key.encode("ascii")
                    d.curve_publickey = public
                    d.curve_secretkey = secret
                try:
                    d.connect(url)
                except zmq.ZMQError as exc:
                    d.close(linger=0)
                    raise ConfigError(f"bad peer endpoint {url}: {exc}") from None
                self.dialers[url] = d
                self.core.overlay.dialed(("d", url), now)
        except (zmq.ZMQError, ConfigError):
            self.close()
            raise

    def _peer_options(self, s: zmq.Socket) -> None:
        c = self.config
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, c.peer_queue)
        s.setsockopt(zmq.RCVHWM, c.peer_queue)
        # A FORWARD carries up to a turn's worth of segments for one next hop.
        s.setsockopt(zmq.MAXMSGSIZE, max(c.max_bytes_per_turn, c.max_message_bytes) * 2)

    def stop(self) -> None:
        """Ask :meth:`run` to return (thread-safe, signal-safe; within one poll timeout,
        at most 0.25 s)."""
        self._stopping = True

    def run(self) -> None:
        """Serve until :meth:`stop`; then close the sockets."""
        core = self.core
        sock_of: dict[bytes, zmq.Socket] = {}
        curve = self.config.curve
        max_turn = self.config.max_per_turn
        max_bytes = self.config.max_bytes_per_turn
        Again = zmq.Again
        descriptors = DescriptorWatch(self.config.name)

        def send(conn: Conn, frames: list) -> bool:
            s = sock_of.get(conn.ident) or self.sockets[0]
            touched.add(s)
            try:
                send_frames(s, frames, conn.ident)
                return True
            except Again:
                return False
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    core.detach(conn.ident, time.monotonic())
                    sock_of.pop(conn.ident, None)
                    return False
                raise

        overlay = core.overlay
        peer_sock = self.peer_sock
        dialer_url = {d: url for url, d in self.dialers.items()}
        socks = [*self.sockets, *([peer_sock] if peer_sock is not None else ()), *dialer_url]
        # Sleep on the sockets' own descriptors (see the module docstring):
        # `touched` holds the sockets used since ZeroMQ last said they were empty.
        at_fd = {sk.getsockopt(zmq.FD): sk for sk in socks}
        ospoll = select.poll()
        for fd in at_fd:
            ospoll.register(fd, select.POLLIN)
        touched = set(socks)

        def send_peers() -> None:
            for lid, frames in overlay.take_out():
                try:
                    if lid[0] == "d":
                        d = self.dialers[lid[1]]
                        touched.add(d)
                        send_frames(d, frames)
                    else:
                        touched.add(peer_sock)
                        send_frames(peer_sock, frames, lid[1])
                except Again:
                    # Peer link full or not connected: events are lost (counted);
                    # hellos and pings are simply tried again at the next ping.
                    if frames[0] == FORWARD_KIND:
                        overlay.dropped += 1
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EHOSTUNREACH:
                        raise
                    overlay.link_gone(lid, time.monotonic())

        def drain_peer(s: zmq.Socket) -> None:
            url = dialer_url.get(s)
            budget = max_bytes
            touched.add(s)       # until a failed receive or ZMQ_EVENTS says it is empty
            for k in range(max_turn):
                try:
                    if s is peer_sock:
                        if curve:
                            frames, principal = recv_frames_user(s)
                        else:
                            frames, principal = recv_frames(s), None
                        lid, frames = ("l", frames[0]), frames[1:]
                    else:
                        frames, principal, lid = recv_frames(s), None, ("d", url)
                except Again:
                    touched.discard(s)
                    return
                overlay.on_message(lid, frames, time.monotonic(), principal)
                budget -= len(frames[-1]) if frames else 0
                if budget <= 0:
                    return
                if k < _ASK and not readable(s):
                    touched.discard(s)
                    return

        several = len(self.sockets) > 1

        def drain(s: zmq.Socket, flags: int = NOBLOCK) -> None:
            """Receive a turn's worth from client socket ``s``; the first receive
            with ``flags`` (0: wait up to the socket's RCVTIMEO)."""
            budget = max_bytes
            touched.add(s)       # until a failed receive or ZMQ_EVENTS says it is empty
            for k in range(max_turn):
                try:
                    if curve:
                        frames, principal = recv_frames_user(s, flags)
                    else:
                        frames = recv_frames(s, flags)
                        principal = None
                except Again:
                    touched.discard(s)
                    return
                flags = NOBLOCK
                ident = frames[0]
                if several:
                    sock_of[ident] = s
                core.handle(ident, frames[1:], time.monotonic(), principal)
                budget -= len(frames[-1])
                if budget <= 0:
                    return
                if k < _ASK and not readable(s):
                    touched.discard(s)
                    return

        def end_turn() -> tuple[float, float]:
            """Flush the turn's output and run the periodic work when due.

            Returns:
                ``(now, due)``: the time, and the core's next deadline.
            """
            core.flush(send)
            if overlay is not None:
                send_peers()
            now = time.monotonic()
            due = core.next_deadline(now)
            if now >= due:
                core.tick(now)
                descriptors.check(now)
                core.flush(send)
                if overlay is not None:
                    send_peers()
                due = core.next_deadline(now)
            if len(sock_of) > 2 * len(core.conns) + 1000:
                for ident in [i for i in sock_of if i not in core.conns]:
                    del sock_of[ident]
            return now, due

        try:
            now = time.monotonic()
            due = core.next_deadline(now)
            if len(socks) == 1:
                # One socket: wait inside ZeroMQ's own receive (see the module
                # docstring), its RCVTIMEO a power of two of milliseconds no
                # longer than the time to the next deadline (so that it is set
                # again only a few times per deadline, and never sleeps past it).
                s = socks[0]
                wait_ms = -1
                while not self._stopping:
                    ms = math.ceil(max(0.0, min(due - now, 0.25)) * 1000.0)
                    if ms < wait_ms or ms >= 2 * wait_ms:
                        wait_ms = 1 << (ms.bit_length() - 1) if ms else 0
                        s.setsockopt(RCVTIMEO, wait_ms)
                    drain(s, 0)
                    now, due = end_turn()
                return
            while not self._stopping:
                # A socket used since it was last found empty may hold messages its
                # descriptor will not announce: ask it before sleeping.
                ready = [sk for sk in socks if sk in touched and readable(sk)]
                touched.clear()
                # Then the descriptors: at once if a socket is ready (so that a busy
                # one does not starve the others), else until the next deadline.
                # `due` was computed at the end of the last turn, after its flush;
                # select.poll rounds a fractional millisecond up (no spinning
                # before a deadline less than 1 ms away).
                timeout = 0.0 if ready else max(0.0, min(due - now, 0.25))
                # A fired descriptor is received from without asking ZMQ_EVENTS
                # first: a receive that finds no message processes the socket's
                # commands (which re-arms the descriptor) before it fails.
                for fd, _ in ospoll.poll(timeout * 1000.0):
                    sk = at_fd[fd]
                    if sk not in ready:
                        ready.append(sk)
                for s in ready:
                    if overlay is not None and (s is peer_sock or s in dialer_url):
                        drain_peer(s)
                    else:
                        drain(s)
                now, due = end_turn()
        finally:
            bye = self._stopping and overlay is not None
            if bye:
                told = overlay.goodbye()   # peers take the links down now: a stop, not a crash
                try:
                    send_peers()
                    self._await_goodbyes({lid[1] for lid in told})
                except zmq.ZMQError:
                    bye = False
            self.close(_BYE_LINGER_MS if bye else 0)

    def _await_goodbyes(self, idents: set) -> None:
        """Wait until every peer that dialed us has read our goodbye, at most ``_BYE_WAIT``.

        Such a peer reads through a DEALER with ``IMMEDIATE``, and libzmq discards
        what such a socket has not read yet when its connection closes: a goodbye
        followed at once by our close was lost about one time in five.  The peer
        answers it with a hello (its link is down, so it dials again), or an
        error if it does not know PEER_BYE; either proves it read it.  Nothing
        received here is acted on: the router is stopping.
        """
        deadline = time.monotonic() + _BYE_WAIT
        s = self.peer_sock
        answers = (KIND_BYTES[Kind.PEER_HELLO], KIND_BYTES[Kind.ERROR])
        while idents and (left := deadline - time.monotonic()) > 0:
            if not s.poll(left * 1000.0):
                return
            try:
                frames = recv_frames(s)
            except zmq.Again:
                continue
            if len(frames) > 1 and frames[1] in answers:
                idents.discard(frames[0])

    def close(self, peer_linger_ms: int = 0) -> None:
        """Close the sockets; peer sockets may keep ``peer_linger_ms`` to deliver what
        waits (the goodbyes of a stop)."""
        for s in self.sockets:
            s.close(linger=0)
        for s in [*self.dialers.values(), self.peer_sock]:
            if s is not None:
                s.close(linger=peer_linger_ms)
        self.sockets = []
        self.dialers = {}
        self.peer_sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx and not self.ctx.closed:
            self.ctx.term()    # every socket is closed: waits at most peer_linger_ms


def serve(config: RouterConfig, announce=print) -> None:
    """Run a router in the foreground until SIGINT/SIGTERM (used by ``psepr router``).

    Args:
        config: the router configuration.
        announce: called with one line per bound endpoint, once when ready, and once
            when stopped (with its event counts).
    """
    raise_open_files_limit()    # each connection holds a descriptor
    router = Router(config)
    tune_gc()   # a router allocates per message; see psepr.config.tune_gc
    for ep in router.endpoints:
        announce(f"psepr router {config.name} listening on {ep}")
    for ep in router.peer_endpoints:
        announce(f"psepr router {config.name} peers on {ep}")
    for url in config.peers:
        announce(f"psepr router {config.name} dialing peer {url}")
    announce(f"psepr router {config.name} ready (authority {config.authority}, "
             f"{'CURVE' if config.curve else 'no authentication'})")
    sys.stdout.flush()

    def _stop(signum, frame):
        router.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    router.run()
    core = router.core
    announce(f"psepr router {config.name} stopped (events: {core.events_in} in, "
             f"{core.events_out} out, {core.dropped} dropped)")


__all__ = ["Router", "serve", "is_loopback_endpoint"]
