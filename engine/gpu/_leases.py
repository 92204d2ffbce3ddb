"""GPU leases: which run holds which GPU, granted and released transactionally across processes.

One SQLite file per dockyard home (``gpus.db``, WAL), written by the machine's one agent for
every workspace, so a GPU is never leased twice on this machine. A lease's ``holder`` is the
workspace folder of its run (where the run's truth is kept). Every grant, release and reclaim is also appended to an
audit table, from which a test (or a person) can prove that no GPU was ever held by two runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .._sqlite import SqliteFile, sqlite3

__all__ = ["Lease", "LeaseConflict", "LeaseStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS leases (
    gpu TEXT PRIMARY KEY,           -- GPU UUID (never an index)
    run_id TEXT NOT NULL,
    holder TEXT NOT NULL,           -- the workspace folder of the run
    granted REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_run ON leases(run_id);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    event TEXT NOT NULL,            -- grant | hold | release | reclaim
    gpu TEXT NOT NULL,
    run_id TEXT NOT NULL,
    holder TEXT NOT NULL,
    ref TEXT NOT NULL DEFAULT ''    -- hold: what holds the devices ("container:<id>", "process:<pid>")
);
"""


class LeaseConflict(Exception):
    """Internal: a GPU asked for is already leased (the caller re-plans; never shown to users)."""


@dataclass(frozen=True)
class Lease:
    gpu: str
    run_id: str
    holder: str
    granted: float


class LeaseStore(SqliteFile):
    """The machine's GPU leases under a dockyard home (``<home>/gpus.db``)."""

    schema = _SCHEMA
    what = "GPU lease store"

    def __init__(self, home: Path) -> None:
        super().__init__(Path(home) / "gpus.db")

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        if "ref" not in {row[1] for row in conn.execute("PRAGMA table_info(audit)")}:
            conn.execute("ALTER TABLE audit ADD COLUMN ref TEXT NOT NULL DEFAULT ''")

    def leases(self) -> list[Lease]:
        return [Lease(*r) for r in self._read("SELECT gpu, run_id, holder, granted FROM leases ORDER BY gpu")]

    def held(self) -> dict[str, str]:
        """GPU UUID -> the run holding it."""
        return {lease.gpu: lease.run_id for lease in self.leases()}

    def grant(self, run_id: str, gpus: Iterable[str], holder: str) -> None:
        """Lease every GPU in ``gpus`` to ``run_id``, or none of them.

        Raises:
            LeaseConflict: one of them is leased already (another agent got there first).
        """
        wanted = list(gpus)
        if not wanted:
            return
        now = time.time()
        with self._tx() as conn:
            marks = ", ".join("?" * len(wanted))
            taken = conn.execute(f"SELECT gpu, run_id FROM leases WHERE gpu IN ({marks})", wanted).fetchall()
            if taken:
                raise LeaseConflict(f"already leased: {taken}")
            for gpu in wanted:
                conn.execute("INSERT INTO leases (gpu, run_id, holder, granted) VALUES (?, ?, ?, ?)", (gpu, run_id, holder, now))
                conn.execute("INSERT INTO audit (t, event, gpu, run_id, holder) VALUES (?, 'grant', ?, ?, ?)", (now, gpu, run_id, holder))

    def note_holder(self, run_id: str, ref: str) -> None:
        """Audit what holds ``run_id``'s GPUs (a container or process), once it exists."""
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute("SELECT gpu, holder FROM leases WHERE run_id = ?", (run_id,)).fetchall()
            for gpu, holder in rows:
                conn.execute("INSERT INTO audit (t, event, gpu, run_id, holder, ref) VALUES (?, 'hold', ?, ?, ?, ?)",
                             (now, gpu, run_id, holder, ref))

    def release(self, run_id: str, *, event: str = "release") -> list[str]:
        """Release every GPU ``run_id`` holds; returns them (idempotent)."""
        now = time.time()
        with self._tx() as conn:
            rows = conn.execute("SELECT gpu, holder FROM leases WHERE run_id = ?", (run_id,)).fetchall()
            conn.execute("DELETE FROM leases WHERE run_id = ?", (run_id,))
            for gpu, holder in rows:
                conn.execute("INSERT INTO audit (t, event, gpu, run_id, holder) VALUES (?, ?, ?, ?, ?)", (now, event, gpu, run_id, holder))
        return [gpu for gpu, _ in rows]

    def reclaim(self, still_holding: Callable[[Lease], bool]) -> list[str]:
        """Release the leases whose run no longer holds them (it ended, or crashed); returns the GPUs.

        ``still_holding`` is asked once per run (with one of its leases) and must answer from
        what holds the GPUs, not from the lease itself.
        """
        freed: list[str] = []
        by_run = {lease.run_id: lease for lease in self.leases()}
        for run_id in sorted(by_run):
            if not still_holding(by_run[run_id]):
                freed += self.release(run_id, event="reclaim")
        return freed

    def audit(self) -> list[tuple[float, str, str, str]]:
        """(t, event, gpu, run_id) in order."""
        return [tuple(r) for r in self._read("SELECT t, event, gpu, run_id FROM audit ORDER BY seq")]  # type: ignore[misc]

    def holders(self) -> list[tuple[float, str, str, str]]:
        """(t, gpu, run_id, ref) of every 'hold' event, in order: what held each GPU, and since when."""
        rows = self._read("SELECT t, gpu, run_id, ref FROM audit WHERE event = 'hold' ORDER BY seq")
        return [tuple(r) for r in rows]  # type: ignore[misc]
