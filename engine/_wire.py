"""The agent's front door protocol: frames over a unix socket, readable with the standard library's
C modules only (a CLI process that asks the agent to run something imports nothing else).

A frame is one kind byte, a 4-byte big-endian length and the payload. A request (``R``) carries
NUL-separated UTF-8 fields (argv and environment values cannot hold a NUL)::

    R  PROTOCOL, cwd, n, n x "NAME=value", argv...

Replies, in order::

    I  workspace, run id            the run was queued (the client may now resume on its own)
    O  bytes for stdout             E  bytes for stderr
    L  bytes of the run's output    (stdout too; counted, so a client can resume at that offset)
    X  exit code (ASCII)            the end
    F  reason                       "do it yourself": only ever before I, and nothing was queued
"""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:  # pragma: no cover
    import _socket

__all__ = ["MAX_FRAME", "PROTOCOL", "SOCKET_NAME", "fields", "frame", "read_frame"]

PROTOCOL = "dockyard-front-door/1"
#: The socket's name inside the dockyard home.
SOCKET_NAME = "agent.sock"
#: No request or reply frame is larger (a log chunk is cut below it).
MAX_FRAME = 4 << 20


def frame(kind: bytes, payload: bytes | str = b"") -> bytes:
    data = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
    return kind + len(data).to_bytes(4, "big") + data


def fields(payload: bytes) -> list[str]:
    return payload.decode("utf-8", "surrogateescape").split("\0")


def _read_exactly(sock: _socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: _socket.socket) -> tuple[bytes, bytes] | None:
    """The next ``(kind, payload)``, or None at a clean or torn end of the stream.

    Raises:
        ValueError: a frame larger than :data:`MAX_FRAME` (not our protocol).
    """
    head = _read_exactly(sock, 5)
    if head is None:
        return None
    size = int.from_bytes(head[1:], "big")
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the limit")
    payload = _read_exactly(sock, size) if size else b""
    if payload is None:
        return None
    return head[:1], payload
