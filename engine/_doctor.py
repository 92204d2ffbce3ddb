"""``dockyard doctor``: is every part dockyard needs present and healthy? Each failure names the fix."""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ._home import WORKSPACES, dockyard_home, index_path, workspace_folders
from ._sqlite import EMPTY_MARK
from .dockerd import EngineClient
from .errors import DockyardError

__all__ = ["Check", "DoctorReport", "check_compute", "run_doctor"]


@dataclass(frozen=True)
class Check:
    """One check: ``required`` checks decide the overall verdict; the others only inform."""

    name: str
    ok: bool
    detail: str
    required: bool = True

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "required": self.required}


@dataclass(frozen=True)
class DoctorReport:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks if c.required)

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}


def _check_engine(engine: EngineClient) -> Check:
    try:
        info = engine.info()
    except DockyardError as exc:
        return Check("engine", False, str(exc))
    return Check(
        "engine",
        True,
        f"Docker Engine {info.version} (API {info.api_version}, {info.os}/{info.arch}) at {engine.url}",
    )


def _check_buildkit(engine: EngineClient, engine_ok: bool) -> Check:
    if not engine_ok:
        return Check("buildkit", False, "not checked: the engine is unreachable (fix the engine first)")
    try:
        from .build import BuildKitClient  # imports grpc: only when the engine is up

        with BuildKitClient("docker", engine=engine) as client:
            workers = client.list_workers()
    except DockyardError as exc:
        return Check("buildkit", False, str(exc))
    if not workers:
        return Check("buildkit", False, "BuildKit answered but lists no workers; restart dockerd")
    listed = "; ".join(f"{w.id} ({', '.join(w.platforms)})" for w in workers)
    return Check("buildkit", True, f"{len(workers)} worker(s) over gRPC: {listed}")


#: How long doctor waits for a database another process holds locked, and the most it spends
#: checking one: a busy or huge file is reported as such, never a stalled doctor.
BUSY_TIMEOUT_S = 1.0
CHECK_DEADLINE_S = 30.0


@dataclass(frozen=True)
class _Database:
    name: str  # the check's name
    path: Path
    holds: str  # what is kept in it, in a user's words
    lost: str  # what moving it aside loses, and how dockyard recovers


def _databases(home: Path) -> list[_Database]:
    """Every SQLite file dockyard keeps in ``home``: the index, the GPU leases, each workspace's runs."""
    found = [
        _Database("index", index_path(home), "the image index",
                  "dockyard starts a new index, filled again as images are built again"),
        _Database("gpu-leases", home / "gpus.db", "the GPU lease records",
                  "a new one is made on first use without the lease records "
                  "(the agent re-derives which run holds each GPU from the engine)"),
    ]
    for folder in workspace_folders(home):
        found.append(_Database(
            f"runs:{folder.name}", folder / "runs.db", f"the run history of workspace {folder.name!r}",
            f"a new one is made on first use without the run history of workspace {folder.name!r} "
            f"(runs, statuses, metrics; the run folders in {folder / 'runs'} stay)",
        ))
    return found


def _check_database(db: _Database) -> Check:
    """``PRAGMA quick_check`` on a read-only connection: it never writes, never waits long, never raises.

    A database found empty and made anew (its 0-byte file kept aside beside it) is a warning
    until that file is deleted, whatever the new one's health.
    """
    checked = _quick_check(db)
    try:
        marks = sorted(db.path.parent.glob(f"{db.path.name}.{EMPTY_MARK}*"))
    except OSError:
        marks = []
    if not marks or not checked.ok:
        return checked
    when = marks[-1].name.rsplit("-", 1)[-1]
    found = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(when))) if when.isdigit() else "once"
    return Check(db.name, False, f"{db.path} was found empty (0 bytes) on {found} and made anew, so whatever it "
                 f"held ({db.holds}) is gone; delete {marks[-1]} once you have read this", required=False)


def _quick_check(db: _Database) -> Check:
    path = db.path
    move_aside = (f"stop the agent (`dockyard agent stop`), then move {path.name} aside together with "
                  f"any {path.name}-wal and {path.name}-shm beside it; {db.lost}")
    try:
        if not path.exists():
            parent = next((p for p in path.parents if p.exists()), Path("/"))
            if not os.access(parent, os.W_OK):
                return Check(db.name, False, f"{path} cannot be created: {parent} is not writable; set DOCKYARD_HOME")
            return Check(db.name, True, f"{path} (not created yet; made on first use)")
        if not path.is_file():
            return Check(db.name, False, f"{path} is not a file; {move_aside}")
        size = path.stat().st_size
        wal = path.with_name(f"{path.name}-wal")
        if size == 0 and not (wal.exists() and wal.stat().st_size):  # (its WAL alone may still hold it all)
            return Check(db.name, False, f"{path} is empty (0 bytes), so whatever it held ({db.holds}) is gone; "
                         "dockyard will recreate it on first use", required=False)
    except OSError as exc:
        return Check(db.name, False, f"{path} cannot be read ({exc}); check its owner and permissions")
    deadline = time.monotonic() + CHECK_DEADLINE_S
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)  # True interrupts it
            verdict = [str(row[0]).replace("\n", " ") for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF  # the primary code of an extended one
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return Check(db.name, False, f"{path} is busy: another process kept it locked for over "
                         f"{BUSY_TIMEOUT_S:g} s, so it was not checked; run doctor again", required=False)
        if code == sqlite3.SQLITE_INTERRUPT:
            return Check(db.name, False, f"{path} ({size} bytes) was not checked: the check took over "
                         f"{CHECK_DEADLINE_S:g} s", required=False)
        if code in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_AUTH):
            return Check(db.name, False, f"{path} cannot be opened ({exc}); check that you can read and write "
                         "it and its folder (owner, permissions), or set DOCKYARD_HOME")
        return Check(db.name, False, f"{path} is damaged ({exc}); {move_aside}")
    if verdict != ["ok"]:
        more = f", and {len(verdict) - 1} more problem(s)" if len(verdict) > 1 else ""
        return Check(db.name, False, f"{path} is damaged ({verdict[0] if verdict else 'no verdict'}{more}); "
                     f"{move_aside}")
    return Check(db.name, True, f"{path} (healthy, {size} bytes)")


def _check_databases(home: Path) -> list[Check]:
    checks = [_check_database(db) for db in _databases(home)]
    if not any(c.name.startswith("runs:") for c in checks):
        checks.append(Check("runs", True, f"{home / WORKSPACES} (no run store yet; the first run makes one)"))
    return checks


def _check_gpus() -> Check:
    from .gpu import discover_gpus

    found = discover_gpus()
    if not found.gpus:
        return Check("gpus", True, f"none ({found.reason})", required=False)
    names = ", ".join(f"{g.index}: {g.name} {g.memory_mib} MiB {g.uuid}" for g in found.gpus)
    return Check("gpus", True, f"{len(found.gpus)} via NVML, driver {found.driver}: {names}", required=False)


def _check_base_images(engine: EngineClient, engine_ok: bool) -> Check:
    if not engine_ok:
        return Check("base-images", False, "not checked: the engine is unreachable")
    from .build import list_base_images

    try:
        images = list_base_images(engine)
    except DockyardError as exc:
        return Check("base-images", False, str(exc))
    if not images:
        return Check(
            "base-images", False, "none; make them with `dockyard base bootstrap` (and --flavor busybox)"
        )
    return Check("base-images", True, ", ".join(i.ref for i in images))


def run_doctor(engine: EngineClient | None = None, home: Path | None = None) -> DoctorReport:
    """Run every check. Never raises for a missing part: the report says what is missing.

    Raises:
        InputError: ``DOCKER_HOST`` cannot be parsed.
    """
    engine = engine or EngineClient.from_env()
    engine_check = _check_engine(engine)
    return DoctorReport(
        (
            engine_check,
            _check_buildkit(engine, engine_check.ok),
            *_check_databases(home or dockyard_home()),
            _check_gpus(),
            _check_base_images(engine, engine_check.ok),
        )
    )


def check_compute(settings: dict[str, str], name: str) -> tuple[Check, ...]:
    """``dockyard doctor --compute NAME`` for a cluster target: reachable (with its token), and per
    node: dockyard of this machine's code, a Docker Engine, its BuildKit, its GPUs. A cluster that
    accepts requests without a token is a warning: anyone who reaches its ports runs code there."""
    from .compute import check_cluster

    address = settings.get("address", "")
    try:
        report = check_cluster(settings)
    except DockyardError as exc:
        return (Check(f"compute {name}", False, f"{exc.message}" + (f" ({exc.hint})" if exc.hint else "")),)
    checks = [Check(f"compute {name}", True, f"Ray cluster at {address}: {len(report.nodes)} node(s) alive")]
    problems = report.problems()
    for node in report.nodes:
        where = report.node_name(node)
        mine = [p for p in problems if p.startswith(where)]
        gpus = node.get("gpus") or []
        detail = "; ".join(mine) if mine else (
            f"dockyard {node.get('dockyard')}, engine {node.get('engine')}, BuildKit {node.get('buildkit')}, "
            f"{len(gpus)} GPU(s){' (virtual)' if node.get('gpus_virtual') else ''}, Ray sees {node.get('gpus_ray')}")
        checks.append(Check(f"  {where}", not mine, detail))
    if report.unauthenticated:
        checks.append(Check("  authentication", False, "the cluster accepts requests without a token: anyone who "
                            "reaches its ports runs code there (start it with RAY_AUTH_MODE=token and attach "
                            "with --token-file)", required=False))
    return tuple(checks)
