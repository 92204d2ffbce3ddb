"""Engine side of cache GC: which images running containers use, and removing an image."""

from __future__ import annotations

import urllib.parse

from ._engine import EngineAddress
from .errors import DockyardError, EngineError, InputError

__all__ = ["images_in_use", "parse_size", "remove_image"]

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"10G"``, ``"500MiB"``, ``"1048576"`` -> bytes.

    Raises:
        InputError: not a size.
    """
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgtib")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0:
        raise InputError(f"{text!r} is not a size", hint="write e.g. 20G, 500MiB or a number of bytes")
    return int(value * _UNITS[unit])


def images_in_use(engine: EngineAddress) -> set[str]:
    """Image IDs of every container that exists (running or stopped): GC must not pull them away."""
    reply = engine.request("GET", "/containers/json?all=1")
    if reply.status != 200:
        raise EngineError(f"listing containers answered HTTP {reply.status}", status=reply.status)
    return {str(c.get("ImageID", "")) for c in reply.json() or []}


def remove_image(engine: EngineAddress, ref: str) -> None:
    """Delete one tag from the engine (an image that is already gone is fine).

    Raises:
        EngineError: the engine refused (e.g. a container still uses it).
    """
    reply = engine.request("DELETE", f"/images/{urllib.parse.quote(ref, safe='')}")
    if reply.status in (200, 404):
        return
    try:
        message = str(reply.json().get("message", ""))
    except (ValueError, DockyardError):
        message = reply.body[:200].decode(errors="replace")
    raise EngineError(f"removing {ref}: {message or f'HTTP {reply.status}'}", status=reply.status)
