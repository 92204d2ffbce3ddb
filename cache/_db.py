"""SQLite plumbing of the index: connections, the one ``sqlite3.Error`` translation, the schema.

The read path only needs :func:`connect` and :func:`translate` (stdlib ``sqlite3``); the schema is
created and migrated by :func:`ensure_schema`, which imports ``sqlite_utils`` lazily so that
importing ``dockyard.cache`` and looking a key up stays cheap. :func:`upsert_entry` is the one
statement that writes an entry, shared by a plain record and by a lease holder's record.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ._model import ENTRY_COLUMNS, CacheEntry, entry_from_row
from .errors import CacheError, IndexCorrupt, IndexUnavailable

if TYPE_CHECKING:
    import sqlite_utils

__all__ = [
    "INDEX_SCHEMA",
    "SELECT_ENTRY",
    "abandon",
    "check_not_newer",
    "connect",
    "ensure_schema",
    "fork_generation",
    "transaction",
    "translate",
    "upsert_entry",
]

#: ``PRAGMA user_version`` of the index this code writes; bump it with a new migration.
INDEX_SCHEMA = 5

_generation = 0
# Connections inherited across fork() are never closed in the child nor garbage-collected there:
# SQLite forbids using them, and closing one could checkpoint the parent's WAL under its feet.
_ABANDONED: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    global _generation
    _generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def fork_generation() -> int:
    """A number that changes in a child after every fork (cheaper than comparing pids)."""
    return _generation


def abandon(conn: sqlite3.Connection) -> None:
    """Keep an inherited connection alive forever without touching it."""
    _ABANDONED.append(conn)


def connect(path: str, busy_timeout: float) -> sqlite3.Connection:
    """Open a connection in autocommit mode: transactions are always explicit here.

    Raises:
        sqlite3.Error: left to the caller, which translates it once with :func:`translate`.
    """
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    # In WAL mode NORMAL never corrupts the file; a power cut may lose the last commits, which for
    # a cache only means a rebuild, and it spares an fsync per write.
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED


def translate(exc: sqlite3.Error, path: str, action: str) -> CacheError:
    """Map a ``sqlite3.Error`` onto the cache's tree (the only place that does so).

    Args:
        exc: the foreign error.
        path: the index file, for the message.
        action: what was being done, e.g. ``"look up a key in"``.

    Returns:
        The error to raise ``from exc``.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary in _CORRUPT_CODES or "malformed" in text or "not a database" in text:
        return IndexCorrupt(
            f"cannot {action} the cache index at {path}: {text}",
            path=path,
            problems=(text,),
            hint="the file is damaged or not an index; move it away and the cache starts empty",
        )
    if primary in _BUSY_CODES:
        hint = "another process held the index's write lock too long; retry, or raise busy_timeout"
    elif primary == 8:  # SQLITE_READONLY
        hint = "the index is read-only for this user; fix its permissions or use another path"
    elif primary in {13, 10}:  # SQLITE_FULL, SQLITE_IOERR
        hint = "check free disk space and the file system holding the index"
    elif primary == 14:  # SQLITE_CANTOPEN
        hint = "check that the directory exists and is writable"
    else:
        hint = "run `dockyard cache stats` to check the index"
    return IndexUnavailable(f"cannot {action} the cache index at {path}: {text}", path=path, hint=hint)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so two writers never deadlock upgrading read locks.

    Raises:
        sqlite3.Error: left to the caller to translate.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


#: The entry of one key, in the column order :func:`entry_from_row` reads.
SELECT_ENTRY = f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key = ?"
_UPSERT = (
    "INSERT INTO entries (key, image, image_id, size, created, last_used, hit_count, parts,"
    " builder, pinned) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, 0)"
    " ON CONFLICT(key) DO UPDATE SET image = excluded.image, image_id = excluded.image_id,"
    " size = excluded.size, created = excluded.created, last_used = excluded.last_used,"
    " parts = excluded.parts, builder = excluded.builder"
)


def upsert_entry(
    conn: sqlite3.Connection,
    hexkey: str,
    *,
    image: str,
    image_id: str,
    size: int,
    parts: dict[str, str],
    builder: str,
) -> CacheEntry:
    """Write (or replace) an entry, keeping its hit count and pin, and read it back.

    Run it inside the caller's :func:`transaction`, so that whatever else that transaction does
    (deleting a build lease) commits with the entry or not at all. Fields are validated already.

    Raises:
        sqlite3.Error: left to the caller to translate.
    """
    now = time.time()
    parts_json = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    conn.execute(_UPSERT, (hexkey, image, image_id, size, now, now, parts_json, builder))
    return entry_from_row(conn.execute(SELECT_ENTRY, (hexkey,)).fetchone())


def _migrate_to_1(db: sqlite_utils.Database) -> None:
    """Schema 1: entries (the cache) and leases (single-flight builds)."""
    db["entries"].create(  # type: ignore[union-attr]
        {
            "key": str,
            "image": str,
            "image_id": str,
            "size": int,
            "created": float,
            "last_used": float,
            "hit_count": int,
            "parts": str,
            "builder": str,
            "pinned": int,
        },
        pk="key",
        not_null={"image", "image_id", "size", "created", "last_used", "hit_count", "parts",
                  "builder", "pinned"},
        defaults={"size": 0, "hit_count": 0, "parts": "{}", "builder": "", "pinned": 0},
    )
    # GC walks entries least-recently-used first.
    db["entries"].create_index(["last_used"])  # type: ignore[union-attr]
    db["leases"].create(  # type: ignore[union-attr]
        {
            "key": str,
            "owner": str,
            "pid": int,
            "acquired": float,
            "heartbeat": float,
            # The holder's own lease_timeout: staleness is the holder's promise, not the waiter's.
            "timeout": float,
        },
        pk="key",
        not_null={"owner", "pid", "acquired", "heartbeat", "timeout"},
    )


def _migrate_to_2(db: sqlite_utils.Database) -> None:
    """Schema 2: base-image resolutions remembered for a bounded time (reference -> digest)."""
    db["resolutions"].create(  # type: ignore[union-attr]
        {"ref": str, "digest": str, "resolved": float},
        pk="ref",
        not_null={"digest", "resolved"},
    )


def _migrate_to_3(db: sqlite_utils.Database) -> None:
    """Schema 3: key memos (a spec source's fingerprint -> the key it produced, and the base
    resolutions that key depended on), so a caller can find a hit without re-reading the spec."""
    db["memos"].create(  # type: ignore[union-attr]
        {"source": str, "fingerprint": str, "key": str, "refs": str, "recorded": float},
        pk="source",
        not_null={"fingerprint", "key", "refs", "recorded"},
    )


def _migrate_to_4(db: sqlite_utils.Database) -> None:
    """Schema 4: the last push of each key to each shared registry (its outcome, not whether the
    registry still holds it: that is asked of the registry), and the key parts of keys seen in a
    shared registry (read once from the image's labels: a key's parts never change)."""
    db["publishes"].create(  # type: ignore[union-attr]
        {"key": str, "registry": str, "ok": int, "detail": str, "at": float},
        pk=("key", "registry"),
        not_null={"ok", "detail", "at"},
    )
    db["remote_parts"].create(  # type: ignore[union-attr]
        {"registry": str, "key": str, "parts": str},
        pk=("registry", "key"),
        not_null={"parts"},
    )


def _migrate_to_5(db: sqlite_utils.Database) -> None:
    """Schema 5: what each build resolved its requirements to (``name==version`` lines), which
    installer did it, into which layout (``venv``, ``conda``), and the neighbour image a near miss
    started from."""
    db["packages"].create(  # type: ignore[union-attr]
        {"key": str, "installer": str, "layout": str, "packages": str, "neighbour": str, "recorded": float},
        pk="key",
        not_null={"installer", "layout", "packages", "neighbour", "recorded"},
        defaults={"neighbour": "", "layout": ""},
    )


#: target version -> migration that brings the schema from target - 1 to target.
_MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_to_1,
    2: _migrate_to_2,
    3: _migrate_to_3,
    4: _migrate_to_4,
    5: _migrate_to_5,
}


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _enable_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Switch the file to WAL (persistent), retrying while other connections hold it.

    SQLite answers SQLITE_BUSY to this pragma at once, without its busy handler, when several
    connections open a fresh file together; so the retry is ours, bounded by ``busy_timeout``.

    Raises:
        sqlite3.Error: still busy after ``busy_timeout``, or another failure.
    """
    deadline = time.monotonic() + busy_timeout
    delay = 0.001
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
            if code not in _BUSY_CODES or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def ensure_schema(conn: sqlite3.Connection, path: str, busy_timeout: float) -> None:
    """Create or migrate the schema to :data:`INDEX_SCHEMA` (idempotent, safe across processes).

    Raises:
        IndexUnavailable: the file was written by a newer schema this code does not know.
        sqlite3.Error: left to the caller to translate.
    """
    version = _user_version(conn)
    if version == INDEX_SCHEMA:
        return
    check_not_newer(version, path)
    import sqlite_utils  # lazily: only writers and migrations pay for it

    # journal_mode cannot change inside a transaction; WAL is then a property of the file.
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        _enable_wal(conn, busy_timeout)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    with transaction(conn):
        # Re-read under the write lock: another process may have migrated meanwhile.
        version = _user_version(conn)
        check_not_newer(version, path)
        for target in range(version + 1, INDEX_SCHEMA + 1):
            _MIGRATIONS[target](db)
        conn.execute(f"PRAGMA user_version={INDEX_SCHEMA}")


def check_not_newer(version: int, path: str) -> None:
    """Refuse an index written by a newer schema than :data:`INDEX_SCHEMA`.

    Raises:
        IndexUnavailable: ``version`` is newer.
    """
    if version > INDEX_SCHEMA:
        raise IndexUnavailable(
            f"the cache index at {path} has schema {version}, newer than this dockyard's "
            f"{INDEX_SCHEMA}",
            path=path,
            hint="upgrade dockyard, or point this tool at another index path",
        )
