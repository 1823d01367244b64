"""A TCP proxy on loopback whose link can be cut and healed (for partition tests).

``TcpProxy(target_port)`` listens on an ephemeral 127.0.0.1 port and relays
each accepted connection to the target.  ``cut()`` closes every relayed
connection and, until ``heal()``, closes new ones as soon as they are
accepted: to the two routers the link looks like a peer gone away.
``freeze()`` stops relaying on the connections open now but keeps them open
(a peer that hangs, seen from both ends), while new connections relay as
usual.  One thread, select(); stopped by ``close()``.
"""

from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, 0))
        self.lsock.listen(16)
        self.port = self.lsock.getsockname()[1]
        self.url = f"tcp://{host}:{self.port}"
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._cut = False
        self._frozen: set[socket.socket] = set()
        self._stop = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcpproxy")
        self._thread.start()

    def cut(self) -> None:
        """Break the link: drop every relayed connection and refuse new ones."""
        with self._lock:
            self._cut = True
            self._drop_all()

    def freeze(self) -> None:
        """Stop relaying on every connection open now, without closing them."""
        with self._lock:
            self._frozen.update(self._pairs)

    def heal(self) -> None:
        """Relay again."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        with self._lock:
            self._drop_all()
        self.lsock.close()

    def _drop_all(self) -> None:
        for s in list(self._pairs):
            try:
                s.close()
            except OSError:
                pass
        self._pairs.clear()
        self._frozen.clear()

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                socks = [self.lsock, *(s for s in self._pairs if s not in self._frozen)]
            try:
                ready, _, _ = select.select(socks, [], [], 0.05)
            except (OSError, ValueError):
                continue          # a socket was closed by cut(): go round again
            for s in ready:
                with self._lock:
                    if s is self.lsock:
                        conn, _ = self.lsock.accept()
                        if self._cut:
                            conn.close()
                            continue
                        try:
                            up = socket.create_connection(self.target, timeout=2)
                        except OSError:
                            conn.close()
                            continue
                        self._pairs[conn] = up
                        self._pairs[up] = conn
                        continue
                    other = self._pairs.get(s)
                    if other is None:
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    if data:
                        try:
                            other.sendall(data)
                            continue
                        except OSError:
                            pass
                    for x in (s, other):
                        self._pairs.pop(x, None)
                        x.close()
