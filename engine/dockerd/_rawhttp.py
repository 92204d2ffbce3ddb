"""The one engine request a cache hit needs, in raw HTTP/1.0 over the unix socket.

Importing ``http.client`` (and ``socket``'s enum wrappers) costs more than the request itself,
and the hit path runs once per CLI process; so this module imports only ``_socket`` and ``re``.
"""

from __future__ import annotations

# The C module: `socket` wraps it in enums and selectors that cost ~9 ms to import.
import _socket
import re

__all__ = ["unix_image_id"]

# The image's own "Id" is the first key of the inspect document; json would cost ~7 ms to import.
_ID = re.compile(rb'"Id":\s*"(sha256:[0-9a-f]{64})"')


def unix_image_id(socket_path: str, ref: str, timeout: float = 5.0) -> str | None:
    """The ID of image ``ref`` in the engine at ``socket_path``; ``None`` if absent or unreachable."""
    # Image references are [a-z0-9._:@/-]; only '/' needs escaping in a path segment.
    quoted = ref.replace("%", "%25").replace("/", "%2F")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(f"GET /v1.41/images/{quoted}/json HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except OSError:
        return None
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")):
        return None
    found = _ID.search(body)
    return found.group(1).decode() if found else None
