"""A TCP proxy on a loopback port in front of a database server, that a test can make refuse or cut connections.

The shared PostgreSQL must keep serving other tests, so an outage is made here instead: `refuse()` stops
listening (connects are refused) and closes every forwarded connection; `restore()` listens on the same port
again. Threads, standard library only; `close()` (or the context manager) ends everything it opened.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._closed = False
        self.port = self._listen(0)

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def _listen(self, port: int) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.05)
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), name="dbproxy-accept", daemon=True)
        self._threads.append(thread)
        thread.start()
        return int(listener.getsockname()[1])

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._pairs.append((client, upstream))
            thread = threading.Thread(target=self._pump, args=(client, upstream), name="dbproxy-pump", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.1)
                with self._lock:
                    if (a, b) not in self._pairs:
                        return
                for s in readable:
                    data = s.recv(_CHUNK)
                    if not data:
                        return
                    peer[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            if (a, b) in self._pairs:
                self._pairs.remove((a, b))
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut(self) -> int:
        """Close every forwarded connection (both ends see a reset or EOF); returns how many there were."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        return len(pairs)

    def refuse(self) -> None:
        """Stop listening, so new connections are refused, and cut the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.cut()

    def restore(self) -> None:
        """Listen again on the same port."""
        if self._listener is None and not self._closed:
            self._listen(self.port)

    def close(self) -> None:
        self._closed = True
        self.refuse()
        for thread in self._threads:
            thread.join(2)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
