"""The launcher interface: what to start (a typed spec), what was started (a handle), how it is now.

A launcher starts one run on *this node* — a container on the node's Docker Engine, or a local
process — and answers questions about it. It never touches the run store: the caller hears of the
handle through ``on_created`` (before the run can have done anything, so the handle is recorded
first and a crash after it leaves an adoptable run, never an unknown one) and records the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

__all__ = ["BindMount", "LaunchHandle", "LaunchSpec", "Launcher", "Observation", "State"]

State = Literal["running", "exited", "gone", "unknown"]


@dataclass(frozen=True)
class BindMount:
    """A host folder seen inside a container (any characters in either path: it is not a bind string)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """One run to start.

    Paths in ``argv``, ``env``, ``workdir`` and ``log_path`` are as the command sees them (inside
    the container for a container). The command's stdout and stderr go, in order, to ``log_path``
    (appended), straight from the command: nothing depends on the launcher staying alive.

    Attributes:
        run_id: the run (containers are named ``dockyard-<run_id>`` and labelled with it).
        argv: the command: interpreter, script, arguments.
        env: the environment variables the command gets (a process gets them over the launcher's own).
        workdir: the working directory.
        log_path: where the output goes.
        image: the image to run (containers only).
        mounts: host folders bound into the container (containers only).
        labels: container labels, besides ``dockyard.run`` (containers only).
        device_ids: GPU UUIDs given through a Docker device request (real GPUs in containers only).
        exit_code_path: host file the process wrapper writes the exit code to (processes only).
        shm_size: bytes of ``/dev/shm`` (containers only; None: the engine's default).
        ulimits: ``(name, soft, hard)`` limits (containers only).
        ipc_mode: Docker's IPC mode (containers only; None: the engine's default).
        network_mode: Docker's network mode, e.g. ``host`` (containers only; None: the default bridge).
    """

    run_id: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    workdir: str
    log_path: str
    image: str | None = None
    mounts: tuple[BindMount, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    device_ids: tuple[str, ...] = ()
    exit_code_path: str | None = None
    shm_size: int | None = None
    ulimits: tuple[tuple[str, int, int], ...] = ()
    ipc_mode: str | None = None
    network_mode: str | None = None

    def __post_init__(self) -> None:
        if not self.run_id or not self.argv:
            raise ValueError("a launch spec needs a run id and a command")


@dataclass(frozen=True)
class LaunchHandle:
    """What identifies a started run to its launcher: a container id, or a process id, and the run
    (a process id alone may be reused: the launcher checks the process still belongs to the run)."""

    kind: Literal["container", "process"]
    ref: str
    run_id: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.ref[:12]}"


@dataclass(frozen=True)
class Observation:
    """How a launched run is now.

    ``running``; ``exited`` with its ``exit_code`` (``reason`` when not plainly the script's) and,
    when the holder says, the wall-clock time it ended (``finished_at``); ``gone`` (proven absent:
    removed, never started, a process that left no exit code); ``unknown`` (the holder cannot be
    asked right now, e.g. the engine is unreachable). Unknown is never taken for gone.
    """

    state: State
    exit_code: int | None = None
    reason: str = ""
    finished_at: float | None = None


class Launcher(Protocol):
    """Starts runs on this node and follows them. Implementations: containers, local processes."""

    kind: Literal["container", "process"]

    def launch(self, spec: LaunchSpec, *, on_created: Callable[[LaunchHandle], None]) -> LaunchHandle:
        """Start ``spec``; ``on_created`` gets the handle before the command runs (processes: as it starts).

        Raises:
            DockyardError: the run could not be started; nothing is left behind.
        """
        ...

    def poll(self, handle: LaunchHandle) -> Observation:
        """How the run is now (never raises for an unreachable holder: that is ``unknown``)."""
        ...

    def wait(self, handle: LaunchHandle) -> None:
        """Block until the run has exited or cannot be followed any more."""
        ...

    def stop(self, handle: LaunchHandle, grace_s: float = 5.0) -> None:
        """Ask the run to stop (SIGTERM), killing it after ``grace_s``."""
        ...

    def remove(self, handle: LaunchHandle) -> None:
        """Forget an exited run's leftovers (a container); idempotent."""
        ...

    def find(self, run_id: str) -> LaunchHandle | None:
        """The live holder of ``run_id`` started by any launcher of this kind (adoption after a crash)."""
        ...

    def live_runs(self) -> set[str] | None:
        """Every run id with a live holder of this kind on this node; None when that is unknown."""
        ...
