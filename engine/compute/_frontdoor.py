"""The agent's front door: a unix socket (``<home>/agent.sock``) on which a CLI process hands the
agent a command to do in-process, then prints what comes back.

Why: a Python CLI pays for its imports on every call (click, YAML, the run store: tens of
milliseconds), while the agent has them loaded already; a ``dockyard run`` through the front door
costs the client one interpreter start and a socket. Only the command's happy path is served here:
whenever the agent could do something differently from the client's own process (another
configuration, a password only the client's environment holds, bad input to report), it answers
"do it yourself" before anything is queued, and the client takes its normal path.

Only the agent's own user may connect: the socket is created mode 0600 and each peer's uid is
checked (``SO_PEERCRED``). The socket is made by the process holding the agent lock, so it never
belongs to another agent.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import _wire

__all__ = ["FrontDoor", "Reply", "Request"]

_REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Request:
    """A command from a client: its working directory, its configuration variables, its argv."""

    cwd: str
    environ: Mapping[str, str]
    argv: tuple[str, ...]


class Reply:
    """The way back to the client. ``fallback`` is allowed only before ``queued``."""

    def __init__(self, conn: socket.socket, log: Callable[[str], None] = lambda _line: None) -> None:
        self._conn = conn
        self._log = log
        self.queued_run: tuple[str, str] | None = None
        self.ended = False

    def _send(self, kind: bytes, payload: bytes | str = b"") -> None:
        self._conn.sendall(_wire.frame(kind, payload))

    def queued(self, workspace: str, run_id: str) -> None:
        self.queued_run = (workspace, run_id)
        self._log(f"front door: queued {run_id} of workspace {workspace} for a client")
        self._send(b"I", f"{workspace}\0{run_id}")

    def stdout(self, text: str) -> None:
        self._send(b"O", text)

    def stderr(self, text: str) -> None:
        self._send(b"E", text)

    def log(self, data: bytes) -> None:
        for start in range(0, len(data), _wire.MAX_FRAME // 2):
            self._send(b"L", data[start:start + _wire.MAX_FRAME // 2])

    def exit(self, code: int) -> None:
        self.ended = True
        self._send(b"X", str(int(code)))

    def fallback(self, reason: str) -> None:
        if self.queued_run is not None:
            raise RuntimeError("a run was queued already: the client must not do it again")
        self.ended = True
        self._send(b"F", reason)


Handler = Callable[[Request, Reply], None]


def _peer_uid(conn: socket.socket) -> int:
    pid_uid_gid = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", pid_uid_gid)[1]


class FrontDoor:
    """Serves ``handler`` on the unix socket ``path``, one thread per client."""

    def __init__(self, path: Path, handler: Handler, log: Callable[[str], None]) -> None:
        self.path = Path(path)
        self.handler = handler
        self.log = log
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Bind (replacing a socket file a killed agent left) and accept in a thread.

        Call only while holding the agent lock: the file is then certainly not another agent's.
        """
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)  # owner-only from the start: no moment in which another user may connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        threading.Thread(target=self._accept, name="front-door", daemon=True).start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the accept loop
        except OSError:
            pass
        sock.close()
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="front-door-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reply = Reply(conn, self.log)
            try:
                if _peer_uid(conn) != os.getuid():
                    return  # not our user: say nothing at all
                conn.settimeout(_REQUEST_TIMEOUT_S)
                request = self._read_request(conn)
                conn.settimeout(None)
                if request is None:
                    reply.fallback("not a request this agent understands")
                    return
                self.handler(request, reply)
                if not reply.ended:
                    reply.exit(0)
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away (Ctrl-C): the run, if queued, goes on
            except Exception as exc:  # noqa: BLE001 - a bug must cost one client its fast lane, not the agent
                self.log(f"front door: {type(exc).__name__}: {exc}")
                try:
                    if reply.queued_run is None and not reply.ended:
                        reply.fallback(f"internal error: {type(exc).__name__}")
                    elif not reply.ended:
                        reply.stderr(f"error: the agent failed while following the run: {exc}\n")
                        reply.exit(1)
                except OSError:
                    pass

    @staticmethod
    def _read_request(conn: socket.socket) -> Request | None:
        try:
            got = _wire.read_frame(conn)
        except (ValueError, OSError):
            return None
        if got is None or got[0] != b"R":
            return None
        parts = _wire.fields(got[1])
        try:
            if parts[0] != _wire.PROTOCOL:
                return None
            cwd, count = parts[1], int(parts[2])
            pairs = parts[3:3 + count]
            argv = tuple(parts[3 + count:])
        except (IndexError, ValueError):
            return None
        if len(pairs) != count or not all("=" in p for p in pairs):
            return None
        return Request(cwd, dict(p.split("=", 1) for p in pairs), argv)
