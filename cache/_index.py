"""The image index: a SQLite file mapping content keys to built images.

The read path (:meth:`ImageCache.lookup`) uses stdlib ``sqlite3`` on one connection per thread
that stays open, so a hit costs one indexed ``SELECT``. Hit bookkeeping (``last_used``,
``hit_count``, which LRU GC needs) is kept in memory and written in one small transaction when
the stored ``last_used`` is older than ``touch_interval``, when the batch is that old, or when the
cache is closed, collected or the process exits: a hit never pays for a write transaction except
about once per ``touch_interval``.

The index also remembers what base-image references resolved to (:meth:`ImageCache.resolution`),
for a bounded time, so that pinning a key's base digest does not cost a registry round trip per hit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Self

from . import _db
from ._keys import HEX32, ContentKey
from ._lease import BuildSlot, LeaseTable, acquire
from ._model import (
    ENTRY_COLUMNS,
    BuildResult,
    CacheEntry,
    CacheStats,
    GcFailure,
    GcReport,
    PackageRecord,
    PublishRecord,
    check_parts,
    check_result_fields,
    entry_from_row,
)
from .errors import (
    CacheError,
    CacheInputError,
    IndexCorrupt,
    IndexUnavailable,
    InvalidKey,
)

__all__ = ["ImageCache"]

_SELECT_ENTRY = _db.SELECT_ENTRY
_TOUCH = (
    "UPDATE entries SET hit_count = hit_count + ?, last_used = max(last_used, ?) WHERE key = ?"
)
_MAX_PENDING = 1024

_LIVE: weakref.WeakSet[ImageCache] = weakref.WeakSet()


@atexit.register
def _flush_all_at_exit() -> None:
    # Best effort: a process that exits normally keeps its hits; kill -9 loses at most a batch.
    for cache in list(_LIVE):
        cache._flush(quiet=True)


def _key_hex(key: ContentKey | str) -> str:
    """The hex of a key given as a ContentKey or as text (validated)."""
    if type(key) is ContentKey:
        return key.hex
    if isinstance(key, str):
        return key if HEX32.fullmatch(key) else ContentKey.parse(key).hex
    raise InvalidKey(
        f"expected a ContentKey or a 32-hex string, got {type(key).__name__}",
        hint="pass compute_key(...) or its hex",
    )


def _key_and_parts(key: ContentKey | str) -> tuple[str, dict[str, str]]:
    if isinstance(key, ContentKey):
        return key.hex, dict(key.parts)
    return _key_hex(key), {}


_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-f]{32,128}")


def _check_ref(ref: object) -> None:
    if not isinstance(ref, str) or not ref or any(c.isspace() for c in ref) or "\x00" in ref:
        raise CacheInputError(
            "an image reference is a non-empty string without spaces",
            hint='e.g. "dockyard/base:bookworm-python3"',
        )


def _check_seconds(name: str, value: object, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise CacheInputError(f"{name} must be a number >= 0", hint=f"got {value!r}")


class ImageCache:
    """A content-addressed image index in one SQLite file, safe across threads and processes.

    Args:
        path: the index file; its parent directories are created on first use.
        busy_timeout: seconds a statement waits for another process's write lock.
        touch_interval: seconds of hit bookkeeping kept in memory before it is written.

    Raises:
        CacheInputError: an argument is invalid (``":memory:"`` is refused: the lease heartbeat
            and other processes need a real file).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 5.0,
        touch_interval: float = 60.0,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("", ":memory:"):
            raise CacheInputError(
                "ImageCache needs the path of an index file",
                hint="e.g. ~/.local/share/dockyard/index.db, or a file in a temp dir for tests",
            )
        _check_seconds("busy_timeout", busy_timeout, allow_none=False)
        _check_seconds("touch_interval", touch_interval, allow_none=False)
        self._path = Path(path).expanduser()
        self._path_str = str(self._path)
        self._busy_timeout = float(busy_timeout)
        self._touch_interval = float(touch_interval)
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _conns
        self._hits_lock = threading.Lock()  # guards _pending
        self._conns: list[tuple[int, sqlite3.Connection]] = []
        self._schema_gen = -1
        self._pending: dict[str, list[float]] = {}
        self._gen = _db.fork_generation()
        self._last_flush = time.time()
        _LIVE.add(self)

    def _forked(self) -> None:
        """Reset per-process state in a fork child (it is single-threaded at this point)."""
        self._lock = threading.Lock()  # a parent thread may have held them at fork time
        self._hits_lock = threading.Lock()
        self._pending = {}  # the parent owns (and writes) those hits
        for _, conn in self._conns:
            _db.abandon(conn)  # never closed or collected here: SQLite forbids it after fork
        self._conns = []
        self._gen = _db.fork_generation()

    def __repr__(self) -> str:
        return f"ImageCache({self._path_str!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Interpreter teardown may have taken sqlite3 away already: nothing sensible left to do.
        with contextlib.suppress(Exception):
            self._flush(quiet=True)

    @property
    def path(self) -> Path:
        """The index file."""
        return self._path

    # -- connections -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        local = self._local
        try:
            if local.gen == _db.fork_generation():
                conn: sqlite3.Connection = local.conn
                return conn
            _db.abandon(local.conn)  # inherited across fork: SQLite forbids touching it
        except AttributeError:
            pass
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = _db.connect(self._path_str, self._busy_timeout)
        except OSError as exc:
            raise IndexUnavailable(
                f"cannot create the directory of the cache index {self._path_str}: {exc.strerror}",
                path=self._path_str,
                hint="check that the parent directory is writable, or choose another path",
            ) from exc
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "open") from exc
        if self._gen != _db.fork_generation():
            self._forked()
        local.conn = conn
        local.gen = _db.fork_generation()
        with self._lock:
            self._conns.append((_db.fork_generation(), conn))
        return conn

    def _ensure_schema(self) -> sqlite3.Connection:
        conn = self._conn()
        if self._schema_gen != _db.fork_generation():
            try:
                _db.ensure_schema(conn, self._path_str, self._busy_timeout)
            except sqlite3.Error as exc:
                raise _db.translate(exc, self._path_str, "create the schema of") from exc
            self._schema_gen = _db.fork_generation()
        return conn

    def close(self) -> None:
        """Write pending hit bookkeeping and close this process's connections.

        The cache stays usable: the next call reopens a connection.

        Raises:
            IndexUnavailable: the pending bookkeeping could not be written.
        """
        try:
            self._flush(quiet=False)
        finally:
            with self._lock:
                conns, self._conns = self._conns, []
            for gen, conn in conns:
                if gen == _db.fork_generation():
                    conn.close()
            self._local = threading.local()

    # -- read path ---------------------------------------------------------------------------

    def lookup(self, key: ContentKey | str) -> CacheEntry | None:
        """Find the entry for a key (the hot path: stdlib sqlite3, about 10 µs).

        Args:
            key: a :class:`ContentKey` or its 32-hex text.

        Returns:
            The entry, or None on a miss (also when the index does not exist yet).

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index cannot be read (``IndexCorrupt`` when it is damaged).
        """
        hexkey = key.hex if type(key) is ContentKey else _key_hex(key)
        conn = self._conn()
        try:
            row = conn.execute(_SELECT_ENTRY, (hexkey,)).fetchone()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return None  # nothing was ever recorded here; reads never create the schema
            if not str(exc).startswith("no such column"):
                raise _db.translate(exc, self._path_str, "look up a key in") from exc
            self._ensure_schema()  # an older schema: migrate once, then read again
            try:
                row = conn.execute(_SELECT_ENTRY, (hexkey,)).fetchone()
            except sqlite3.Error as exc2:
                raise _db.translate(exc2, self._path_str, "look up a key in") from exc2
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "look up a key in") from exc
        if row is None:
            return None
        now = time.time()
        with self._hits_lock:  # exact counts when threads share the cache
            hit = self._pending.get(hexkey)
            if hit is None:
                self._pending[hexkey] = [1, now]
            else:
                hit[0] += 1
                hit[1] = now
        if (
            now - row[5] >= self._touch_interval
            or now - self._last_flush >= self._touch_interval
            or len(self._pending) >= _MAX_PENDING
        ):
            self._flush(quiet=True)
        return entry_from_row(row)

    def _flush(self, *, quiet: bool) -> None:
        """Write pending hits in one transaction.

        Args:
            quiet: on failure keep the hits for the next flush instead of raising (a hit must
                not fail because its bookkeeping met a busy index).

        Raises:
            IndexUnavailable: the write failed and ``quiet`` is False.
        """
        if self._gen != _db.fork_generation():
            self._forked()
        self._last_flush = time.time()
        with self._hits_lock:
            pending, self._pending = self._pending, {}
        if not pending:
            return
        try:
            conn = self._conn()
            with _db.transaction(conn):
                conn.executemany(_TOUCH, [(c, t, k) for k, (c, t) in pending.items()])
        except (sqlite3.Error, CacheError) as exc:
            with self._hits_lock:  # keep them for the next flush
                for k, (c, t) in pending.items():
                    hit = self._pending.setdefault(k, [0, t])
                    hit[0] += c
                    hit[1] = max(hit[1], t)
            if quiet:
                return
            if isinstance(exc, sqlite3.Error):
                raise _db.translate(exc, self._path_str, "write hit counts to") from exc
            raise

    # -- writes ------------------------------------------------------------------------------

    def record(
        self,
        key: ContentKey | str,
        *,
        image: str,
        image_id: str,
        size: int = 0,
        parts: dict[str, str] | None = None,
        builder: str = "",
    ) -> CacheEntry:
        """Record (or replace) the image built for a key, atomically.

        Prefer :meth:`building` or :meth:`get_or_build` when several processes may build the same
        key; ``record`` is for importing images built elsewhere.

        Args:
            key: the content key.
            image: the image reference, e.g. ``"dockyard/env:<key>"``.
            image_id: the image id.
            size: bytes (0 when unknown).
            parts: part hashes; defaults to ``key.parts`` when ``key`` is a :class:`ContentKey`.
            builder: who built it.

        Returns:
            The stored entry. Re-recording a key keeps its hit count and pin.

        Raises:
            InvalidKey: ``key`` is not a key.
            CacheInputError: another field is invalid.
            IndexUnavailable: the index could not be written.
        """
        hexkey, key_parts = _key_and_parts(key)
        check_result_fields(image, image_id, size, builder)
        stored = check_parts(key_parts if parts is None else parts)
        conn = self._ensure_schema()
        try:
            with _db.transaction(conn):
                return _db.upsert_entry(
                    conn, hexkey, image=image, image_id=image_id, size=size, parts=stored,
                    builder=builder,
                )
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "record an entry in") from exc

    def remove(self, key: ContentKey | str) -> bool:
        """Delete an entry from the index (the image itself is the caller's business).

        Returns:
            True when an entry was deleted.

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index could not be written.
        """
        return self._update("DELETE FROM entries WHERE key = ?", (_key_hex(key),), "remove from")

    def find(self, key: ContentKey | str) -> CacheEntry | None:
        """The entry of ``key``, or else of the one entry whose key *before base resolution* is
        ``key`` (see :func:`unresolved_key`): a spec's key shown offline names its image too.
        No bookkeeping is written (unlike :meth:`lookup`).

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index could not be read.
        """
        from ._keys import unresolved_key

        hexkey = _key_hex(key)
        matches = []
        for entry in self.entries():
            if entry.key == hexkey:
                return entry
            try:
                if unresolved_key(entry.parts) == hexkey:
                    matches.append(entry)
            except CacheError:
                continue  # an entry recorded without parts
        # Several images of one spec (its base moved between builds): the newest is the one meant.
        return max(matches, key=lambda e: e.created) if matches else None

    def pin(self, key: ContentKey | str) -> bool:
        """Protect an entry from GC.

        Returns:
            True when the entry exists (pinned now), False when there is no such entry.

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index could not be written.
        """
        return self._update(
            "UPDATE entries SET pinned = 1 WHERE key = ?", (_key_hex(key),), "pin an entry in"
        )

    def unpin(self, key: ContentKey | str) -> bool:
        """Let GC consider an entry again.

        Returns:
            True when the entry exists (unpinned now), False when there is no such entry.

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index could not be written.
        """
        return self._update(
            "UPDATE entries SET pinned = 0 WHERE key = ?", (_key_hex(key),), "unpin an entry in"
        )

    def _update(self, sql: str, args: tuple[Any, ...], action: str) -> bool:
        conn = self._ensure_schema()
        try:
            with _db.transaction(conn):
                return conn.execute(sql, args).rowcount > 0
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, action) from exc

    # -- listings ----------------------------------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every entry, most recently used first.

        Raises:
            IndexUnavailable: the index could not be read.
        """
        import sqlite_utils  # listings are off the hot path

        conn = self._ensure_schema()
        self._flush(quiet=True)
        columns = [c.strip() for c in ENTRY_COLUMNS.split(",")]
        try:
            db = sqlite_utils.Database(conn, execute_plugins=False, recursive_triggers=False)
            rows = db.table("entries").rows_where(
                select=ENTRY_COLUMNS, order_by="last_used DESC, key"
            )
            return [entry_from_row(tuple(r[c] for c in columns)) for r in rows]
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "list") from exc

    def stats(self) -> CacheStats:
        """Counts and sizes of what the index holds (after writing this process's pending hits).

        Raises:
            IndexUnavailable: the index could not be read or written.
        """
        conn = self._ensure_schema()
        self._flush(quiet=False)
        try:
            n, total, hits, pinned, oldest, newest = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(hit_count), 0),"
                " coalesce(sum(pinned), 0), min(created), max(created) FROM entries"
            ).fetchone()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read statistics of") from exc
        leases = self._lease_table().count()
        return CacheStats(self._path_str, n, total, hits, pinned, leases, oldest, newest)

    def verify(self) -> None:
        """Check the file with ``PRAGMA integrity_check`` and the schema version.

        Raises:
            IndexCorrupt: the check found problems (listed in ``problems``).
            IndexUnavailable: the index could not be read, or has a newer schema.
        """
        conn = self._conn()
        try:
            problems = tuple(r[0] for r in conn.execute("PRAGMA integrity_check"))
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "verify") from exc
        if problems != ("ok",):
            raise IndexCorrupt(
                f"the cache index at {self._path_str} failed its integrity check",
                path=self._path_str,
                problems=problems,
                hint="move the file away; the cache starts empty and images are rebuilt",
            )
        if version > _db.INDEX_SCHEMA:
            _db.check_not_newer(version, self._path_str)

    # -- pushes to shared registries ----------------------------------------------------------

    def record_publish(self, key: ContentKey | str, registry: str, *, ok: bool, detail: str) -> None:
        """Remember how the last push of ``key`` to ``registry`` ended (replacing the one before).

        Args:
            key: the content key pushed.
            registry: where (``REG/REPO``, no credentials).
            ok: whether the push succeeded.
            detail: the pushed digest, or why it failed.

        Raises:
            CacheInputError: an argument is invalid.
            IndexUnavailable: the index could not be written.
        """
        hexkey = _key_hex(key)
        if not isinstance(registry, str) or not registry or "@" in registry.split("/", 1)[0]:
            raise CacheInputError("registry must be REG/REPO, without credentials")
        if not isinstance(detail, str):
            raise CacheInputError("detail must be a string")
        self._update(
            "INSERT INTO publishes (key, registry, ok, detail, at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(key, registry) DO UPDATE SET ok = excluded.ok, detail = excluded.detail,"
            " at = excluded.at",
            (hexkey, registry, int(bool(ok)), detail[:2000], time.time()),
            "record a push in",
        )

    def publishes(self, registry: str | None = None) -> list[PublishRecord]:
        """The last push of each key (to ``registry``, or to any), newest first.

        Raises:
            IndexUnavailable: the index could not be read.
        """
        conn = self._ensure_schema()
        sql = "SELECT key, registry, ok, detail, at FROM publishes"
        args: tuple[Any, ...] = ()
        if registry is not None:
            sql, args = sql + " WHERE registry = ?", (registry,)
        try:
            rows = conn.execute(sql + " ORDER BY at DESC, key", args).fetchall()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "list pushes in") from exc
        return [PublishRecord(str(k), str(r), bool(ok), str(d), float(at)) for k, r, ok, d, at in rows]

    def remember_remote_parts(self, registry: str, key: ContentKey | str, parts: Mapping[str, str]) -> None:
        """Remember the key parts of ``key`` as published in ``registry`` (from its labels).

        Raises:
            CacheInputError, InvalidKeyParts: an argument is invalid.
            IndexUnavailable: the index could not be written.
        """
        hexkey = _key_hex(key)
        if not isinstance(registry, str) or not registry:
            raise CacheInputError("registry must be REG/REPO")
        clean = check_parts(dict(parts))
        self._update(
            "INSERT INTO remote_parts (registry, key, parts) VALUES (?, ?, ?)"
            " ON CONFLICT(registry, key) DO UPDATE SET parts = excluded.parts",
            (registry, hexkey, json.dumps(clean, sort_keys=True)),
            "remember a published key in",
        )

    def remote_parts(self, registry: str) -> dict[str, dict[str, str]]:
        """key -> parts of every key remembered for ``registry`` (see :meth:`remember_remote_parts`).

        Raises:
            IndexUnavailable: the index could not be read.
        """
        conn = self._ensure_schema()
        try:
            rows = conn.execute("SELECT key, parts FROM remote_parts WHERE registry = ?", (registry,)).fetchall()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read published keys in") from exc
        return {str(k): json.loads(p) for k, p in rows}

    # -- what builds resolved ------------------------------------------------------------------

    def record_packages(
        self, key: ContentKey | str, packages: Iterable[str], *, installer: str, layout: str = "venv",
        neighbour: str = "",
    ) -> PackageRecord:
        """Remember what the build of ``key`` resolved its requirements to (replacing any earlier record).

        Args:
            key: the content key built.
            packages: the resolution, one ``name==version`` (or ``name @ url``) line each.
            installer: what installed them, e.g. ``"uv 0.13.9"``.
            layout: ``"venv"`` or ``"conda"`` (where they were installed).
            neighbour: the key of the image a near miss started from, "" for a clean build.

        Raises:
            InvalidKey: ``key`` or ``neighbour`` is not a key.
            CacheInputError: ``packages`` or ``installer`` is invalid.
            IndexUnavailable: the index could not be written.
        """
        hexkey = _key_hex(key)
        near = _key_hex(neighbour) if neighbour else ""
        if isinstance(packages, (str, bytes)):
            raise CacheInputError("packages must be a list of lines", hint='e.g. ["numpy==2.1.0"]')
        lines = sorted({str(p).strip() for p in packages if str(p).strip()}, key=str.lower)
        if any("\n" in p or "\x00" in p for p in lines):
            raise CacheInputError("a package line holds a newline or NUL")
        if not isinstance(installer, str) or not installer.strip() or "\n" in installer:
            raise CacheInputError("installer must be a one-line name", hint='e.g. "uv 0.13.9"')
        if layout not in ("venv", "conda"):
            raise CacheInputError("layout must be 'venv' or 'conda'", hint=f"got {layout!r}")
        now = time.time()
        self._update(
            "INSERT INTO packages (key, installer, layout, packages, neighbour, recorded) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET installer = excluded.installer, layout = excluded.layout,"
            " packages = excluded.packages, neighbour = excluded.neighbour, recorded = excluded.recorded",
            (hexkey, installer.strip(), layout, json.dumps(lines), near, now),
            "record packages in",
        )
        return PackageRecord(hexkey, installer.strip(), layout, tuple(lines), near, now)

    def packages(self, key: ContentKey | str) -> PackageRecord | None:
        """What the build of ``key`` resolved (see :meth:`record_packages`), or None (a read).

        Raises:
            InvalidKey: ``key`` is not a key.
            IndexUnavailable: the index could not be read.
        """
        hexkey = _key_hex(key)
        try:
            row = self._conn().execute(
                "SELECT installer, layout, packages, neighbour, recorded FROM packages WHERE key = ?", (hexkey,)
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return None  # an index from before schema 5 (reads never migrate)
            raise _db.translate(exc, self._path_str, "read packages in") from exc
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read packages in") from exc
        if row is None:
            return None
        return PackageRecord(hexkey, str(row[0]), str(row[1]), tuple(json.loads(row[2])), str(row[3]), float(row[4]))

    # -- base-image resolutions ------------------------------------------------------------

    def resolution(self, ref: str, *, max_age: float) -> str | None:
        """The digest a base-image reference resolved to, if remembered within ``max_age``.

        Resolving a tag means asking an engine or a registry (milliseconds to seconds); keeping
        the answer for a bounded time keeps hits in microseconds while a moved tag is still
        noticed after ``max_age``. A read: stdlib sqlite3 only, nothing written.

        Args:
            ref: the image reference as written (``"dockyard/base:bookworm-python3"``).
            max_age: seconds an answer stays good.

        Returns:
            The digest, or None when never resolved or resolved too long ago.

        Raises:
            CacheInputError: ``ref`` or ``max_age`` is invalid.
            IndexUnavailable: the index cannot be read.
        """
        _check_ref(ref)
        _check_seconds("max_age", max_age, allow_none=False)
        conn = self._conn()
        try:
            row = conn.execute(
                "SELECT digest, resolved FROM resolutions WHERE ref = ?", (ref,)
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return None  # never remembered anything (or an index from before schema 2)
            raise _db.translate(exc, self._path_str, "read a resolution in") from exc
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read a resolution in") from exc
        if row is None or time.time() - row[1] > max_age:
            return None
        digest: str = row[0]
        return digest

    def remember_resolution(self, ref: str, digest: str) -> None:
        """Remember what a base-image reference resolved to, now.

        Args:
            ref: the image reference as written.
            digest: what it resolved to (``"sha256:<hex>"``: a manifest digest or an image id).

        Raises:
            CacheInputError: ``ref`` or ``digest`` is invalid.
            IndexUnavailable: the index could not be written.
        """
        _check_ref(ref)
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise CacheInputError(
                "digest must look like 'sha256:<hex>'", hint="pass the resolved digest or image id"
            )
        self._update(
            "INSERT INTO resolutions (ref, digest, resolved) VALUES (?, ?, ?)"
            " ON CONFLICT(ref) DO UPDATE SET digest = excluded.digest, resolved = excluded.resolved",
            (ref, digest, time.time()),
            "remember a resolution in",
        )

    def remember_key(self, source: str, fingerprint: str, key: ContentKey | str, refs: Mapping[str, str]) -> None:
        """Memoise that ``source`` with content ``fingerprint`` produced ``key``.

        ``refs`` are the base references the key depended on and the digests they resolved to;
        :func:`dockyard.cache.fast_hit` accepts the memo only while each of those resolutions is
        still fresh and unchanged, so a moved tag is noticed exactly as on the normal path.

        Args:
            source: what the key was computed from (e.g. an absolute spec path plus its context).
            fingerprint: a hash of everything the key was computed from.
            key: the content key.
            refs: base reference -> resolved digest.

        Raises:
            CacheInputError: an argument is invalid.
            IndexUnavailable: the index could not be written.
        """
        hexkey = _key_hex(key)
        for text, name in ((source, "source"), (fingerprint, "fingerprint")):
            if not isinstance(text, str) or not text:
                raise CacheInputError(f"{name} must be a non-empty string")
        for ref, digest in refs.items():
            _check_ref(ref)
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise CacheInputError("digest must look like 'sha256:<hex>'")
        refs_json = json.dumps(dict(refs), sort_keys=True)
        try:
            same = self._conn().execute(
                "SELECT 1 FROM memos WHERE source = ? AND fingerprint = ? AND key = ? AND refs = ?",
                (source, fingerprint, hexkey, refs_json),
            ).fetchone()
        except sqlite3.OperationalError:
            same = None  # no memos table yet: the write below migrates
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read a memo in") from exc
        if same is not None:
            return  # hits call this every time: a read, not a write transaction
        self._update(
            "INSERT INTO memos (source, fingerprint, key, refs, recorded) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(source) DO UPDATE SET fingerprint = excluded.fingerprint,"
            " key = excluded.key, refs = excluded.refs, recorded = excluded.recorded",
            (source, fingerprint, hexkey, refs_json, time.time()),
            "remember a key in",
        )

    def remembered_key(self, source: str) -> str | None:
        """The key :meth:`remember_key` last recorded for ``source``, if any (a read)."""
        try:
            row = self._conn().execute("SELECT key FROM memos WHERE source = ?", (source,)).fetchone()
        except sqlite3.OperationalError:
            return None  # an index from before memos
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read a memo in") from exc
        return str(row[0]) if row else None

    # -- single flight -----------------------------------------------------------------------

    def _lease_table(self) -> LeaseTable:
        # Made per use, not kept: a kept one would hold bound methods of self, a reference cycle
        # that delays __del__ (and so the flush of pending hits) until the cyclic collector runs.
        return LeaseTable(self._conn, self._ensure_schema, self._path_str, self._busy_timeout)

    @contextmanager
    def building(
        self,
        key: ContentKey | str,
        *,
        lease_timeout: float = 30.0,
        heartbeat: float | None = None,
        poll: float = 0.05,
        wait_timeout: float | None = None,
        on_wait: Callable[[str, int, float], None] | None = None,
    ) -> Iterator[BuildSlot]:
        """Build a key at most once across threads and processes.

        ``with cache.building(key) as slot:`` gives a hit (``slot.entry``, ``slot.must_build`` is
        False), or the build lease (``slot.must_build`` is True: build, then
        ``slot.record(image=..., image_id=..., ...)``). When another process holds the lease, it
        waits until that process records the entry (a hit) or gives the lease up or dies (then
        it takes the lease over: at once when the holder ran on this machine and its pid is gone,
        else once its heartbeat is ``lease_timeout`` old). If the body raises, or ends without
        ``record``, the lease is released and nothing is recorded; the exception propagates.

        Args:
            key: the content key.
            lease_timeout: seconds without a heartbeat after which this process's lease is
                stale and may be taken over.
            heartbeat: seconds between heartbeats (default ``lease_timeout / 3``).
            poll: seconds between checks while waiting for another builder.
            wait_timeout: give up waiting after this many seconds (None: wait as long as the
                holder keeps its lease alive).
            on_wait: called as ``on_wait(holder, holder_pid, waited)`` when this process starts
                waiting for another holder, when the holder changes, and every 5 seconds while it
                waits (``holder`` is the owner token ``host:pid:random``, ``waited`` seconds so
                far), e.g. to tell a user what it waits for. An exception it raises ends the wait
                and propagates (this process holds no lease then).

        Yields:
            The :class:`BuildSlot`.

        Raises:
            InvalidKey: ``key`` is not a key.
            CacheInputError: a timing argument is invalid, or on_wait is not callable.
            WaitTimeout: another process held the lease past ``wait_timeout``.
            IndexUnavailable: the index could not be read or written.
        """
        hexkey, parts = _key_and_parts(key)
        slot = acquire(
            self._lease_table(), self.lookup, hexkey, parts, lease_timeout=lease_timeout,
            heartbeat=heartbeat, poll=poll, wait_timeout=wait_timeout, on_wait=on_wait,
        )
        try:
            yield slot
        except BaseException:
            slot.release(quiet=True)  # the body's exception is the one worth seeing
            raise
        slot.release(quiet=False)

    def get_or_build(
        self,
        key: ContentKey | str,
        build: Callable[[ContentKey | str], BuildResult],
        **opts: Any,
    ) -> tuple[CacheEntry, bool]:
        """Return the entry for a key, calling ``build(key)`` exactly once across processes on a miss.

        Args:
            key: the content key.
            build: any callable returning a :class:`BuildResult`; it runs only in the process
                that holds the lease.
            **opts: passed on to :meth:`building` (``lease_timeout``, ``heartbeat``, ``poll``,
                ``wait_timeout``, ``on_wait``).

        Returns:
            ``(entry, built)``: ``built`` is True when this call ran ``build``.

        Raises:
            CacheInputError: ``build`` returned something other than a :class:`BuildResult`.
            WaitTimeout: another process held the lease past ``wait_timeout``.
            LeaseLost: this process stalled past its lease and another took the key over.
            IndexUnavailable: the index could not be read or written.
            Exception: whatever ``build`` raised (the lease is released first).
        """
        with self.building(key, **opts) as slot:
            if not slot.must_build:
                assert slot.entry is not None  # a hit always carries its entry
                return slot.entry, False
            result = build(key)
            if not isinstance(result, BuildResult):
                raise CacheInputError(
                    f"build() returned {type(result).__name__}, not a BuildResult",
                    hint="return BuildResult(image=..., image_id=..., size=..., builder=...)",
                )
            entry = slot.record(
                image=result.image, image_id=result.image_id, size=result.size,
                builder=result.builder,
            )
            return entry, True

    # -- garbage collection ------------------------------------------------------------------

    def gc(
        self,
        *,
        keep_bytes: int | None = None,
        keep_days: float | None = None,
        pinned: Iterable[ContentKey | str] = (),
        in_use: Iterable[ContentKey | str] = (),
        remove: Callable[[CacheEntry], None] | None = None,
        dry_run: bool = False,
    ) -> GcReport:
        """Remove least-recently-used entries.

        First every entry unused for more than ``keep_days``, then, while the total size is above
        ``keep_bytes``, the least recently used ones. Never removed: pinned entries (column or
        ``pinned``), keys in ``in_use``, keys with a live build lease. For each victim
        ``remove(entry)`` runs *before* its row is deleted (e.g. to delete the image); if it
        raises, the row is kept and the failure reported, and the next candidate is tried.

        Args:
            keep_bytes: target total size in bytes (None: no size limit).
            keep_days: drop entries unused for longer than this (None: no age limit).
            pinned: extra keys to keep.
            in_use: keys in use right now (running containers).
            remove: callback deleting what an entry stands for; None only edits the index.
            dry_run: report what would be removed, change nothing, call nothing.

        Returns:
            The :class:`GcReport`.

        Raises:
            CacheInputError: a limit is invalid.
            InvalidKey: a key in ``pinned`` or ``in_use`` is not a key.
            IndexUnavailable: the index could not be read or written.
        """
        if keep_bytes is not None and (
            isinstance(keep_bytes, bool) or not isinstance(keep_bytes, int) or keep_bytes < 0
        ):
            raise CacheInputError("keep_bytes must be an int >= 0 or None", hint="bytes to keep")
        _check_seconds("keep_days", keep_days)
        protected = {_key_hex(k) for k in pinned} | {_key_hex(k) for k in in_use}
        conn = self._ensure_schema()
        self._flush(quiet=False)
        now = time.time()
        try:
            lru = [
                entry_from_row(r)
                for r in conn.execute(
                    f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY last_used, created, key"
                )
            ]
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "list entries of") from exc
        leases = self._lease_table()
        protected |= leases.live(now)
        total = sum(e.size for e in lru)
        removed: list[CacheEntry] = []
        errors: list[GcFailure] = []
        tried: set[str] = set()

        def candidate(entry: CacheEntry) -> bool:
            return not entry.pinned and entry.key not in protected and entry.key not in tried

        def try_remove(entry: CacheEntry) -> bool:
            tried.add(entry.key)
            if dry_run:
                removed.append(entry)
                return True
            current = self._recheck(entry, leases)
            if current is None:
                return False
            if remove is not None:
                try:
                    remove(current)
                except Exception as exc:  # noqa: BLE001 - reported, and the row is kept
                    errors.append(GcFailure(entry.key, entry.image, f"{type(exc).__name__}: {exc}"))
                    return False
            self._update("DELETE FROM entries WHERE key = ?", (entry.key,), "remove from")
            removed.append(current)
            return True

        if keep_days is not None:
            cutoff = now - keep_days * 86400.0
            for entry in lru:
                if entry.last_used < cutoff and candidate(entry) and try_remove(entry):
                    total -= entry.size
        if keep_bytes is not None:
            for entry in lru:
                if total <= keep_bytes:
                    break
                if candidate(entry) and try_remove(entry):
                    total -= entry.size
        return GcReport(
            removed=tuple(removed),
            kept=len(lru) - len(removed),
            freed_bytes=sum(e.size for e in removed),
            remaining_bytes=total,
            errors=tuple(errors),
            dry_run=dry_run,
        )

    def _recheck(self, entry: CacheEntry, leases: LeaseTable) -> CacheEntry | None:
        """The entry as it is now, or None when it was used, pinned or leased since the snapshot.

        GC reads a snapshot, then removes images one by one (slowly); another process may have
        used an entry in between. A small window remains between this check and the delete.
        """
        conn = self._conn()
        try:
            row = conn.execute(_SELECT_ENTRY, (entry.key,)).fetchone()
            leased = leases.live(time.time())
        except sqlite3.Error as exc:
            raise _db.translate(exc, self._path_str, "read an entry of") from exc
        if row is None:
            return None
        current = entry_from_row(row)
        if current.pinned or current.key in leased or current.last_used > entry.last_used:
            return None
        return current
