"""The fastest possible hit, for short-lived processes: a memoised key, checked with plain SQL.

A CLI that is started once per question cannot amortise imports: importing the full cache
(dataclasses, regexes, sqlite-utils for writers) costs more than a cached ``docker build``. This
module imports only ``sqlite3``, ``json`` and ``time``; it answers "is the image for this exact
spec source still cached?" from the memo that :meth:`ImageCache.remember_key` wrote, and only when
every base resolution the key depended on is still fresh and unchanged. Any doubt means ``None``:
the caller then takes the normal path, which re-derives everything.
"""

from __future__ import annotations

# The C module itself: the `sqlite3` package adds only adapters (and imports datetime for them),
# which costs ~9 ms, a third of a whole fast hit. The API used here is identical.
import _sqlite3 as sqlite3
import re
import time

__all__ = ["FastHit", "fast_hit"]


class FastHit:
    """The entry a memoised key points at (plain attributes: no dataclass import on this path)."""

    __slots__ = ("image", "image_id", "key")

    def __init__(self, key: str, image: str, image_id: str) -> None:
        self.key, self.image, self.image_id = key, image, image_id


_PAIR = re.compile(r'"([^"\\]+)":\s*"([^"\\]+)"')


def fast_hit(index: str, source: str, fingerprint: str, max_age: float) -> FastHit | None:
    """The cached entry for ``source`` if its memo matches ``fingerprint`` and its base resolutions
    are younger than ``max_age`` seconds and unchanged; records the hit. ``None`` on any doubt,
    including a missing, locked, old or damaged index: this path never raises for those.
    """
    try:
        conn = sqlite3.connect(f"file:{index}?mode=rw", uri=True, timeout=2.0, isolation_level=None)
    except sqlite3.Error:
        return None
    try:
        conn.execute("PRAGMA synchronous=NORMAL")  # as every index writer: no fsync per WAL commit
        memo = conn.execute(
            "SELECT fingerprint, key, refs FROM memos WHERE source = ?", (source,)
        ).fetchone()
        if memo is None or memo[0] != fingerprint:
            return None
        now = time.time()
        # refs is a flat JSON object of validated references and digests (no quotes inside),
        # so a regex reads it without importing json.
        for ref, digest in _PAIR.findall(memo[2]):
            row = conn.execute("SELECT digest, resolved FROM resolutions WHERE ref = ?", (ref,)).fetchone()
            if row is None or row[0] != digest or now - row[1] > max_age:
                return None
        entry = conn.execute("SELECT image, image_id FROM entries WHERE key = ?", (memo[1],)).fetchone()
        if entry is None:
            return None
        # The same bookkeeping a normal hit does (LRU GC reads it); one small WAL write.
        conn.execute(
            "UPDATE entries SET last_used = ?, hit_count = hit_count + 1 WHERE key = ?", (now, memo[1])
        )
        return FastHit(memo[1], entry[0], entry[1])
    except sqlite3.Error:
        return None
    finally:
        conn.close()
