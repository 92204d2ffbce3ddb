"""``dockyard doctor``: is every part dockyard needs present and healthy? Each failure names the fix."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from ._home import dockyard_home, index_path
from .dockerd import EngineClient
from .errors import DockyardError

__all__ = ["Check", "DoctorReport", "run_doctor"]


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


def _check_index(home: Path) -> Check:
    path = index_path(home)
    if not path.exists():
        parent = next((p for p in (home, *home.parents) if p.exists()), Path("/"))
        import os

        if not os.access(parent, os.W_OK):
            return Check("index", False, f"{path} cannot be created: {parent} is not writable; set DOCKYARD_HOME")
        return Check("index", True, f"{path} (not created yet; made on first use)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return Check("index", False, f"{path} cannot be read: {exc}; move it aside and it will be recreated")
    if verdict != "ok":
        return Check("index", False, f"{path} is damaged ({verdict}); move it aside and it will be recreated")
    return Check("index", True, f"{path} (healthy, {path.stat().st_size} bytes)")


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
            _check_index(home or dockyard_home()),
            _check_gpus(),
            _check_base_images(engine, engine_check.ok),
        )
    )
