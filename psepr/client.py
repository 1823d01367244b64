"""The synchronous client: :func:`connect`, :class:`Connection`, :class:`Lease`.

Theory of operation
-------------------
ZeroMQ sockets are not thread-safe, so exactly one thread drives the DEALER
socket at a time: whoever holds ``_sock_lock`` runs :meth:`Connection._io_step`
(send what waits, poll, decode, tick the pure :class:`~psepr.session.Session`).

* ``send`` encodes the event in the caller's thread.  A lone send (nothing
  queued, nobody driving the socket, and not past the first ``_DIRECT_RUN`` of
  sends less than ``_DIRECT_GAP`` apart) is packed and handed to ZeroMQ right
  there.  Otherwise it is appended to a deque and the driving thread is woken
  through a pipe only when it is not already awake, so a burst of sends becomes
  one SEND batch.
  When more than ``send_queue`` events wait, ``send`` blocks (back-pressure)
  instead of growing memory.
* While nobody drives the socket the I/O thread sleeps in ``select.poll`` on
  the wake pipe and the sockets' ``ZMQ_FD`` without holding ``_sock_lock``.
  That descriptor is edge-triggered: every other thread that used the socket
  meanwhile (a direct send, a reader) checks ``ZMQ_EVENTS`` before letting go
  and wakes the I/O thread if a message waits.  (A direct send skips the check
  while the connection holds no lease and waits for no answer: nothing it could
  have hidden is urgent, and the I/O thread's next timer reads it.)
* Whoever drives the socket sleeps in ``select.poll`` on the same descriptors
  (its own poll object), after asking ``ZMQ_EVENTS`` once; a fired descriptor
  is received from directly.  ``zmq_poll`` asked the socket before and after
  every sleep and polled the descriptors once more without waiting.
* A thread blocked in ``receive`` drives the socket itself, so an arriving
  event reaches it with no thread hand-off.  A background I/O thread drives the
  socket the rest of the time (timers, pings, renewals, sends, and filling lease
  queues nobody is waiting on); it steps back while readers are active and for
  50 ms after, so a reader calling ``receive`` in a loop keeps it even while
  it works through a large batch.
* Decoded events go to the deque of every lease they match; ``lease.receive``
  pops without a lock when something is there.  Readers not driving the socket
  wait on an Event that the driver sets after releasing the connection lock.
* Everything else (lease, request, flush) is a control request whose answer
  is posted under the connection's condition variable.

Events are delivered at most once: events handed to a router that dies are
lost; events not yet handed over are sent to the next router.  A connection
still open when the interpreter exits is closed then (an ``atexit`` hook), so
what a script sent without closing reaches the router (up to ``CLOSE_FLUSH``
seconds per connection).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import math
import os
import select
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import session as _session
from ._base import INBOX_PREFIX, ConnectionBase, LeaseBase, check_seconds, time_left
from ._common import (CLOSE_FLUSH, MONITOR_EVENTS, build_config, configure_socket,
                      handshake_failure, inbox_channel, monitor_socket)
from .channel import Channel, parse
from .config import ClientConfig, router_list
from .errors import (ClosedError, LeaseExpired, PseprError, TimeoutError,
                     UsageError)
from .event import Event, _check_name
from .session import READY, Session, make_entry
from .zmqio import readable, recv_frames, send_frames

log = logging.getLogger("psepr.client")

#: Connections not yet closed; :func:`_close_at_exit` closes them (see the module doc).
_open_connections: "weakref.WeakSet[Connection]" = weakref.WeakSet()


def _orphan_after_fork() -> None:
    # In a child made by fork() a connection has no I/O thread, and its socket is
    # the parent's: a send was queued for nobody and a flush timed out.  Mark the
    # inherited connections closed, saying why (no lock: another thread of the
    # parent may have held one at the fork).
    for con in list(_open_connections):
        con._closed = True
        con._closed_why = (f"connection is closed in this process: it was opened by process "
                           f"{con._pid} before fork(); connect anew in the child")


os.register_at_fork(after_in_child=_orphan_after_fork)


def _close_at_exit() -> None:
    # atexit runs before the interpreter stops daemon threads, so each connection's
    # I/O thread still hands its queued sends to the router during close().
    for con in list(_open_connections):
        if con._pid != os.getpid():
            continue    # inherited through fork(): its socket and thread are the parent's
        try:
            con.close()
        except Exception:       # one connection's trouble must not cost the others
            log.debug("closing a connection at exit failed", exc_info=True)


atexit.register(_close_at_exit)


class Lease(LeaseBase):
    """A lease held by a :class:`Connection`; iterate it or call :meth:`receive`.

    Attributes:
        id, channel, type, granted, dropped: see :class:`psepr._base.LeaseBase`.
        duration: the duration asked for, in seconds.
    """

    def __init__(self, con: "Connection", id: str, channel: Channel, type: str | None,
                 duration: float) -> None:
        super().__init__(con, id, channel, type, threading.Event())
        self.duration = duration

    def receive(self, timeout: float | None = None) -> Event:
        """The next event on this lease.

        Args:
            timeout: seconds to wait; None waits forever.

        Returns:
            The :class:`~psepr.event.Event`.

        Raises:
            TimeoutError: nothing arrived in time.
            LeaseExpired: the router expired the lease (and the queue is empty).
            ClosedError: the lease was released or the connection closed.
        """
        q = self._q
        if q:
            return q.popleft()
        return self._con._wait_for(self, timeout)

    def __iter__(self) -> Iterator[Event]:
        while True:
            try:
                yield self.receive()
            except (ClosedError, LeaseExpired):
                return

    def release(self, timeout: float = 5.0) -> None:
        """Release the lease at the router (idempotent)."""
        self._con._release(self, timeout)

class _Waiter:
    __slots__ = ("done", "result", "error", "replies", "first")

    def __init__(self, gather: bool = False) -> None:
        self.done = False
        self.result = None
        self.error: Exception | None = None
        # request_all(): every reply, and when the first one came (monotonic)
        self.replies: list | None = [] if gather else None
        self.first = 0.0


class Connection(ConnectionBase):
    """A synchronous connection to one router of a list (see :func:`connect`).

    Every call that waits takes ``timeout`` in seconds and raises
    :class:`~psepr.errors.UsageError` for one that is not a number (NaN
    included), before doing anything.
    """

    def __init__(self, routers=None, *, config: ClientConfig | None = None,
                 preset: str | None = None, service: str | None = None,
                 instance: str | None = None, keyfile: "str | Path | None" = None,
                 server_key: "str | Path | None" = None, shuffle: bool = False,
                 context: zmq.Context | None = None, wait: bool = True) -> None:
        self.config = build_config(config, preset, service, instance, keyfile, server_key)
        self.routers = router_list(routers)
        if shuffle:
            import random
            random.shuffle(self.routers)
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._leases: dict[str, Lease] = {}
        self._init_arrivals()
        self._any = threading.Event()    # set by the I/O thread when events arrive
        self._waiting = 0                # readers waiting on _any (see _counted)
        self._filed = False              # events filed since readers were last woken
        self._outq: collections.deque = collections.deque()
        self._space = threading.Event()
        self._woken = False
        self._unflushed = False                 # sends since the last flush (close flushes)
        self._waiters: dict[int, _Waiter] = {}
        self._requests: dict[str, _Waiter] = {}
        self._inboxes: dict[str, Lease] = {}
        self._errors: list[Exception] = []
        self._lease_seq = 0
        self._closed = False
        self._closed_why = "connection is closed"     # what using it then says
        self._ready_once = threading.Event()
        self.welcome: dict | None = None
        self.dropped_by_router = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._session = Session(self.config, self.routers, self, time.monotonic())
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None      # the socket's disconnect monitor
        self._fds: tuple = ()                     # ZMQ_FD of _sock and of _mon
        self._mon_due = False                     # a monitor message waits (see _open)
        self._sock_lock = threading.Lock()      # whoever holds it drives the socket
        self._backlog: list = []                # frames the socket refused, in order
        self._readers = 0                       # threads waiting in receive()
        self._reader_left = 0.0
        self._io_wake = threading.Event()       # wakes the I/O thread (sends, control)
        self._io_sleeping = False               # I/O thread blocked in select without the socket
        self._last_direct = 0.0                 # when send() last sent from the caller's thread
        self._direct_run = 0                    # direct sends less than _DIRECT_GAP apart
        self._ospoll = select.poll()            # wake pipe + the sockets' ZMQ_FDs
        self._dpoll = select.poll()             # the same, for whoever drives the socket
        for p in (self._ospoll, self._dpoll):
            p.register(self._wake_r, select.POLLIN)
        self._thread = threading.Thread(target=self._run, name="psepr-io", daemon=True)
        self._thread.start()
        self._pid = os.getpid()
        _open_connections.add(self)
        if wait:
            limit = self.config.connect_timeout * len(self.routers) + 1.0
            if not self._ready_once.wait(limit):
                self.close()
                raise self._unreachable(limit)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------
    def send(self, channel: "str | Channel | Event", payload: Any = None, *,
             type: str | None = None, format: str | None = None,
             to_service: str | None = None, to_instance: str | None = None,
             reply_to: "str | Channel | None" = None, re: str | None = None,
             id: str | None = None) -> str:
        """Send one event (asynchronously; batched with other sends).

        Args:
            channel: destination channel, or a whole :class:`Event`.
            payload: a JSON value, or XML text with ``format="xml"``.  (JSON has no
                NaN or infinity: such floats travel as null.)
            type: payload type; for XML it defaults to the payload's namespace.
            format: ``"json"`` (default) or ``"xml"``.
            to_service, to_instance: deliver only to that service/instance.
            reply_to, re: request/reply fields (see :meth:`request`, :meth:`reply`).
            id: event id; a fresh unique id by default.

        Returns:
            The event id.

        Raises:
            ChannelError, EventError, XMLRefused: invalid input (nothing is sent).
            TimeoutError: the send buffer stayed full for ``send_block_timeout``.
            ClosedError: the connection is closed.
        """
        if self._closed:
            raise self._closed_error()
        item = make_entry(channel, payload, type, format, to_service, to_instance, reply_to,
                          re, id, self.config.max_event_bytes)
        q = self._outq
        self._unflushed = True
        if not q and not self._backlog:
            # A lone send goes out from this thread when nobody drives the socket:
            # no thread hand-off.  So do the first few of a quick succession (a
            # paced sender catching up after a late wake-up sends two or three);
            # a longer burst queues for the I/O thread, which packs it into one batch.
            now = time.monotonic()
            if now - self._last_direct >= _DIRECT_GAP:
                self._direct_run = 0
            if self._direct_run < _DIRECT_RUN and self._sock_lock.acquire(blocking=False):
                try:
                    if self._send_direct(item, now):
                        return item[0]
                finally:
                    self._sock_lock.release()
        if len(q) >= self.config.send_queue:
            self._wait_space()
        q.append(item)
        if not self._woken:
            self._woken = True
            os.write(self._wake_w, b"s")
            self._io_wake.set()
        return item[0]

    def _send_direct(self, item: tuple, now: float) -> bool:
        """Hand one event to ZeroMQ from the caller's thread (``_sock_lock`` held).

        Returns:
            False if the session cannot take it now (the caller queues it).
        """
        s = self._session
        sock = self._sock
        # Anything older still on its way (queued, packed, or refused by a full
        # socket) must leave first: then this event waits its turn.
        if sock is None or s.state != READY or s.queued or self._backlog or self._outq \
                or self._closed:
            return False
        with self._lock:
            out = s.take_out_with(item, now)
        self._last_direct = now
        self._direct_run += 1
        for i, frames in enumerate(out):
            try:
                send_frames(sock, frames)
            except zmq.Again:
                self._backlog = out[i:]     # in order; the I/O thread retries
                self._kick()
                break
        # A send touches the DEALER's commands only.  Asking costs two system calls
        # per send; a message whose signal the send consumed matters only to a
        # lease or a waiting caller (a waiter is registered before its request
        # leaves, so before the answer can arrive).  Anything else (an ERROR for a
        # send) is read at the I/O thread's next timer or kick, and flush() kicks.
        if self._leases or self._waiters or self._requests:
            self._recheck(mon=False)
        return True

    def _recheck(self, mon: bool = True) -> None:
        """Wake the sleeping I/O thread if a message waits (``_sock_lock`` held).

        ZeroMQ's file descriptor is edge-triggered: a socket operation in another
        thread may consume the edge the sleeping I/O thread waits for.

        Args:
            mon: check the monitor socket too (a reader's I/O step may have used
                it; a send did not).
        """
        if self._io_sleeping and self._message_waits(mon):
            self._kick()

    def _message_waits(self, mon: bool = True) -> bool:
        """True if a message waits on the socket (or on the monitor, with ``mon``).

        Asking consumes the edge of the socket's descriptor, so a monitor found
        holding a message is marked due: its descriptor will not fire for it.
        """
        if self._sock is not None and readable(self._sock):
            return True
        if mon and self._mon is not None and readable(self._mon):
            self._mon_due = True
            return True
        return False

    def _wait_space(self) -> None:
        deadline = time.monotonic() + self.config.send_block_timeout
        while len(self._outq) >= self.config.send_queue:
            if self._closed:
                raise self._closed_error()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"send buffer full ({self.config.send_queue} events) for "
                                   f"{self.config.send_block_timeout} s: router unreachable "
                                   f"or too slow")
            self._space.clear()
            self._kick()
            self._space.wait(min(remaining, 0.1))

    def _kick(self) -> None:
        """Wake whoever drives the socket (the pipe) and the I/O thread (the Event)."""
        if not self._woken:
            self._woken = True
            try:
                os.write(self._wake_w, b"k")
            except OSError:
                pass
        self._io_wake.set()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every event sent so far was processed by the router.

        Raises:
            RemoteError: the first error the router reported since the last flush
                (e.g. :class:`~psepr.errors.AccessDenied` for a channel).
            TimeoutError: no confirmation within ``timeout``.
        """
        check_seconds(timeout)
        deadline = time.monotonic() + timeout
        self._unflushed = False
        while self._outq and time.monotonic() < deadline:
            self._kick()
            self._space.clear()
            self._space.wait(0.05)
        self._control(lambda s: s.ping(), timeout=max(0.0, deadline - time.monotonic()),
                      what="flush", said=timeout)
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    # -- leases ---------------------------------------------------------------------
    def lease(self, channel: "str | Channel", duration: float = 3600.0, *,
              type: str | None = None, id: str | None = None, renew: bool = True,
              propagated: bool = False, timeout: float = 5.0) -> Lease:
        """Lease a channel (and everything below it).

        Args:
            channel: the channel; ``/`` and ``/authority/`` are allowed.
            duration: requested seconds; the router may grant less.
            type: receive only events of this type.
            id: lease id; generated by default.  Re-using an id renews/changes it.
            renew: renew automatically at 80 % of the grant (default True).
            propagated: return only once every reachable router of the overlay
                has the lease's interest, so that a sender anywhere reaches it
                from then on (the router waits up to its ``barrier_timeout``).
            timeout: seconds to wait for the grant.

        Returns:
            The granted :class:`Lease`.

        Raises:
            ChannelError: invalid channel.
            AccessDenied: the ACL refuses it.
            TimeoutError: no grant in time; with ``propagated``, also when some
                router did not confirm in time.  Either way a new lease is then
                given up (released at the router if it was asked), as it is when
                the wait is interrupted; a re-registration that times out leaves
                the lease already held.
        """
        ch = parse(channel)
        check_seconds(timeout)
        if type is not None:
            _check_name(type, "type")
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if id is None:
                id = self._auto_lease_id()
            else:
                _check_name(id, "id")
            lease = self._leases.get(id)
            new = lease is None
            if new:
                lease = Lease(self, id, ch, type, duration)
                self._leases[id] = lease
            lease.channel, lease.type, lease.granted, lease._error = ch, type, 0.0, None
            lease.duration = duration
            self._session.lease(id, ch, type, duration, time.monotonic(), renew, propagated)
        self._kick()
        try:
            self._wait_cond(lambda: lease.granted > 0 or lease._error is not None, timeout,
                            f"lease on {ch.text} not granted within {timeout} s")
        except BaseException:
            # Timed out or interrupted: a new lease the caller never got must not be
            # granted later, renewed and filled behind their back.  (A re-registration
            # that timed out leaves the lease the caller already holds.)
            if new:
                with self._lock:
                    gave_up = self._give_up(id, lease)
                if gave_up:
                    self._kick()        # the UNLEASE leaves now
            raise
        if lease._error is not None:
            self._leases.pop(id, None)
            raise lease._error
        return lease

    def _release(self, lease: Lease, timeout: float) -> None:
        check_seconds(timeout)
        with self._lock:
            if lease._closed:
                return
            lease._closed = True
            lease._has.set()
            self._leases.pop(lease.id, None)
            req = self._session.unlease(lease.id)
            self._cond.notify_all()
        self._kick()    # wakes a reader driving the socket for this lease, too
        if req is not None:
            self._wait_req(req, timeout, f"release of lease {lease.id}", timeout)

    def receive(self, timeout: float | None = None) -> Event:
        """The next event from any of this connection's leases, in arrival order.

        An event matching two of your leases is returned once per lease.

        Raises:
            TimeoutError: nothing arrived in time.
            ClosedError: the connection is closed.
        """
        deadline = None     # read the clock only when there is nothing to return
        while True:
            arrivals = self._arrivals      # re-read: _compact() may replace it
            try:
                lease = arrivals.popleft()
            except IndexError:
                if self._closed:
                    raise self._closed_error() from None
                deadline, remaining = time_left(timeout, deadline)
                # Drive the socket ourselves (no hand-off); if another thread has it,
                # wait for that thread's wake-up.
                drive = _DRIVE if remaining is None else min(remaining, _DRIVE)
                if not self._drive(lambda: self._arrivals, time.monotonic() + drive):
                    self._wait_any(remaining)
                continue
            q = lease._q
            if q:
                return q.popleft()

    # -- request/reply -------------------------------------------------------------
    def request(self, channel: "str | Channel", payload: Any = None, *, type: str | None = None,
                format: str | None = None, to_service: str | None = None,
                to_instance: str | None = None, timeout: float = 2.0) -> Event:
        """Send a request and wait for the first reply on this connection's inbox.

        Args:
            channel: where the request goes (responders lease it).
            payload, type, format, to_service, to_instance: as for :meth:`send`.
            timeout: the deadline in seconds.

        Returns:
            The reply :class:`Event` (its ``re`` is the request's id).

        Raises:
            TimeoutError: no reply within ``timeout`` (nobody listening, or too slow).
        """
        check_seconds(timeout)
        deadline = time.monotonic() + timeout
        w = _Waiter()
        with self._asking(channel, payload, type, format, to_service, to_instance, w,
                          timeout) as (eid, ch):
            self._wait_cond(lambda: w.done, max(0.0, deadline - time.monotonic()),
                            f"no reply to request {eid} on {ch.text} within {timeout} s")
        return w.result

    def request_all(self, channel: "str | Channel", payload: Any = None, *,
                    type: str | None = None, format: str | None = None,
                    to_service: str | None = None, to_instance: str | None = None,
                    timeout: float = 2.0, settle: float | None = None,
                    done: "Callable[[list[Event]], bool] | None" = None) -> list[Event]:
        """Send a request that several responders may answer, and gather the replies.

        Collection ends at ``timeout``, ``settle`` seconds after the first reply,
        or as soon as ``done(replies)`` returns True, whichever comes first.

        Args:
            channel, payload, type, format, to_service, to_instance: as for :meth:`send`.
            timeout: the overall deadline in seconds.
            settle: once a reply is in, wait at most this much longer for others.
            done: called with the replies so far (in arrival order) whenever one
                arrives, with the connection's lock held: keep it quick.

        Returns:
            The replies in arrival order; empty if nobody answered in time.
        """
        check_seconds(timeout)
        check_seconds(settle, "settle", none_ok=True)
        deadline = time.monotonic() + timeout
        w = _Waiter(gather=True)
        replies = w.replies
        with self._asking(channel, payload, type, format, to_service, to_instance, w, timeout):
            with self._cond:
                while not (done is not None and replies and done(replies)):
                    if self._closed:
                        raise self._closed_error()
                    end = deadline if not (replies and settle is not None) \
                        else min(deadline, w.first + settle)
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                return list(replies)

    @contextlib.contextmanager
    def _asking(self, channel, payload, type, format, to_service, to_instance,
                w: _Waiter, timeout: float):
        """Send a request whose replies go to ``w`` while the block runs."""
        ch = parse(channel)
        inbox = self._inbox(ch.authority, timeout)
        eid = _session.new_id()
        with self._lock:
            self._requests[eid] = w
        try:
            self.send(ch, payload, type=type, format=format, to_service=to_service,
                      to_instance=to_instance, reply_to=inbox.channel, id=eid)
            yield eid, ch
        finally:
            with self._lock:
                self._requests.pop(eid, None)

    def reply(self, request: Event, payload: Any = None, *, type: str | None = None,
              format: str | None = None) -> str:
        """Answer a request event on its ``reply_to`` channel.

        Raises:
            UsageError: the event has no ``reply_to``.
        """
        if request.reply_to is None:
            raise UsageError(f"event {request.id} has no reply_to channel; it is not a request")
        return self.send(request.reply_to, payload, type=type, format=format, re=request.id,
                         to_instance=request.from_instance)

    def _inbox(self, authority: str, timeout: float) -> Lease:
        lease = self._inboxes.get(authority)
        if lease is None:
            self._wait_cond(lambda: self.welcome is not None, timeout, "not connected")
            ch = inbox_channel(authority, self.principal, self.instance)
            try:
                lease = self.lease(ch, id=f"{INBOX_PREFIX}{authority}", timeout=timeout)
            except TimeoutError:
                raise TimeoutError(f"request: its reply inbox {ch} was not granted "
                                   f"within {timeout} s") from None
            self._inboxes[authority] = lease
        return lease

    # -- router information ----------------------------------------------------------
    def stats(self, timeout: float = 2.0) -> dict:
        """The router's counters (connections, leases, events in/out, drops...)."""
        return self._control(lambda s: s.stats(), timeout, "stats")

    def status(self, timeout: float = 2.0) -> dict:
        """The overlay as the router sees it (what ``psepr status`` prints).

        Returns:
            ``{"router", "epoch", "routers": [{"router", "reachable", "next_hop",
            "links": {peer: rtt_ms}, "load": {...}, "age", "interest"}, ...],
            "links": [{"peer", "up", "dialed", "endpoint", "rtt_ms", "since"}, ...],
            "counters": {...}, "stats": {...}}``.
        """
        return self._control(lambda s: s.status(), timeout, "status")

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """Hand what was sent to the router (up to 2 s), say BYE, stop.  Idempotent.

        Events passed to :meth:`send` before ``close`` are not dropped while the
        router is reachable: ``close`` flushes them first (errors the router
        reports for them are not raised here; call :meth:`flush` to see them).
        """
        if not self._closed and self._unflushed and self._session.state == READY \
                and threading.current_thread() is not self._thread:
            try:
                self.flush(timeout=CLOSE_FLUSH)
            except PseprError:
                pass
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _open_connections.discard(self)
            self._cond.notify_all()
            for lease in self._leases.values():
                lease._has.set()
        self._any.set()
        self._space.set()
        self._io_wake.set()
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _closed_error(self) -> ClosedError:
        return ClosedError(self._closed_why)

    # -- waiting helpers -------------------------------------------------------------------
    def _wait_cond(self, pred, timeout: float | None, message: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not pred():
                if self._closed:
                    raise self._closed_error()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(message)
                self._cond.wait(remaining)

    def _wait_any(self, remaining: float | None) -> None:
        """Wait for events filed by the thread that drives the socket (see :meth:`_counted`)."""
        with self._counted(self):
            self._any.clear()
            if not self._arrivals and not self._closed:
                self._any.wait(0.05 if remaining is None else min(remaining, 0.05))

    @contextlib.contextmanager
    def _counted(self, who) -> Iterator[None]:
        """Count a reader that waits on ``who``'s Event (the connection's or a lease's)
        while another thread drives the socket.

        Only counted readers are woken: a reader driving the socket files its own
        events and needs no Event set and cleared per event (two lock round trips
        through Python-level ``threading`` code).  The count is raised under the
        lock the filing holds, before the reader looks at its queue, so a driver
        that files after that look sees the count and wakes it.  The wait is
        bounded (50 ms): a wake-up another reader cleared costs no more.
        """
        with self._lock:
            who._waiting += 1
        try:
            yield
        finally:
            with self._lock:
                who._waiting -= 1

    def _wait_for(self, lease: Lease, timeout: float | None) -> Event:
        # Readers wait on an Event the I/O thread sets after it has released the
        # connection lock: the woken reader needs no lock, only the GIL.
        q = lease._q
        has = lease._has
        deadline = None
        while not q:
            if lease._error is not None:
                raise lease._error
            if self._closed:
                raise self._closed_error()
            if lease._closed:
                raise ClosedError(f"lease {lease.id} is closed")
            deadline, remaining = time_left(timeout, deadline, f" on {lease.channel.text}")
            drive = _DRIVE if remaining is None else min(remaining, _DRIVE)
            if not self._drive(lambda: q or lease._error is not None or lease._closed,
                               time.monotonic() + drive):
                with self._counted(lease):
                    has.clear()
                    if not q and lease._error is None and not lease._closed:
                        has.wait(0.05 if remaining is None else min(remaining, 0.05))
        return q.popleft()

    def _control(self, op, timeout: float, what: str, said: float | None = None):
        """Run control request ``op`` and wait for its answer.

        Args:
            timeout: seconds left to wait; ``said``: the caller's own timeout, for
                the error (default ``timeout``).
        """
        check_seconds(timeout)
        said = timeout if said is None else said
        with self._lock:
            if self._closed:
                raise self._closed_error()
            self._wait_cond(lambda: self._session.state == READY, timeout,
                            f"{what}: not connected to a router within {said} s")
            req = op(self._session)
        self._kick()
        return self._wait_req(req, timeout, what, said)

    def _wait_req(self, req: int, timeout: float, what: str, said: float):
        w = _Waiter()
        with self._lock:
            early = self._waiters.get(req)
            if early is not None:  # answered before we started waiting
                w = early
            self._waiters[req] = w
        try:
            self._wait_cond(lambda: w.done, timeout, f"{what}: no answer within {said} s")
        finally:
            with self._lock:
                self._waiters.pop(req, None)
                if not w.done:
                    self._session.forget(req)   # a late answer must not wait here forever
        if w.error is not None:
            raise w.error
        return w.result

    # -- Sink: called by the Session, in the I/O thread, with the lock held ------------
    def deliver(self, batches: list) -> None:
        self._file(batches)
        self._filed = True

    def _answer(self, event: Event) -> None:
        w = self._requests.get(event.re)
        if w is None:
            return
        if w.replies is not None:
            if not w.replies:
                w.first = time.monotonic()
            w.replies.append(event)
            self._cond.notify_all()
        elif not w.done:
            w.result, w.done = event, True
            self._cond.notify_all()

    def _wake_readers(self) -> None:
        """Called by the I/O thread without the lock held: wake readers of fresh events."""
        if not self._filed:
            return
        self._filed = False
        touched = self._touched
        if touched:
            self._touched = {}
            # Event.set takes a lock and notifies even when the flag is up already.
            for lease in touched:
                if not lease._has.is_set():
                    lease._has.set()
        if self._waiting and not self._any.is_set():
            self._any.set()

    def ready(self, welcome: dict) -> None:
        self.welcome = welcome
        self._ready_once.set()
        self._cond.notify_all()

    def lease_granted(self, lease_id: str, granted: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.granted = granted
            self._cond.notify_all()

    def lease_failed(self, lease_id: str, exc: Exception) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease._error = exc
            self._cond.notify_all()

    def lease_expired(self, lease_id: str) -> None:
        if self._expire(lease_id) is not None:
            self._cond.notify_all()

    def completed(self, req: int, result: Any, exc: Exception | None) -> None:
        w = self._waiters.get(req)
        if w is None:
            w = _Waiter()
            self._waiters[req] = w
        w.result, w.error, w.done = result, exc, True
        self._cond.notify_all()

    def async_error(self, exc: Exception) -> None:
        super().async_error(exc)
        self._cond.notify_all()

    # -- the I/O thread -------------------------------------------------------------------
    def _open(self, url: str) -> None:
        self._close_sock()
        sock = self._ctx.socket(zmq.DEALER)
        configure_socket(sock, self.config)
        # Hear at once when the router's end closes (it died): fail-over need not
        # wait for dead_after seconds of silence.
        # (and when the connection completes: the WELCOME clock starts then).
        self._mon = monitor_socket(sock, MONITOR_EVENTS)
        sock.connect(url)
        self._sock = sock
        self._fds = (sock.getsockopt(zmq.FD), self._mon.getsockopt(zmq.FD))
        # Both sockets by their descriptors (see _io_step).  The monitor's is
        # edge-triggered too, and monitor messages are rare: whoever asks the
        # monitor and finds a message sets _mon_due instead.
        self._mon_due = True
        for fd in self._fds:
            self._ospoll.register(fd, select.POLLIN)
            self._dpoll.register(fd, select.POLLIN)

    def _close_sock(self) -> None:
        sock, mon = self._sock, self._mon
        self._sock = self._mon = None
        for fd in self._fds:
            self._ospoll.unregister(fd)
            self._dpoll.unregister(fd)
        if mon is not None:
            sock.disable_monitor()
            mon.close(linger=0)
        if sock is not None:
            sock.close(linger=0)
        self._fds = ()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - a bug; make it visible, wake waiters
            log.exception("psepr I/O thread crashed")
            with self._lock:
                self._closed = True
                self._cond.notify_all()
        finally:
            with self._sock_lock:
                sock = self._sock
                if sock is not None:
                    for frames in self._session.close():   # say goodbye if we can
                        try:
                            send_frames(sock, frames)
                        except zmq.ZMQError:
                            pass
                    self._close_sock()
            self._any.set()

    def _loop(self) -> None:
        """The I/O thread: drive the socket unless a reader is driving it.

        A thread blocked in ``receive`` drives the socket itself (see
        :meth:`_drive`), so an event reaches it without a thread hand-off; the
        I/O thread steps back while readers are active and for ``_LINGER``
        seconds after, so that a reader calling ``receive`` in a loop keeps the
        socket, and takes over again for timers, sends and queues otherwise.
        """
        while not self._closed:
            # While a reader drives, it also serves sends and timers (it polls the
            # wake-up pipe): sleep.  After the last reader left, linger a little so
            # that one calling receive() in a loop keeps the socket - unless work
            # arrives (a send or control request sets _io_wake).  Readers do not
            # wake this thread when they leave: at thousands of receive() calls a
            # second that would cost a thread switch each.
            if self._readers:
                self._io_wake.wait(0.2)
                self._io_wake.clear()
                continue
            idle = time.monotonic() - self._reader_left
            if idle < _LINGER and not self._io_wake.is_set():
                self._io_wake.wait(_LINGER - idle)
                continue
            self._io_wake.clear()
            if not self._sock_lock.acquire(timeout=0.1):
                continue
            try:
                self._io_step(time.monotonic())     # one turn that does not block
                timeout = self._idle_timeout()
                if timeout is not None:
                    self._io_sleeping = True        # set before others can take the socket
            finally:
                self._sock_lock.release()
            if timeout is not None:
                # Sleep without holding the socket, so that a lone send() can go out
                # from its own thread; ZeroMQ's descriptors and the wake pipe wake us.
                try:
                    self._ospoll.poll(timeout * 1000.0)
                finally:
                    self._io_sleeping = False

    def _idle_timeout(self) -> float | None:
        """Seconds the I/O thread may sleep now, or None if work waits (socket held)."""
        s = self._session
        if s.switch_to is not None or (self._outq and s.queued < self.config.send_queue):
            return None
        if self._message_waits():
            return None
        now = time.monotonic()
        timeout = max(0.0, s.next_deadline(now) - now)
        return min(timeout, 0.01) if self._backlog else timeout

    def _drive(self, ready, deadline: float | None) -> bool:
        """Run the socket from a reader's thread until ``ready()`` or the deadline.

        Returns:
            False if the socket could not be had (the caller waits instead).
        """
        with self._lock:
            self._readers += 1
        try:
            if not self._sock_lock.acquire(blocking=False):
                self._kick()    # ask the I/O thread to step back, then take the socket
                if not self._sock_lock.acquire(timeout=0.05):
                    return False
            try:
                if not ready():
                    while not self._closed:
                        if deadline is not None and time.monotonic() >= deadline:
                            break
                        if self._io_step(deadline, ready) or ready():
                            break
                if self._io_sleeping:
                    self._recheck()
            finally:
                self._sock_lock.release()
            return True
        finally:
            with self._lock:
                self._readers -= 1
                self._reader_left = time.monotonic()

    def _io_step(self, deadline: float | None, enough=None) -> bool:
        """One turn: switch sockets if asked, poll, receive, tick, send what waits.

        Sending comes last so that a turn woken by a send (or a control request,
        or a timer) hands the message to ZeroMQ in that same turn: a lone event
        costs the I/O thread one wake-up and one turn.

        Args:
            deadline: poll no longer than until then (None: until the next timer).
            enough: a reader's predicate; once it holds, stop receiving.  A lone
                event then costs no trailing receive that fails (pyzmq raises
                ``Again`` for it, several microseconds); what is left stays in the
                socket for the next poll, which is level-triggered (and
                :meth:`_recheck` wakes a sleeping I/O thread for it).

        Returns:
            True if ``enough`` held after a message was received.

        Called with ``_sock_lock`` held, by the I/O thread or a reader.
        """
        s = self._session
        outq = self._outq
        limit = self.config.send_queue
        now = time.monotonic()
        url = None
        with self._lock:
            if self._closed:
                return False
            if s.switch_to is not None:
                url = s.take_switch()
                self._backlog = []
                self._open(url)
                s.start(now)
        # One look at the timers per turn: a message received below can only move
        # them later (or ask for a switch, which the next turn's poll serves at
        # once), and an early tick() finds nothing to do.
        due = s.next_deadline(now)
        sock = self._sock
        backlog = self._backlog
        if url is not None or (outq and s.queued < limit):
            timeout = 0.0
        else:
            timeout = max(0.0, due - now)
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now))
            if backlog:
                timeout = min(timeout, 0.01)
        # The socket's descriptor is edge-triggered (another thread's use may have
        # consumed its signal), so ask the socket first, then sleep on the
        # descriptors unless a message waits.  zmq_poll would ask it both before
        # and after sleeping, and poll the descriptors once more without waiting.
        # Rounded up: a timer less than 1 ms away would make this loop spin.
        waits = sock is not None and readable(sock)
        ready = dict(self._dpoll.poll(0 if waits else math.ceil(timeout * 1000.0)))
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        mon = self._mon
        if mon is not None and (self._mon_due or self._fds[1] in ready):
            self._mon_due = False
            closed = handshake = False
            failed = None
            try:
                while mon.poll(0):
                    m = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
                    ev = m["event"]
                    closed = closed or ev == zmq.EVENT_DISCONNECTED
                    handshake = handshake or ev == zmq.EVENT_HANDSHAKE_SUCCEEDED
                    failed = handshake_failure(ev, int(m["value"]), self._curve) or failed
            except zmq.ZMQError:
                self._mon_due = True    # not drained: its descriptor may stay quiet
            if closed or handshake or failed:
                with self._lock:
                    if handshake:
                        s.connected(time.monotonic())
                    if failed:
                        s.handshake_failed(time.monotonic(), failed)
                    if closed:
                        s.disconnected(time.monotonic())
        done = False
        # A fired descriptor is received from directly: a receive that finds
        # nothing processes the socket's commands (re-arming it) before it fails.
        if waits or (sock is not None and self._fds[0] in ready):
            with self._lock:
                if self.full_ids:
                    self._refresh_full()
                for _ in range(1000):
                    try:
                        frames = recv_frames(sock)
                    except zmq.Again:
                        break
                    s.on_message(frames, time.monotonic())
                    if enough is not None and enough():
                        done = True
                        break
            self._wake_readers()
        now = time.monotonic()
        with self._lock:
            if now >= due:
                s.tick(now)
            # Move user sends into the session (bounded by the session's queue).
            self._woken = False
            if outq and s.queued < limit:
                pop = outq.popleft
                s.add_events([pop() for _ in range(min(len(outq), limit))])
                self._space.set()
            if not backlog:
                backlog = self._backlog = s.take_out(now)
        while backlog:
            try:
                send_frames(sock, backlog[0])
            except zmq.Again:
                break
            backlog.pop(0)
        return done


#: A send at least this long after the last one sent from a caller's thread goes
#: out at once from its own thread; closer sends queue and leave as one batch,
#: after the first _DIRECT_RUN of them.
_DIRECT_GAP = 50e-6
_DIRECT_RUN = 4
#: How long the I/O thread leaves the socket to readers after the last one left.
#: Long enough for a reader to work through one large batch (2,000 events with
#: 10,000 leases take it 5-10 ms): an I/O thread that starts reading meanwhile
#: only contends with it for the GIL and the caches.  At 5 ms the receiver of
#: ``psepr bench hop``'s 10,000-lease scenario used 10-15 % more CPU per event.
_LINGER = 0.05
#: Longest single stretch a reader drives the socket before re-checking its state
#: (arrivals, sends and timers end a stretch early).
_DRIVE = 1.0


def connect(routers=None, **kwargs) -> Connection:
    """Connect to a router (the first that answers from a list).

    Args:
        routers: an endpoint (``"tcp://127.0.0.1:7600"``), a list of them, or None
            for ``PSEPR_ROUTERS`` / the servers file / the default.
        **kwargs: ``config``, ``preset`` (local/lan/wan), ``service``, ``instance``,
            ``keyfile`` and ``server_key`` (CURVE), ``shuffle``.

    Returns:
        A ready :class:`Connection` (also a context manager).

    Raises:
        ConnectionLost: no router answered.
        ConfigError: bad arguments or key files.
    """
    return Connection(routers, **kwargs)


__all__ = ["connect", "Connection", "Lease", "PseprError"]
