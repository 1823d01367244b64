"""The asyncio client: the same API as :mod:`psepr.client`, awaitable.

Theory of operation
-------------------
One reader task drains the DEALER socket (``zmq.asyncio``) into the shared
pure :class:`~psepr.session.Session`; one timer task runs ``session.tick``.
Awaiting a message that is already waiting completes without a loop turn, so
the reader yields one turn before each such message: under a flood it would
otherwise keep the loop, filing events until the lease queues overflow while
the readers it woke, and every other task, wait.
``send`` encodes in the caller's task and schedules a single flush with
``loop.call_soon`` so that every send made in the same loop turn leaves as one
SEND batch; once a batch's worth (``batch_events``) waits, ``send`` yields a
turn itself, or a caller sending in a loop would hold the loop (and its events)
until the send queue filled.  Leases are async iterators backed by deques and
an :class:`asyncio.Event` that the reader sets once per DELIVER batch.

Usage::

    async with psepr.aio.connect("tcp://127.0.0.1:7600") as con:
        lease = await con.lease("/example.com/", duration=60)
        await con.send("/example.com/x/", {"a": 1})
        async for event in lease: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import zmq
import zmq.asyncio
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

log = logging.getLogger("psepr.aio")


class Lease(LeaseBase):
    """An asyncio lease; ``async for event in lease`` or ``await lease.receive()``."""

    def __init__(self, con: "Connection", id: str, channel: Channel, type: str | None) -> None:
        super().__init__(con, id, channel, type, asyncio.Event())

    async def receive(self, timeout: float | None = None) -> Event:
        """The next event on this lease (see :meth:`psepr.client.Lease.receive`)."""
        q = self._q
        if q:
            return q.popleft()
        deadline = None
        self._waiting += 1      # the connection sets _has only for leases waited on
        try:
            while not q:
                if self._error is not None:
                    raise self._error
                if self._closed or self._con._closed:
                    raise ClosedError(f"lease {self.id} is closed")
                self._has.clear()
                deadline, remaining = time_left(timeout, deadline, f" on {self.channel.text}")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._has.wait(), remaining)
        finally:
            self._waiting -= 1
        return q.popleft()

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except (ClosedError, LeaseExpired):
            raise StopAsyncIteration from None

    async def release(self, timeout: float = 5.0) -> None:
        """Release the lease at the router (idempotent)."""
        await self._con._release(self, timeout)


class _Gather:
    """The replies of one request_all(), and an event set when another arrives."""

    __slots__ = ("replies", "first", "more")

    def __init__(self) -> None:
        self.replies: list[Event] = []
        self.first = 0.0
        self.more = asyncio.Event()

    def add(self, event: Event) -> None:
        if not self.replies:
            self.first = time.monotonic()
        self.replies.append(event)
        self.more.set()


class Connection(ConnectionBase):
    """An asyncio connection; create with :func:`connect` (awaitable, or ``async with``)."""

    def __init__(self, routers=None, *, config: ClientConfig | None = None,
                 preset: str | None = None, service: str | None = None,
                 instance: str | None = None, keyfile: "str | Path | None" = None,
                 server_key: "str | Path | None" = None, shuffle: bool = False,
                 context: zmq.asyncio.Context | None = None) -> None:
        self.config = build_config(config, preset, service, instance, keyfile, server_key)
        self.routers = router_list(routers)
        if shuffle:
            import random
            random.shuffle(self.routers)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._leases: dict[str, Lease] = {}
        self._futs: dict[int, asyncio.Future] = {}
        self._lease_futs: dict[str, asyncio.Future] = {}
        self._requests: dict[str, "asyncio.Future | _Gather"] = {}
        self._inboxes: dict[str, Lease] = {}
        self._errors: list[Exception] = []
        self._init_arrivals()
        self._any = asyncio.Event()
        self._ready = asyncio.Event()
        self._changed = asyncio.Event()
        self._unflushed = False      # sends since the last flush (close flushes)
        self._flush_scheduled = False
        self._lease_seq = 0
        self._closed = False
        self.welcome: dict | None = None
        self.dropped_by_router = 0
        self._session = Session(self.config, self.routers, self, time.monotonic())
        self._sock = self._mon = None
        self._tasks: list[asyncio.Task] = []

    async def _start(self) -> "Connection":
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._timer(), name="psepr-timer")]
        self._switch()
        limit = self.config.connect_timeout * len(self.routers) + 1.0
        try:
            await asyncio.wait_for(self._ready.wait(), limit)
        except asyncio.TimeoutError:
            await self.close()
            raise self._unreachable(limit) from None
        return self

    def __await__(self):
        return self._start().__await__()

    async def __aenter__(self) -> "Connection":
        if self._sock is None:
            await self._start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- socket management --------------------------------------------------------
    def _switch(self) -> None:
        url = self._session.take_switch()
        if url is None:
            return
        for t in self._tasks[1:]:
            t.cancel()
        self._close_sock()
        sock = self._ctx.socket(zmq.DEALER)
        configure_socket(sock, self.config)
        # Hear at once when the router's end closes (it died); see psepr.client.
        mon = monitor_socket(sock, MONITOR_EVENTS)
        sock.connect(url)
        self._sock, self._mon = sock, mon
        self._session.start(time.monotonic())
        self._tasks[1:] = [asyncio.create_task(self._reader(sock), name="psepr-reader"),
                           asyncio.create_task(self._watch(mon), name="psepr-monitor")]
        self._schedule_flush()

    def _close_sock(self) -> None:
        sock, mon = self._sock, self._mon
        self._sock = self._mon = None
        if sock is None:
            return
        # The monitor goes first: ZeroMQ's I/O thread sends connection events to the
        # monitor's PAIR socket with a blocking send, so an event (the router closing
        # its end) raised after the PAIR closed would block that thread for good, and
        # with it every socket of the shared context (no connection ever completes).
        sock.disable_monitor()
        mon.close(linger=0)
        sock.close(linger=0)

    async def _watch(self, mon) -> None:
        """Start the WELCOME clock at the handshake; fail over once the handshake fails
        or the connection closes."""
        try:
            while (m := parse_monitor_message(await mon.recv_multipart()))["event"] \
                    != zmq.EVENT_DISCONNECTED:
                if m["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._session.connected(time.monotonic())
                elif why := handshake_failure(m["event"], int(m["value"]), self._curve):
                    self._session.handshake_failed(time.monotonic(), why)
            if not self._closed:
                self._session.disconnected(time.monotonic())
                self._changed.set()       # the timer task switches sockets
        except (asyncio.CancelledError, zmq.ZMQError):
            pass

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)

    def _flush_out(self) -> None:
        # Every call goes through the zmq.asyncio socket, never a synchronous shadow
        # of it: ZeroMQ's file descriptor is edge-triggered, and an operation that
        # zmq.asyncio does not see can swallow the edge its reader waits for.
        self._flush_scheduled = False
        sock = self._sock
        if sock is None:
            return
        out = self._session.take_out(time.monotonic())
        for i, frames in enumerate(out):
            fut = sock.send_multipart(frames, zmq.NOBLOCK)   # attempted at once
            if not fut.done():
                fut.add_done_callback(_consume)
            elif isinstance(fut.exception(), zmq.Again):
                for f in reversed(out[i:]):
                    self._session.requeue(f)
                self._loop.call_later(0.01, self._schedule_flush)
                return

    async def _reader(self, sock) -> None:
        s = self._session
        try:
            while True:
                fut = sock.recv_multipart()
                if fut.done():
                    # A message was already waiting, so awaiting it would not
                    # yield: under a flood this task would keep the loop until the
                    # lease queues overflow, starving the readers it wakes and
                    # every other task.  Give them their turn first.
                    await asyncio.sleep(0)
                frames = await fut
                self._refresh_full()
                s.on_message(frames, time.monotonic())
                self._schedule_flush()
        except asyncio.CancelledError:
            raise
        except zmq.ZMQError as exc:
            if not self._closed:
                log.warning("socket error: %s", exc)

    async def _timer(self) -> None:
        s = self._session
        while not self._closed:
            now = time.monotonic()
            delay = max(0.0, s.next_deadline(now) - now)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(delay, 1.0))
            except asyncio.TimeoutError:
                pass
            now = time.monotonic()
            if now >= s.next_deadline(now):
                s.tick(now)
            self._switch()
            self._schedule_flush()

    # -- API ---------------------------------------------------------------------------
    async def send(self, channel: "str | Channel | Event", payload: Any = None, *,
                   type: str | None = None, format: str | None = None,
                   to_service: str | None = None, to_instance: str | None = None,
                   reply_to: "str | Channel | None" = None, re: str | None = None,
                   id: str | None = None) -> str:
        """Send one event; see :meth:`psepr.client.Connection.send`."""
        if self._closed:
            raise ClosedError("connection is closed")
        item = make_entry(channel, payload, type, format, to_service, to_instance,
                          reply_to, re, id, self.config.max_event_bytes)
        s = self._session
        if s.queued >= self.config.send_queue:
            deadline = time.monotonic() + self.config.send_block_timeout
            while s.queued >= self.config.send_queue:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"send buffer full ({self.config.send_queue} events)")
                self._schedule_flush()
                await asyncio.sleep(0.005)
        s.add_events([item])
        self._unflushed = True
        self._schedule_flush()
        if s.queued >= self.config.batch_events:
            # A caller sending in a loop that never yields: the flush scheduled
            # above would wait for the whole send queue (100,000 events by
            # default), and every other task with it.  Let a batch leave now.
            await asyncio.sleep(0)
        return item[0]

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the router processed everything sent; raise its first error."""
        self._unflushed = False
        await self._control(lambda s: s.ping(), timeout, "flush")
        errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    async def lease(self, channel: "str | Channel", duration: float = 3600.0, *,
                    type: str | None = None, id: str | None = None, renew: bool = True,
                    propagated: bool = False, timeout: float = 5.0) -> Lease:
        """Lease a channel; see :meth:`psepr.client.Connection.lease`."""
        ch = parse(channel)
        check_seconds(timeout)
        if type is not None:
            _check_name(type, "type")
        if self._closed:
            raise ClosedError("connection is closed")
        if id is None:
            id = self._auto_lease_id()
        else:
            _check_name(id, "id")
        lease = self._leases.get(id)
        new = lease is None
        if new:
            lease = Lease(self, id, ch, type)
            self._leases[id] = lease
        lease.channel, lease.type, lease.granted, lease._error = ch, type, 0.0, None
        fut = self._loop.create_future()
        self._lease_futs[id] = fut
        self._session.lease(id, ch, type, duration, time.monotonic(), renew, propagated)
        self._schedule_flush()
        try:
            await asyncio.wait_for(fut, timeout)
        except PseprError:              # refused by the router: the session dropped it
            self._leases.pop(id, None)
            raise
        except BaseException as exc:    # timed out, or cancelled while waiting
            # A new lease the caller never got must not be granted later, renewed
            # and filled behind their back; a re-registration that timed out leaves
            # the lease the caller already holds.
            if new and self._give_up(id, lease):
                self._schedule_flush()  # the UNLEASE leaves now
            if isinstance(exc, asyncio.TimeoutError):
                raise TimeoutError(f"lease on {ch.text} not granted within {timeout} s") \
                    from None
            raise
        finally:
            self._lease_futs.pop(id, None)
        return lease

    async def _release(self, lease: Lease, timeout: float) -> None:
        check_seconds(timeout)
        if lease._closed:
            return
        lease._closed = True
        lease._has.set()
        self._leases.pop(lease.id, None)
        req = self._session.unlease(lease.id)
        if req is not None:
            self._schedule_flush()      # the release leaves now, not at the next timer tick
            await self._wait_req(req, timeout, f"release of lease {lease.id}")

    async def receive(self, timeout: float | None = None) -> Event:
        """The next event from any lease; see :meth:`psepr.client.Connection.receive`."""
        deadline = None     # read the clock only when there is nothing to return
        while True:
            arrivals = self._arrivals      # re-read: _compact() may replace it
            while arrivals:
                lease = arrivals.popleft()
                if lease._q:
                    return lease._q.popleft()
            if self._closed:
                raise ClosedError("connection is closed")
            self._any.clear()
            deadline, remaining = time_left(timeout, deadline)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._any.wait(), remaining)

    async def request(self, channel: "str | Channel", payload: Any = None, *,
                      type: str | None = None, format: str | None = None,
                      to_service: str | None = None, to_instance: str | None = None,
                      timeout: float = 2.0) -> Event:
        """Request/reply; see :meth:`psepr.client.Connection.request`."""
        check_seconds(timeout)
        fut = self._loop.create_future()
        async with self._asking(channel, payload, type, format, to_service, to_instance,
                                fut, timeout) as (eid, ch):
            try:
                return await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"no reply to request {eid} on {ch.text} within "
                                   f"{timeout} s") from None

    async def request_all(self, channel: "str | Channel", payload: Any = None, *,
                          type: str | None = None, format: str | None = None,
                          to_service: str | None = None, to_instance: str | None = None,
                          timeout: float = 2.0, settle: float | None = None,
                          done: "Callable[[list[Event]], bool] | None" = None) -> list[Event]:
        """Gather several replies; see :meth:`psepr.client.Connection.request_all`."""
        check_seconds(timeout)
        check_seconds(settle, "settle", none_ok=True)
        deadline = time.monotonic() + timeout
        g = _Gather()
        async with self._asking(channel, payload, type, format, to_service, to_instance,
                                g, timeout):
            while not (done is not None and g.replies and done(g.replies)):
                end = deadline if not (g.replies and settle is not None) \
                    else min(deadline, g.first + settle)
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                g.more.clear()
                try:
                    await asyncio.wait_for(g.more.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
            return list(g.replies)

    @contextlib.asynccontextmanager
    async def _asking(self, channel, payload, type, format, to_service, to_instance,
                      answer, timeout: float):
        """Send a request whose replies go to ``answer`` (a future or a _Gather)."""
        ch = parse(channel)
        inbox = await self._inbox(ch.authority, timeout)
        eid = _session.new_id()
        self._requests[eid] = answer
        try:
            await self.send(ch, payload, type=type, format=format, to_service=to_service,
                            to_instance=to_instance, reply_to=inbox.channel, id=eid)
            yield eid, ch
        finally:
            self._requests.pop(eid, None)

    async def reply(self, request: Event, payload: Any = None, *, type: str | None = None,
                    format: str | None = None) -> str:
        """Answer a request event; see :meth:`psepr.client.Connection.reply`."""
        if request.reply_to is None:
            raise UsageError(f"event {request.id} has no reply_to channel; it is not a request")
        return await self.send(request.reply_to, payload, type=type, format=format,
                               re=request.id, to_instance=request.from_instance)

    async def _inbox(self, authority: str, timeout: float) -> Lease:
        lease = self._inboxes.get(authority)
        if lease is None:
            ch = inbox_channel(authority, self.principal, self.instance)
            try:
                lease = await self.lease(ch, id=f"{INBOX_PREFIX}{authority}", timeout=timeout)
            except TimeoutError:
                raise TimeoutError(f"request: its reply inbox {ch} was not granted "
                                   f"within {timeout} s") from None
            self._inboxes[authority] = lease
        return lease

    async def stats(self, timeout: float = 2.0) -> dict:
        """The router's counters."""
        return await self._control(lambda s: s.stats(), timeout, "stats")

    async def status(self, timeout: float = 2.0) -> dict:
        """The overlay as the router sees it; see :meth:`psepr.client.Connection.status`."""
        return await self._control(lambda s: s.status(), timeout, "status")

    async def _control(self, op, timeout: float, what: str):
        check_seconds(timeout)
        if self._closed:
            raise ClosedError("connection is closed")
        if self._session.state != READY:
            try:
                await asyncio.wait_for(self._wait_ready(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{what}: not connected within {timeout} s") from None
        req = op(self._session)
        self._schedule_flush()
        return await self._wait_req(req, timeout, what)

    async def _wait_ready(self) -> None:
        while self._session.state != READY:
            self._ready.clear()
            await self._ready.wait()

    async def _wait_req(self, req: int, timeout: float, what: str):
        fut = self._futs.get(req)
        if fut is None:
            fut = self._futs[req] = self._loop.create_future()
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{what}: no answer within {timeout} s") from None
        finally:
            self._futs.pop(req, None)
            if not fut.done() or fut.cancelled():   # wait_for cancels it when it gives up
                self._session.forget(req)   # a late answer must not wait here forever

    async def close(self) -> None:
        """Hand what was sent to the router (up to 2 s), say BYE and close.  Idempotent."""
        if self._closed:
            return
        if self._session.state == READY and self._unflushed:
            try:
                await self.flush(timeout=CLOSE_FLUSH)
            except PseprError:
                pass   # closing anyway; errors were the caller's to collect by flush()
        self._closed = True
        if self._sock is not None:
            for frames in self._session.close():
                try:
                    self._sock.send_multipart(frames, zmq.NOBLOCK).add_done_callback(_consume)
                except zmq.ZMQError:
                    pass
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._close_sock()
        self._any.set()
        for lease in self._leases.values():
            lease._has.set()

    # -- Sink -------------------------------------------------------------------------------
    def deliver(self, batches: list) -> None:
        self._file(batches)
        touched, self._touched = self._touched, {}
        for lease in touched:
            lease._has.set()
        self._any.set()

    def _answer(self, event: Event) -> None:
        answer = self._requests.get(event.re)
        if isinstance(answer, _Gather):
            answer.add(event)
        elif answer is not None and not answer.done():
            answer.set_result(event)

    def ready(self, welcome: dict) -> None:
        self.welcome = welcome
        self._ready.set()

    def lease_granted(self, lease_id: str, granted: float) -> None:
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.granted = granted
        fut = self._lease_futs.get(lease_id)
        if fut is not None and not fut.done():
            fut.set_result(granted)

    def lease_failed(self, lease_id: str, exc: Exception) -> None:
        fut = self._lease_futs.get(lease_id)
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def lease_expired(self, lease_id: str) -> None:
        self._expire(lease_id)

    def completed(self, req: int, result: Any, exc: Exception | None) -> None:
        fut = self._futs.get(req)
        if fut is None:
            fut = self._futs[req] = self._loop.create_future()
        if not fut.done():
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)


def _consume(fut: asyncio.Future) -> None:
    """Mark a fire-and-forget send's outcome as seen (a lost BYE is harmless)."""
    if not fut.cancelled():
        fut.exception()




def connect(routers=None, **kwargs) -> Connection:
    """Connect asynchronously: ``con = await psepr.aio.connect(url)`` or ``async with``.

    Takes the same arguments as :func:`psepr.connect`.
    """
    return Connection(routers, **kwargs)
