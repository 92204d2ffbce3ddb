"""Byte sizes as people write and read them: ``2g`` (Docker's binary units) and ``1.5 GiB``."""

from __future__ import annotations

import re

__all__ = ["binary_size", "human_bytes"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*$", re.I)
_UNIT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def binary_size(text: str) -> int | None:
    """``"2g"``, ``"512m"``, ``"4GiB"``, ``"1048576"`` -> bytes, as Docker reads sizes (k = 1024);
    None when ``text`` is not a size."""
    found = _SIZE.match(str(text))
    if found is None:
        return None
    return int(float(found.group(1)) * _UNIT[found.group(2).lower()])


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (bytes below 1 KiB as ``"512 B"``)."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
