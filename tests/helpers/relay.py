"""A unix-socket relay to the real engine that a test can cut, as if the engine went away.

Cutting must ``shutdown()`` sockets, not only close them: closing a socket that another thread is
blocked in ``recv``/``accept`` on does not wake it, so a pooled (kept-alive) client connection
would go on reaching the engine.
"""

from __future__ import annotations

import socket
import threading

__all__ = ["EngineRelay"]


class EngineRelay:
    """A unix-socket relay to the real engine that the test cuts (as if the engine went away)."""

    def __init__(self, path: str, target: str = "/var/run/docker.sock") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.target = target
        self.closed = False
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.closed:
                conn.close()
                return
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(self.target)
            with self.lock:
                self.conns += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def cut(self) -> None:
        """Break every open connection (shutdown wakes a pump blocked in recv; close alone does not)."""
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            for step in (lambda c=c: c.shutdown(socket.SHUT_RDWR), c.close):
                try:
                    step()
                except OSError:
                    pass

    def close(self) -> None:
        """Cut, and answer nothing any more: the engine is gone."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        except OSError:
            pass
        self.sock.close()
        self.cut()
