"""One small base for the engine's SQLite files (runs, GPU leases): WAL, explicit transactions,
``sqlite3.Error`` translated in one place, one connection per process (fork-safe)."""

from __future__ import annotations

# The C module itself: the `sqlite3` package adds only the datetime adapters, and importing them
# costs a CLI process (which opens one run store) several milliseconds. The API used is identical.
import _sqlite3 as sqlite3
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import EnvironmentProblem

__all__ = ["EMPTY_MARK", "SqliteFile", "sqlite3"]

#: ``<name>.was-empty-<unix time>``: a database found with 0 bytes, kept aside as evidence.
EMPTY_MARK = "was-empty-"
# How old a 0-byte file must be to have lost its content rather than be being made right now.
_FRESH_S = 10.0


class SqliteFile:
    """A SQLite file with a schema script (``CREATE … IF NOT EXISTS``) and an optional upgrade step."""

    schema: str = ""
    what: str = "database"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        # One connection per process, shared by the agent's threads: a transaction is not
        # re-entrant across threads, so each holds this lock for its whole statement or transaction.
        self._lock = threading.RLock()
        #: True when the file was already there with 0 bytes the first time it was opened: it was
        #: set aside (see :meth:`_set_aside_if_empty`) and made anew, so whatever it held is gone.
        #: Callers (the agent) log it; a file that was not there at all is new and leaves this False.
        self.was_empty = False

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Bring an older file up to date (after ``schema`` ran); nothing by default."""

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a forked child opens its own
            if not self._pid:  # the first open of this object, not a forked child's reopen
                self.was_empty = self._set_aside_if_empty()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")  # WAL: never corrupt, no fsync per commit
                conn.executescript(self.schema)
                self._upgrade(conn)
            except (sqlite3.Error, OSError) as exc:
                raise self._error(f"cannot open the {self.what} {self.path}: {exc}") from exc
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _set_aside_if_empty(self) -> bool:
        """A file that is there with 0 bytes (and no WAL holding its pages) lost whatever it held:
        keep it aside as ``<name>.was-empty-<unix time>`` — ``dockyard doctor`` reports it until it is
        deleted — and let the schema make a new one. Returns whether that happened."""
        try:
            found = self.path.stat()
        except OSError:  # not there yet (or unreadable: the open says so)
            return False
        # A file another process has just created is 0 bytes until its first write: not "emptied".
        if found.st_size != 0 or time.time() - found.st_mtime < _FRESH_S:
            return False
        wal = self.path.with_name(f"{self.path.name}-wal")
        if wal.exists() and wal.stat().st_size:
            return False  # its pages are all in the WAL still: not empty
        try:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.{EMPTY_MARK}{int(time.time())}"))
        except OSError:
            pass  # then it is only made anew in place; `was_empty` still says so
        return True

    def _error(self, message: str) -> EnvironmentProblem:
        return EnvironmentProblem(message, hint="check that DOCKYARD_HOME is writable and the file is not damaged")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: all or nothing, writers never deadlock."""
        with self._lock:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(f"the {self.what} {self.path} failed: {exc}") from exc

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._lock:
                return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise self._error(f"the {self.what} {self.path} failed: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

