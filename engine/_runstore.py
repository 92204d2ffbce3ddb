"""The run store: runs, their metrics and compute targets in one SQLite file (WAL, safe across
processes). ``submit`` writes a ``Queued`` row and returns; the agent moves it along.

Status changes happen in one transaction each and only along allowed edges, so a crash leaves
every row in a true state: Queued → Running → Completed | Failed | Canceled (Queued → Failed or
Canceled too).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._sqlite import SqliteFile
from .errors import RunNotFound

__all__ = [
    "FINAL",
    "STATUSES",
    "ComputeRecord",
    "RunNotFound",
    "RunRecord",
    "RunStore",
    "new_run_id",
]

STATUSES = ("Queued", "Running", "Completed", "Failed", "Canceled")
FINAL = frozenset({"Completed", "Failed", "Canceled"})
_EDGES = {
    "Queued": {"Running", "Failed", "Canceled"},
    "Running": {"Completed", "Failed", "Canceled"},
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    status TEXT NOT NULL,
    script TEXT NOT NULL,
    arguments TEXT NOT NULL,          -- JSON list
    source_dir TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    environment TEXT NOT NULL,        -- JSON: the file form of the Environment (never a password)
    compute TEXT NOT NULL,
    docker INTEGER NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    gpus TEXT NOT NULL DEFAULT '[]',
    exit_code INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    container_id TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    metrics_offset INTEGER NOT NULL DEFAULT 0,
    run_dir TEXT NOT NULL,
    gpu_request TEXT NOT NULL DEFAULT '{}'   -- JSON: count, min_memory_mib, name_filter, priority, time_limit_s
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status, created);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    value TEXT NOT NULL,              -- JSON
    t REAL NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS computes (
    name TEXT PRIMARY KEY,
    max_nodes INTEGER NOT NULL,
    vm_size TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL
);
"""

_COLUMNS = (
    "id, experiment, status, script, arguments, source_dir, snapshot, environment, compute, docker, "
    "image, gpus, exit_code, reason, container_id, pid, created, started, ended, cancel_requested, "
    "metrics_offset, run_dir, gpu_request"
)


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it."""

    id: str
    experiment: str
    status: str
    script: str
    arguments: tuple[str, ...]
    source_dir: str
    snapshot: str
    environment: dict[str, Any]
    compute: str
    docker: bool
    image: str
    gpus: tuple[str, ...]
    exit_code: int | None
    reason: str
    container_id: str
    pid: int | None
    created: float
    started: float | None
    ended: float | None
    cancel_requested: bool
    metrics_offset: int
    run_dir: str
    gpu_request: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RunRecord:
        values = list(row)
        values[4] = tuple(json.loads(values[4]))
        values[7] = json.loads(values[7])
        values[9] = bool(values[9])
        values[11] = tuple(json.loads(values[11]))
        values[19] = bool(values[19])
        values[22] = json.loads(values[22] or "{}")
        return cls(*values)

    @property
    def gpu_count(self) -> int:
        return int(self.gpu_request.get("count", 0))

    @property
    def final(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True)
class ComputeRecord:
    name: str
    max_nodes: int
    vm_size: str = ""
    created: float = field(default=0.0)


def new_run_id(experiment: str) -> str:
    """Azure-style ids: ``<experiment>_<unix seconds>_<8 hex>``."""
    return f"{experiment}_{int(time.time())}_{uuid.uuid4().hex[:8]}"


class RunStore(SqliteFile):
    """The runs database of a workspace folder (``<folder>/runs.db``)."""

    schema = _SCHEMA
    what = "run store"

    def __init__(self, home: Path) -> None:
        super().__init__(Path(home) / "runs.db")
        self.home = Path(home)
        self.runs_dir = self.home / "runs"

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        if "gpu_request" not in columns:  # a store from before GPU requests
            conn.execute("ALTER TABLE runs ADD COLUMN gpu_request TEXT NOT NULL DEFAULT '{}'")

    # -- runs -------------------------------------------------------------------------------------

    def insert(self, record: RunRecord) -> None:
        """Write a new Queued run (one transaction: a run row is never half-written)."""
        values = (
            record.id, record.experiment, record.status, record.script, json.dumps(list(record.arguments)),
            record.source_dir, record.snapshot, json.dumps(record.environment), record.compute,
            int(record.docker), record.image, json.dumps(list(record.gpus)), record.exit_code, record.reason,
            record.container_id, record.pid, record.created, record.started, record.ended,
            int(record.cancel_requested), record.metrics_offset, record.run_dir, json.dumps(record.gpu_request),
        )
        with self._tx() as conn:
            conn.execute(f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join('?' * len(values))})", values)

    def get(self, run_id: str) -> RunRecord:
        """Raises: RunNotFound."""
        rows = self._read(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run with id {run_id!r}", hint="list runs with `dockyard runs ls`")
        return RunRecord.from_row(rows[0])

    def list(self, *, experiment: str | None = None, statuses: tuple[str, ...] = (), limit: int = 100) -> list[RunRecord]:
        sql = f"SELECT {_COLUMNS} FROM runs"
        where, args = [], []
        if experiment:
            where.append("experiment = ?")
            args.append(experiment)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += list(statuses)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        return [RunRecord.from_row(r) for r in self._read(sql, (*args, limit))]

    def queued(self) -> list[RunRecord]:
        """Queued runs, oldest first."""
        rows = self._read(f"SELECT {_COLUMNS} FROM runs WHERE status = 'Queued' ORDER BY created")
        return [RunRecord.from_row(r) for r in rows]

    def transition(self, run_id: str, to: str, **fields: Any) -> bool:
        """Move a run to status ``to`` (and set ``fields``) if that edge is allowed; False if not."""
        allowed_from = [s for s, targets in _EDGES.items() if to in targets]
        sets = ["status = ?"] + [f"{k} = ?" for k in fields]
        args = [to, *[json.dumps(list(v)) if k == "gpus" else v for k, v in fields.items()], run_id, *allowed_from]
        with self._tx() as conn:
            cur = conn.execute(
                f"UPDATE runs SET {', '.join(sets)} WHERE id = ? AND status IN ({', '.join('?' * len(allowed_from))})",
                tuple(args),
            )
            return cur.rowcount == 1

    def update(self, run_id: str, **fields: Any) -> None:
        """Set fields without a status change (container id, image, reason…)."""
        if not fields:
            return
        sets = ", ".join(f"{k} = ?" for k in fields)
        values = [json.dumps(list(v)) if k == "gpus" else v for k, v in fields.items()]
        with self._tx() as conn:
            conn.execute(f"UPDATE runs SET {sets} WHERE id = ?", (*values, run_id))

    def request_cancel(self, run_id: str) -> RunRecord:
        """Ask the agent to cancel; a queued run is canceled at once. Raises: RunNotFound."""
        record = self.get(run_id)
        if record.final:
            return record
        if record.status == "Queued" and self.transition(run_id, "Canceled", ended=time.time(), reason="canceled before it started"):
            return self.get(run_id)
        self.update(run_id, cancel_requested=1)
        return self.get(run_id)

    # -- metrics ----------------------------------------------------------------------------------

    def add_metrics(self, run_id: str, records: list[dict[str, Any]], new_offset: int) -> None:
        """Append metric records and move the file offset, in one transaction (never counted twice)."""
        with self._tx() as conn:
            (seq,) = conn.execute("SELECT COALESCE(MAX(seq), -1) FROM metrics WHERE run_id = ?", (run_id,)).fetchone()
            for i, rec in enumerate(records, start=seq + 1):
                conn.execute(
                    "INSERT INTO metrics (run_id, seq, name, kind, value, t) VALUES (?, ?, ?, ?, ?, ?)",
                    (run_id, i, str(rec.get("name", "")), str(rec.get("kind", "log")),
                     json.dumps(rec.get("value")), float(rec.get("t", time.time()))),
                )
            conn.execute("UPDATE runs SET metrics_offset = ? WHERE id = ?", (new_offset, run_id))

    def metrics(self, run_id: str) -> dict[str, list[Any]]:
        """name -> every value in order (``log_list`` extends, rows/tables append)."""
        out: dict[str, list[Any]] = {}
        for name, kind, value in self._read(
            "SELECT name, kind, value FROM metrics WHERE run_id = ? AND kind != 'tag' ORDER BY seq", (run_id,)
        ):
            parsed = json.loads(value)
            if kind == "log_list" and isinstance(parsed, list):
                out.setdefault(name, []).extend(parsed)
            else:
                out.setdefault(name, []).append(parsed)
        return out

    # -- compute targets --------------------------------------------------------------------------

    def put_compute(self, name: str, max_nodes: int, vm_size: str = "") -> ComputeRecord:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO computes (name, max_nodes, vm_size, created) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET max_nodes = excluded.max_nodes, vm_size = excluded.vm_size",
                (name, max_nodes, vm_size, time.time()),
            )
        return self.compute(name)  # type: ignore[return-value]

    def compute(self, name: str) -> ComputeRecord | None:
        rows = self._read("SELECT name, max_nodes, vm_size, created FROM computes WHERE name = ?", (name,))
        return ComputeRecord(*rows[0]) if rows else None

    def computes(self) -> list[ComputeRecord]:
        return [ComputeRecord(*r) for r in self._read("SELECT name, max_nodes, vm_size, created FROM computes ORDER BY name")]
