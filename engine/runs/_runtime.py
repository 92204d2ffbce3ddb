"""How a run's container is set up beyond its image: mounted data, shared memory, limits.

Stored with the run (its ``runtime`` column) as already-checked values: the submit validated every
path and argument (``dockyard._runtime``), and the launcher applies them as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DATASETS_ROOT", "DEFAULT_SHM_BYTES", "Distribution", "RunMount", "RunRuntime", "Ulimit"]

#: Where datasets appear inside a container: ``<root>/<dataset name>``.
DATASETS_ROOT = "/mnt/dockyard/datasets"
#: Azure ML's default for ``shm_size``: PyTorch's DataLoader workers share tensors through /dev/shm,
#: and Docker's own 64 MB kills them (SIGBUS, exit 135).
DEFAULT_SHM_BYTES = 2 << 30


@dataclass(frozen=True)
class RunMount:
    """A host path seen inside the run's container at ``target`` (read-only unless said otherwise)."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Ulimit:
    name: str
    soft: int
    hard: int


@dataclass(frozen=True)
class Distribution:
    """A distributed run (Azure ML's ``PyTorchConfiguration`` / ``MpiConfiguration``): ``nodes``
    containers, one per node, each starting ``per_node`` processes; ``kind`` is ``pytorch`` or ``mpi``."""

    kind: str
    nodes: int
    per_node: int = 1
    backend: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.per_node

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "nodes": self.nodes, "per_node": self.per_node, "backend": self.backend}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Distribution:
        return cls(str(data["kind"]), int(data["nodes"]), int(data.get("per_node") or 1), str(data.get("backend") or ""))


@dataclass(frozen=True)
class RunRuntime:
    """Mounts, shared memory size, ulimits, IPC mode, extra variables, and the datasets by name
    (name -> the path the script reads them at)."""

    mounts: tuple[RunMount, ...] = ()
    shm_size: int | None = None
    ulimits: tuple[Ulimit, ...] = ()
    ipc: str | None = None
    variables: Mapping[str, str] = field(default_factory=dict)
    datasets: Mapping[str, str] = field(default_factory=dict)
    #: The shared image cache the run's build uses: (``REG/REPO`` or ``""`` for none, username,
    #: name of the password's variable); None for runs from before (the agent's own setting).
    shared_cache: tuple[str, str, str] | None = None
    #: How a distributed run spans nodes; None for a run of one container.
    distributed: Distribution | None = None

    def with_shared_cache(self, registry: str, username: str, password_env: str) -> RunRuntime:
        from dataclasses import replace

        return replace(self, shared_cache=(registry, username, password_env))

    def to_dict(self) -> dict[str, Any]:
        shared = {} if self.shared_cache is None else {"shared_cache": dict(zip(
            ("registry", "username", "password_env"), self.shared_cache, strict=True))}
        if self.distributed is not None:
            shared = {**shared, "distributed": self.distributed.to_dict()}
        return {**shared,
            "mounts": [{"source": m.source, "target": m.target, "read_only": m.read_only} for m in self.mounts],
            "shm_size": self.shm_size,
            "ulimits": [{"name": u.name, "soft": u.soft, "hard": u.hard} for u in self.ulimits],
            "ipc": self.ipc,
            "variables": dict(self.variables),
            "datasets": dict(self.datasets),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunRuntime:
        """The stored form (``{}`` for runs from before runtimes: Docker's defaults)."""
        data = data or {}
        shared = data.get("shared_cache")
        distributed = data.get("distributed")
        return cls(
            distributed=Distribution.from_dict(distributed) if isinstance(distributed, dict) else None,
            shared_cache=(str(shared.get("registry") or ""), str(shared.get("username") or ""),
                          str(shared.get("password_env") or "")) if isinstance(shared, dict) else None,
            mounts=tuple(RunMount(str(m["source"]), str(m["target"]), bool(m.get("read_only", True)))
                         for m in data.get("mounts") or ()),
            shm_size=int(data["shm_size"]) if data.get("shm_size") is not None else None,
            ulimits=tuple(Ulimit(str(u["name"]), int(u["soft"]), int(u["hard"])) for u in data.get("ulimits") or ()),
            ipc=str(data["ipc"]) if data.get("ipc") else None,
            variables={str(k): str(v) for k, v in (data.get("variables") or {}).items()},
            datasets={str(k): str(v) for k, v in (data.get("datasets") or {}).items()},
        )
