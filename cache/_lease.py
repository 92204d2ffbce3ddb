"""Single-flight builds across processes: one lease row per key being built.

A lease is a row in ``leases`` taken in a ``BEGIN IMMEDIATE`` transaction, so exactly one process
wins. The holder refreshes ``heartbeat`` from a daemon thread; a lease whose heartbeat is older
than the holder's own ``timeout`` is stale (its process died or stalled) and the next process
deletes and replaces it in the same transaction. A holder on this machine (same host name and pid
namespace, told by its owner token) whose pid is gone is stale at once: nobody waits out the
timeout of a build that was killed. The holder records its entry and deletes its
lease in one transaction, so a waiter sees either the lease or the entry, never neither by
accident (except when the build failed, which is when it should build itself).

All SQL on ``leases`` lives here, in :class:`LeaseTable`; the index constructs one with its
connections and hands it to :func:`acquire`, and reads it for GC and statistics.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _db
from ._model import CacheEntry, check_parts, check_result_fields
from .errors import CacheError, CacheInputError, LeaseLost, WaitTimeout

__all__ = ["BuildSlot", "LeaseTable", "acquire", "new_owner"]

_SELECT_LEASE = "SELECT owner, pid, heartbeat, timeout FROM leases WHERE key = ?"


# Seconds between two ``on_wait`` calls while the same holder keeps building.
_WAIT_NOTE_EVERY = 5.0

_here: tuple[str, str] | None = None


def _this_machine() -> tuple[str, str]:
    """(host name, pid namespace id or "") of this process, looked up once."""
    global _here
    if _here is None:
        import socket  # only builders and waiters need it; keeps the read path's imports small

        try:
            # "pid:[4026531836]": processes share pids only inside one pid namespace (a container
            # on the host network has the host's name but its own pids).
            ns = os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]")
        except OSError:
            ns = ""  # no /proc: pids are never trusted, leases go stale by their heartbeat only
        _here = (socket.gethostname(), ns)
    return _here


def new_owner() -> str:
    """A lease owner token unique across hosts, processes and calls: ``host:pid:random``.

    ``random`` starts with the pid namespace's id (``<ns>-<hex>``), so that a waiter can tell
    whether the holder's pid means the same process to it.
    """
    host, ns = _this_machine()
    return f"{host}:{os.getpid()}:{ns}-{os.urandom(8).hex()}"


def _holder_is_here(owner: str) -> bool:
    """Whether the lease ``owner`` runs on this machine, where its pid can be checked."""
    host, ns = _this_machine()
    parts = owner.split(":", 2)
    return bool(ns) and len(parts) == 3 and parts[0] == host and parts[2].startswith(f"{ns}-")


def _pid_gone(pid: int) -> bool:
    """True only when no live process has ``pid`` (never for one merely owned by another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: it exists, under another user
        return False
    try:  # a zombie has exited: it will never beat again
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _holder_dead(owner: str, pid: int) -> bool:
    """The holder runs on this machine and its process is gone: its lease is stale now."""
    return _holder_is_here(owner) and _pid_gone(pid)


class LeaseTable:
    """The ``leases`` table of one index file: every statement the lease protocol runs.

    Args:
        conn: this thread's connection to the index (plain reads; the schema may be missing).
        writer: the same connection, with the schema created or migrated first.
        path: the index file, for error messages and the heartbeat's own connection.
        busy_timeout: seconds a statement waits for another process's write lock.

    Every ``sqlite3.Error`` is translated with :func:`_db.translate` before it leaves a method.
    """

    def __init__(
        self,
        conn: Callable[[], sqlite3.Connection],
        writer: Callable[[], sqlite3.Connection],
        path: str,
        busy_timeout: float,
    ) -> None:
        self._conn = conn
        self._writer = writer
        self.path = path
        self.busy_timeout = busy_timeout

    def try_take(self, hexkey: str, owner: str, timeout: float) -> tuple[bool, tuple[str, int] | None]:
        """Take the lease unless the entry exists or a live lease does (one transaction).

        Returns:
            ``(True, None)`` when taken; ``(False, None)`` when the entry exists;
            ``(False, (owner, pid))`` when someone else holds a live lease.

        Raises:
            IndexUnavailable: the index could not be written.
        """
        conn = self._writer()
        now = time.time()
        try:
            with _db.transaction(conn):
                if conn.execute("SELECT 1 FROM entries WHERE key = ?", (hexkey,)).fetchone():
                    return False, None
                row = conn.execute(_SELECT_LEASE, (hexkey,)).fetchone()
                if row is not None:
                    if now - row[2] <= row[3] and not _holder_dead(row[0], row[1]):
                        return False, (row[0], row[1])
                    # Stale: its holder died or stalled; replace it in this same transaction.
                    conn.execute("DELETE FROM leases WHERE key = ?", (hexkey,))
                conn.execute(
                    "INSERT INTO leases (key, owner, pid, acquired, heartbeat, timeout)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (hexkey, owner, os.getpid(), now, now, float(timeout)),
                )
                return True, None
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "take a build lease in") from exc

    def state(self, hexkey: str) -> tuple[str, int, bool] | None:
        """``(owner, pid, stale)`` of the lease on a key, or None (a plain read).

        Stale: no heartbeat within the holder's timeout, or a holder on this machine whose
        process is gone.
        """
        conn = self._conn()
        try:
            row = conn.execute(_SELECT_LEASE, (hexkey,)).fetchone()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "read a build lease in") from exc
        if row is None:
            return None
        return row[0], row[1], time.time() - row[2] > row[3] or _holder_dead(row[0], row[1])

    def record(
        self,
        hexkey: str,
        owner: str,
        *,
        image: str,
        image_id: str,
        size: int,
        parts: dict[str, str],
        builder: str,
    ) -> CacheEntry:
        """Write the entry and delete ``owner``'s lease in one transaction (fields validated).

        Raises:
            LeaseLost: ``owner`` no longer holds the lease; nothing was written.
            IndexUnavailable: the index could not be written.
        """
        conn = self._writer()
        try:
            with _db.transaction(conn):
                cur = conn.execute(
                    "DELETE FROM leases WHERE key = ? AND owner = ?", (hexkey, owner)
                )
                if cur.rowcount != 1:
                    holder = conn.execute(
                        "SELECT owner FROM leases WHERE key = ?", (hexkey,)
                    ).fetchone()
                    raise LeaseLost(hexkey, holder[0] if holder else None)
                return _db.upsert_entry(
                    conn, hexkey, image=image, image_id=image_id, size=size, parts=parts,
                    builder=builder,
                )
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "record an entry in") from exc

    def delete(self, hexkey: str, owner: str) -> None:
        """Delete ``owner``'s lease on a key, if it still holds it.

        Raises:
            IndexUnavailable: the index could not be written.
        """
        conn = self._writer()
        try:
            with _db.transaction(conn):
                conn.execute("DELETE FROM leases WHERE key = ? AND owner = ?", (hexkey, owner))
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "release a lease in") from exc

    def live(self, now: float) -> set[str]:
        """The keys whose lease is live at ``now`` (GC keeps them).

        Raises:
            IndexUnavailable: the index could not be read.
        """
        try:
            rows = self._conn().execute(
                "SELECT key FROM leases WHERE ? - heartbeat <= timeout", (now,)
            ).fetchall()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "read build leases in") from exc
        return {r[0] for r in rows}

    def count(self) -> int:
        """How many leases there are, live or stale (for statistics).

        Raises:
            IndexUnavailable: the index could not be read.
        """
        try:
            (n,) = self._conn().execute("SELECT count(*) FROM leases").fetchone()
        except sqlite3.Error as exc:
            raise _db.translate(exc, self.path, "read statistics of") from exc
        return int(n)

    def refresh(self, conn: sqlite3.Connection, hexkey: str, owner: str) -> bool:
        """Move ``owner``'s heartbeat to now on the heartbeat thread's own connection.

        Returns:
            False when ``owner`` no longer holds the lease.

        Raises:
            sqlite3.Error: left to the heartbeat, which retries at its next beat.
        """
        cur = conn.execute(
            "UPDATE leases SET heartbeat = ? WHERE key = ? AND owner = ?",
            (time.time(), hexkey, owner),
        )
        return cur.rowcount != 0


class _Heartbeat(threading.Thread):
    """Refreshes one lease until stopped; notices when the lease is no longer ours."""

    def __init__(self, leases: LeaseTable, key: str, owner: str, every: float) -> None:
        super().__init__(name=f"dockyard-cache-lease-{key[:8]}", daemon=True)
        self._leases = leases
        self._key = key
        self._owner = owner
        self._every = every
        self._stop_event = threading.Event()
        self.lost = False

    def run(self) -> None:
        try:
            conn = _db.connect(self._leases.path, self._leases.busy_timeout)
        except sqlite3.Error:
            return  # the lease then goes stale; record() will notice and say so
        try:
            while not self._stop_event.wait(self._every):
                try:
                    ours = self._leases.refresh(conn, self._key, self._owner)
                except sqlite3.Error:
                    continue  # a busy index is retried at the next beat, well before stale
                if not ours:
                    self.lost = True
                    return
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


class BuildSlot:
    """The outcome of entering :meth:`ImageCache.building`.

    Either the key is cached (``entry`` is set, ``must_build`` is False) or this process holds the
    build lease (``must_build`` is True) and must call :meth:`record` once it has built the image.

    Attributes:
        key: the content key (32 hex).
        entry: the cached entry, or None while this process must build.
        must_build: True when this process holds the lease.
        owner: this process's lease token (``host:pid:random``) when it holds the lease.
    """

    def __init__(
        self,
        leases: LeaseTable,
        key: str,
        parts: dict[str, str],
        *,
        entry: CacheEntry | None,
        owner: str | None = None,
        heartbeat: _Heartbeat | None = None,
    ) -> None:
        self._leases = leases
        self.key = key
        self._parts = parts
        self.entry = entry
        self.must_build = entry is None
        self.owner = owner
        self._heartbeat = heartbeat
        self._done = entry is not None

    def __repr__(self) -> str:
        return f"BuildSlot(key={self.key!r}, must_build={self.must_build})"

    @property
    def lease_lost(self) -> bool:
        """True when the heartbeat found the lease taken over by another process."""
        return self._heartbeat is not None and self._heartbeat.lost

    def record(
        self,
        *,
        image: str,
        image_id: str,
        size: int = 0,
        parts: dict[str, str] | None = None,
        builder: str = "",
    ) -> CacheEntry:
        """Record the built image and release the lease, in one transaction.

        Args:
            image: the image reference.
            image_id: the image id.
            size: bytes (0 when unknown).
            parts: part hashes; defaults to the key's own parts.
            builder: who built it.

        Returns:
            The recorded entry (also in ``slot.entry``).

        Raises:
            CacheInputError: this slot does not hold the lease, it was already recorded, or a
                field is invalid.
            LeaseLost: the lease was taken over meanwhile; nothing was recorded.
            IndexUnavailable: the index could not be written.
        """
        if not self.must_build or self._done:
            raise CacheInputError(
                f"nothing to record for {self.key}: "
                + ("it is recorded already" if self.must_build else "this slot is a cache hit"),
                hint="call record() once, and only when slot.must_build is True",
            )
        check_result_fields(image, image_id, size, builder)
        stored = check_parts(self._parts if parts is None else parts)
        entry = self._leases.record(
            self.key, self.owner or "", image=image, image_id=image_id, size=size, parts=stored,
            builder=builder,
        )
        self.entry = entry
        self._finish()
        return entry

    def _finish(self) -> None:
        self._done = True
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def release(self, *, quiet: bool) -> None:
        """Give the lease up without recording (the build failed or was abandoned).

        Args:
            quiet: swallow index errors (used while another exception propagates: an undeleted
                lease only goes stale).

        Raises:
            IndexUnavailable: the lease could not be deleted and ``quiet`` is False.
        """
        if self._done:
            return
        self._finish()
        try:
            self._leases.delete(self.key, self.owner or "")
        except CacheError:
            if not quiet:
                raise


def _check_positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise CacheInputError(f"{name} must be a number of seconds > 0", hint=f"got {value!r}")


def acquire(
    leases: LeaseTable,
    lookup: Callable[[str], CacheEntry | None],
    key: str,
    parts: dict[str, str],
    *,
    lease_timeout: float,
    heartbeat: float | None,
    poll: float,
    wait_timeout: float | None,
    on_wait: Callable[[str, int, float], None] | None = None,
) -> BuildSlot:
    """Return a hit, or take the lease, or wait for the holder (see ``ImageCache.building``).

    ``lookup`` is the index's read path (it counts the hit like any other). ``on_wait(holder,
    holder_pid, waited)`` is called when waiting starts, when the holder changes, and every
    ``_WAIT_NOTE_EVERY`` seconds while waiting.

    Raises:
        CacheInputError: a timing argument is invalid, or on_wait is not callable.
        WaitTimeout: another process held the lease for longer than ``wait_timeout``.
        IndexUnavailable: the index could not be read or written.
    """
    _check_positive("lease_timeout", lease_timeout)
    _check_positive("heartbeat", heartbeat, allow_none=True)
    _check_positive("poll", poll)
    if on_wait is not None and not callable(on_wait):
        raise CacheInputError("on_wait must be a callable or None", hint=f"got {on_wait!r}")
    if wait_timeout is not None and (
        isinstance(wait_timeout, bool) or not isinstance(wait_timeout, (int, float))
        or wait_timeout < 0
    ):
        raise CacheInputError("wait_timeout must be seconds >= 0 or None", hint="None waits forever")
    every = lease_timeout / 3 if heartbeat is None else heartbeat
    if every >= lease_timeout:
        raise CacheInputError(
            "heartbeat must be shorter than lease_timeout",
            hint="leave heartbeat=None for lease_timeout / 3",
        )
    entry = lookup(key)
    if entry is not None:
        return BuildSlot(leases, key, parts, entry=entry)
    owner = new_owner()
    started = time.monotonic()
    noted: str | None = None  # the holder the last on_wait call named
    next_note = started
    while True:
        taken, holder = leases.try_take(key, owner, lease_timeout)
        if taken:
            beat = _Heartbeat(leases, key, owner, every)
            beat.start()
            return BuildSlot(leases, key, parts, entry=None, owner=owner, heartbeat=beat)
        if holder is None:
            # The entry appeared between our lookup and the lease attempt.
            entry = lookup(key)
            if entry is not None:
                return BuildSlot(leases, key, parts, entry=entry)
            continue
        while True:
            waited = time.monotonic() - started
            if wait_timeout is not None and waited >= wait_timeout:
                raise WaitTimeout(key, holder=holder[0], holder_pid=holder[1], waited=waited)
            if on_wait is not None and (holder[0] != noted or started + waited >= next_note):
                on_wait(holder[0], holder[1], waited)  # its exception ends the wait: we hold nothing
                noted, next_note = holder[0], started + waited + _WAIT_NOTE_EVERY
            time.sleep(poll)
            # Plain reads while someone else builds: no write lock per poll.
            entry = lookup(key)
            if entry is not None:
                return BuildSlot(leases, key, parts, entry=entry)
            current = leases.state(key)
            if current is None or current[2]:  # vanished or stale: try to take it over
                break
            holder = (current[0], current[1])
