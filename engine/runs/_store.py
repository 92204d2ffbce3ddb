"""The run store: runs, their metrics and compute targets of one workspace, in one SQLite file
(``<workspace folder>/runs.db``, WAL, safe across processes). ``submit`` writes a ``Queued`` row and
returns; the machine's agent moves it along.

Status changes happen in one transaction each and only along allowed edges, so a crash leaves
every row in a true state: Queued → Running → Completed | Failed | Canceled (Queued → Failed or
Canceled too).
"""

from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._sqlite import SqliteFile, sqlite3
from ..errors import EnvironmentProblem, InputError, RunNotFound
from ._layout import RunFolder

__all__ = [
    "FINAL",
    "LOCAL_KIND",
    "ComputeRecord",
    "LauncherKind",
    "RunRecord",
    "RunStatus",
    "RunStore",
    "new_run_id",
]


class RunStatus(enum.StrEnum):
    """A run's status, with Azure ML's spelling (a ``str``: compares and serialises as the text)."""

    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED})
_EDGES = {
    RunStatus.QUEUED: {RunStatus.RUNNING, RunStatus.FAILED, RunStatus.CANCELED},
    RunStatus.RUNNING: {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED},
}

#: Which launcher starts a run: a container in the environment's image, or a local process.
LauncherKind = Literal["container", "process"]
#: The kind of compute target that runs on this machine's engine and GPUs.
LOCAL_KIND = "local"

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
    gpu_request TEXT NOT NULL DEFAULT '{}',  -- JSON: count, min_memory_mib, name_filter, priority, time_limit_s
    launcher TEXT NOT NULL DEFAULT 'container',  -- container | process (``docker`` is its old spelling)
    runtime TEXT NOT NULL DEFAULT '{}',         -- JSON: mounts, shm_size, ulimits, ipc, variables, datasets
    tags TEXT NOT NULL DEFAULT '{}',            -- JSON: tags set at submit or from the host (in-run ones are metrics)
    properties TEXT NOT NULL DEFAULT '{}',      -- JSON: Azure's properties (added, never changed)
    display_name TEXT NOT NULL DEFAULT ''
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
CREATE TABLE IF NOT EXISTS environments (   -- the workspace's registered environments (Azure's names)
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    spec TEXT NOT NULL,               -- JSON: the file form (never a password)
    created REAL NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS computes (
    name TEXT PRIMARY KEY,
    max_nodes INTEGER NOT NULL,
    vm_size TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    kind TEXT NOT NULL DEFAULT 'local',     -- which compute backend runs its runs
    settings TEXT NOT NULL DEFAULT '{}'     -- JSON: the backend's (a cluster address; never a secret)
);
"""

_COLUMNS = (
    "id, experiment, status, script, arguments, source_dir, snapshot, environment, compute, launcher, "
    "image, gpus, exit_code, reason, container_id, pid, created, started, ended, cancel_requested, "
    "metrics_offset, run_dir, gpu_request, runtime, tags, properties, display_name"
)
_COMPUTE_COLUMNS = "name, max_nodes, vm_size, created, kind, settings"


@dataclass(frozen=True)
class RunRecord:
    """One run as the store holds it."""

    id: str
    experiment: str
    status: RunStatus
    script: str
    arguments: tuple[str, ...]
    source_dir: str
    snapshot: str
    environment: dict[str, Any]  # the file form of the Environment (never a password)
    compute: str
    launcher: LauncherKind
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
    runtime: dict[str, Any] = field(default_factory=dict)  # RunRuntime.to_dict(): mounts, shm, limits
    tags: dict[str, str] = field(default_factory=dict)  # set at submit or from the host
    properties: dict[str, str] = field(default_factory=dict)
    display_name: str = ""

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> RunRecord:
        values = list(row)
        values[2] = RunStatus(values[2])
        values[4] = tuple(json.loads(values[4]))
        values[7] = json.loads(values[7])
        values[11] = tuple(json.loads(values[11]))
        values[19] = bool(values[19])
        values[22] = json.loads(values[22] or "{}")
        values[23] = json.loads(values[23] or "{}")
        values[24] = json.loads(values[24] or "{}")
        values[25] = json.loads(values[25] or "{}")
        return cls(*values)

    @property
    def gpu_count(self) -> int:
        return int(self.gpu_request.get("count", 0))

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)


@dataclass(frozen=True)
class ComputeRecord:
    """A compute target: ``max_nodes`` runs of it execute at once, on the backend named by ``kind``."""

    name: str
    max_nodes: int
    vm_size: str = ""
    created: float = field(default=0.0)
    kind: str = LOCAL_KIND
    #: What the backend needs to reach the target (a Ray cluster's address, where its token is read
    #: from): references only, never a secret itself.
    settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.settings, str):  # the stored JSON column
            object.__setattr__(self, "settings", json.loads(self.settings or "{}"))

    def __hash__(self) -> int:
        return hash((self.name, self.kind))


def new_run_id(experiment: str) -> str:
    """Azure-style ids: ``<experiment>_<unix seconds>_<8 hex>``."""
    return f"{experiment}_{int(time.time())}_{uuid.uuid4().hex[:8]}"


class RunStore(SqliteFile):
    """The runs database of a workspace folder (``<folder>/runs.db``)."""

    schema = _SCHEMA
    what = "run store"

    def __init__(self, folder: Path) -> None:
        super().__init__(Path(folder) / "runs.db")
        self.folder = Path(folder)
        self.runs_dir = self.folder / "runs"
        #: What the last listing found damaged (one message per row), after containing it.
        self.damaged: list[str] = []

    def _records(self, rows: list[tuple[Any, ...]]) -> list[RunRecord]:
        """Rows as records; a damaged row fails its own run (with the damage as the reason) and is skipped."""
        found, damaged = [], []
        for row in rows:
            try:
                found.append(RunRecord.from_row(row))
            except (ValueError, TypeError, KeyError, IndexError) as exc:  # bad JSON, a bad status, a NULL
                damaged.append(self._contain(str(row[0]), exc))
        self.damaged = damaged
        return found

    def _contain(self, run_id: str, exc: Exception) -> str:
        what = f"its row in {self.path} is damaged ({type(exc).__name__}: {exc})"
        with self._tx() as conn:
            conn.execute(
                "UPDATE runs SET status = 'Failed', reason = ?, ended = COALESCE(ended, ?)"
                " WHERE id = ? AND status IN ('Queued', 'Running')",
                (f"{what}; it cannot be started or followed", time.time(), run_id),
            )
        return f"run {run_id}: {what}"

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        if "gpu_request" not in columns:  # a store from before GPU requests
            conn.execute("ALTER TABLE runs ADD COLUMN gpu_request TEXT NOT NULL DEFAULT '{}'")
        if "launcher" not in columns:  # a store from before launchers had names
            conn.execute("ALTER TABLE runs ADD COLUMN launcher TEXT NOT NULL DEFAULT 'container'")
            conn.execute("UPDATE runs SET launcher = 'process' WHERE docker = 0")
        if "runtime" not in columns:  # a store from before mounts and shared memory settings
            conn.execute("ALTER TABLE runs ADD COLUMN runtime TEXT NOT NULL DEFAULT '{}'")
        if "tags" not in columns:  # a store from before tags, properties and display names
            conn.execute("ALTER TABLE runs ADD COLUMN tags TEXT NOT NULL DEFAULT '{}'")
            conn.execute("ALTER TABLE runs ADD COLUMN properties TEXT NOT NULL DEFAULT '{}'")
            conn.execute("ALTER TABLE runs ADD COLUMN display_name TEXT NOT NULL DEFAULT ''")
        compute_columns = {row[1] for row in conn.execute("PRAGMA table_info(computes)")}
        if "kind" not in compute_columns:
            conn.execute("ALTER TABLE computes ADD COLUMN kind TEXT NOT NULL DEFAULT 'local'")
        if "settings" not in compute_columns:
            conn.execute("ALTER TABLE computes ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'")

    def folder_of(self, run_id: str) -> RunFolder:
        """Where a run of this workspace keeps its files."""
        return RunFolder(self.runs_dir / run_id)

    # -- runs -------------------------------------------------------------------------------------

    def insert(self, record: RunRecord) -> None:
        """Write a new Queued run (one transaction: a run row is never half-written)."""
        values = (
            record.id, record.experiment, str(record.status), record.script, json.dumps(list(record.arguments)),
            record.source_dir, record.snapshot, json.dumps(record.environment), record.compute,
            record.launcher, record.image, json.dumps(list(record.gpus)), record.exit_code, record.reason,
            record.container_id, record.pid, record.created, record.started, record.ended,
            int(record.cancel_requested), record.metrics_offset, record.run_dir, json.dumps(record.gpu_request),
            json.dumps(record.runtime), json.dumps(record.tags), json.dumps(record.properties), record.display_name,
            int(record.launcher == "container"),  # the old spelling, kept for stores read by older code
        )
        with self._tx() as conn:
            conn.execute(f"INSERT INTO runs ({_COLUMNS}, docker) VALUES ({', '.join('?' * len(values))})", values)

    def get(self, run_id: str) -> RunRecord:
        """Raises: RunNotFound."""
        rows = self._read(f"SELECT {_COLUMNS} FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run with id {run_id!r}", hint="list runs with `dockyard runs ls`")
        found = self._records(rows)
        if not found:
            raise EnvironmentProblem(self.damaged[0], hint=f"see `dockyard doctor`; the other runs of {self.folder.name} are unaffected")
        return found[0]

    def status_of(self, run_id: str) -> RunStatus:
        """Just the status: one indexed read of one column. Raises: RunNotFound."""
        rows = self._read("SELECT status FROM runs WHERE id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run with id {run_id!r}", hint="list runs with `dockyard runs ls`")
        try:
            return RunStatus(rows[0][0])
        except ValueError:
            return self.get(run_id).status  # contains the damage and says so

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to this file (cheap: no table read)."""
        return int(self._read("PRAGMA data_version")[0][0])

    def list(self, *, experiment: str | None = None, statuses: tuple[str, ...] = (), limit: int = 100) -> list[RunRecord]:
        sql = f"SELECT {_COLUMNS} FROM runs"
        where, args = [], []
        if experiment:
            where.append("experiment = ?")
            args.append(experiment)
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += [str(status) for status in statuses]
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC LIMIT ?"
        return self._records(self._read(sql, (*args, limit)))

    def queued(self) -> list[RunRecord]:
        """Queued runs, oldest first."""
        rows = self._read(f"SELECT {_COLUMNS} FROM runs WHERE status = 'Queued' ORDER BY created")
        return self._records(rows)

    def unfinished(self) -> list[RunRecord]:
        """Queued and Running runs, oldest first (what the agent works on)."""
        rows = self._read(f"SELECT {_COLUMNS} FROM runs WHERE status IN ('Queued', 'Running') ORDER BY created")
        return self._records(rows)

    def transition(self, run_id: str, to: RunStatus, **fields: Any) -> bool:
        """Move a run to status ``to`` (and set ``fields``) if that edge is allowed; False if not."""
        to = RunStatus(to)
        allowed_from = [str(s) for s, targets in _EDGES.items() if to in targets]
        sets = ["status = ?"] + [f"{k} = ?" for k in fields]
        args = [str(to), *[json.dumps(list(v)) if k == "gpus" else v for k, v in fields.items()], run_id, *allowed_from]
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

    def merge_json(self, run_id: str, column: str, values: dict[str, str], *, keep_existing: bool = False) -> None:
        """Add ``values`` to a run's ``tags`` or ``properties`` in one transaction (a concurrent
        writer's keys are never lost); with ``keep_existing`` a key already set keeps its value.

        Raises:
            RunNotFound: no such run.
        """
        if column not in ("tags", "properties"):
            raise ValueError(column)
        with self._tx() as conn:
            row = conn.execute(f"SELECT {column} FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise RunNotFound(f"no run with id {run_id!r}", hint="list runs with `dockyard runs ls`")
            current = json.loads(row[0] or "{}")
            merged = {**values, **current} if keep_existing else {**current, **values}
            conn.execute(f"UPDATE runs SET {column} = ? WHERE id = ?", (json.dumps(merged), run_id))

    def tags_logged(self, run_id: str) -> dict[str, str]:
        """Tags the run's script set (``run.tag`` inside the run), in order: the last value wins."""
        out: dict[str, str] = {}
        for name, value in self._read(
            "SELECT name, value FROM metrics WHERE run_id = ? AND kind = 'tag' ORDER BY seq", (run_id,)
        ):
            out[str(name)] = json.loads(value)
        return out

    def experiments(self) -> list[str]:
        """Every experiment name that has a run, sorted."""
        return [str(r[0]) for r in self._read("SELECT DISTINCT experiment FROM runs ORDER BY experiment")]

    def remove(self, run_id: str) -> RunRecord:
        """Forget a finished run: its row and metrics (one transaction), then its folder.

        Raises:
            RunNotFound: no such run.
            InputError: the run has not finished (cancel it first).
        """
        import shutil

        record = self.get(run_id)
        if not record.final:
            raise InputError(f"run {run_id} is {record.status}: only finished runs are removed",
                             hint=f"cancel it first: dockyard runs cancel {run_id}")
        with self._tx() as conn:
            conn.execute("DELETE FROM metrics WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE id = ? AND status IN ('Completed', 'Failed', 'Canceled')", (run_id,))
        shutil.rmtree(self.folder_of(run_id).root, ignore_errors=True)
        return record

    def snapshot_ids(self) -> set[str]:
        """The snapshots this workspace's runs name (what snapshot GC must keep)."""
        return {str(r[0]) for r in self._read("SELECT DISTINCT snapshot FROM runs")}

    def request_cancel(self, run_id: str) -> RunRecord:
        """Ask the agent to cancel; a queued run is canceled at once. Raises: RunNotFound."""
        record = self.get(run_id)
        if record.final:
            return record
        if record.status == RunStatus.QUEUED and self.transition(
            run_id, RunStatus.CANCELED, ended=time.time(), reason="canceled before it started"
        ):
            return self.get(run_id)
        self.update(run_id, cancel_requested=1)
        return self.get(run_id)

    # -- registered environments --------------------------------------------------------------------

    def register_environment(self, name: str, spec: dict[str, Any]) -> tuple[int, bool]:
        """Record ``spec`` as the next version of ``name`` unless it equals the latest one.

        Returns:
            (its version, whether it is new). One transaction: two processes registering at once get
            consecutive versions, never the same one.
        """
        canonical = json.dumps(spec, sort_keys=True)
        with self._tx() as conn:
            latest = conn.execute(
                "SELECT version, spec FROM environments WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
            ).fetchone()
            if latest is not None and json.dumps(json.loads(latest[1]), sort_keys=True) == canonical:
                return int(latest[0]), False
            version = int(latest[0]) + 1 if latest is not None else 1
            conn.execute("INSERT INTO environments (name, version, spec, created) VALUES (?, ?, ?, ?)",
                         (name, version, canonical, time.time()))
            return version, True

    def environment(self, name: str, version: int | None = None) -> tuple[int, dict[str, Any], float] | None:
        """(version, spec, created) of ``name`` (the latest unless ``version``), or None."""
        if version is None:
            rows = self._read("SELECT version, spec, created FROM environments WHERE name = ? "
                              "ORDER BY version DESC LIMIT 1", (name,))
        else:
            rows = self._read("SELECT version, spec, created FROM environments WHERE name = ? AND version = ?",
                              (name, int(version)))
        return (int(rows[0][0]), json.loads(rows[0][1]), float(rows[0][2])) if rows else None

    def environment_versions(self) -> list[tuple[str, int, dict[str, Any], float]]:
        """Every registered (name, version, spec, created), by name then version."""
        return [(str(n), int(v), json.loads(spec), float(t)) for n, v, spec, t in
                self._read("SELECT name, version, spec, created FROM environments ORDER BY name, version")]

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

    def put_compute(self, name: str, max_nodes: int, vm_size: str = "", kind: str = LOCAL_KIND,
                    settings: dict[str, str] | None = None) -> ComputeRecord:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO computes (name, max_nodes, vm_size, created, kind, settings) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET max_nodes = excluded.max_nodes, vm_size = excluded.vm_size,"
                " kind = excluded.kind, settings = excluded.settings",
                (name, max_nodes, vm_size, time.time(), kind, json.dumps(settings or {}, sort_keys=True)),
            )
        return self.compute(name)  # type: ignore[return-value]

    def compute(self, name: str) -> ComputeRecord | None:
        rows = self._read(f"SELECT {_COMPUTE_COLUMNS} FROM computes WHERE name = ?", (name,))
        return ComputeRecord(*rows[0]) if rows else None

    def computes(self) -> list[ComputeRecord]:
        return [ComputeRecord(*r) for r in self._read(f"SELECT {_COMPUTE_COLUMNS} FROM computes ORDER BY name")]
