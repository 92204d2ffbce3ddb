"""Which dockyard code a process runs: a short hash over its modules' names, sizes and times.

A long-lived agent keeps running the code it started with. After an upgrade (``pip install -U``,
or an edit of an editable install) a client must not hand runs to an agent of another version:
the agent writes its code id next to its pid, and clients compare it with their own (one ``stat``
per module, about a millisecond).
"""

from __future__ import annotations

import os
import zlib

__all__ = ["code_id"]

_CACHED: list[str] = []


def code_id(*, fresh: bool = False) -> str:
    """The id of the dockyard code this process imports (computed once per process)."""
    if _CACHED and not fresh:
        return _CACHED[0]
    root = os.path.dirname(os.path.abspath(__file__))
    rows: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir() and entry.name != "__pycache__":
                stack.append(entry.path)
            elif entry.name.endswith(".py"):
                try:
                    st = entry.stat()  # follows the editable install's symlinks to the real files
                except OSError:
                    continue
                rows.append(f"{os.path.relpath(entry.path, root)}\0{st.st_size}\0{st.st_mtime_ns}")
    # CRC-32 and a count, not SHA-256: this runs in the fast client, where importing hashlib (OpenSSL)
    # alone costs more than the whole check; an accidental collision needs a changed tree of equal CRC.
    text = "\n".join(sorted(rows)).encode()
    digest = f"{zlib.crc32(text):08x}{len(rows):04x}{len(text) & 0xFFFF:04x}"
    _CACHED[:] = [digest]
    return digest
