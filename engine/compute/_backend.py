"""The compute-backend interface, and the one events object through which backends change runs.

The agent owns the loop (which runs are queued or running, in every workspace of the machine);
a backend, chosen by the kind of each run's compute target, decides which queued runs start where
and follows them to their true end. Backends never write the run store directly: they call
:class:`RunEvents`, so what can happen to a run is listed in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..errors import DockyardError, InputError
from ..runs import RunRecord, RunStatus

if TYPE_CHECKING:  # pragma: no cover
    from ..runs import ComputeRecord, RunStore

__all__ = ["AgentRun", "ComputeBackend", "RunEvents", "backend_class"]


@dataclass(frozen=True)
class AgentRun:
    """A run as the agent sees it: the workspace folder holding its truth, its row, its target."""

    workspace: Path
    record: RunRecord
    target: ComputeRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def key(self) -> tuple[str, str]:
        """Unique on the machine (run ids are unique within a workspace)."""
        return (str(self.workspace), self.record.id)


class RunEvents:
    """Everything a backend may record about a run, each as one store transaction.

    Args:
        store_of: the run store of a workspace folder (the agent keeps one per workspace).
        log: the agent's log.
    """

    def __init__(self, store_of: Callable[[Path], RunStore], log: Callable[[str], None]) -> None:
        self._store_of = store_of
        self.log = log

    def _store(self, run: AgentRun) -> RunStore:
        return self._store_of(run.workspace)

    def refresh(self, run: AgentRun) -> AgentRun:
        """The run as stored now. Raises: RunNotFound."""
        return AgentRun(run.workspace, self._store(run).get(run.id), run.target)

    def record(self, workspace: Path, run_id: str) -> RunRecord | None:
        """A run's stored row, or None when its workspace or row is gone (or damaged)."""
        try:
            return self._store_of(Path(workspace)).get(run_id)
        except DockyardError:
            return None

    def status(self, workspace: Path, run_id: str) -> RunStatus | None:
        """A run's stored status, or None when its workspace or row is gone."""
        try:
            return self._store_of(Path(workspace)).status_of(run_id)
        except DockyardError:
            return None

    def note(self, run: AgentRun, reason: str) -> None:
        """Why a queued run has not started, or what a running one waits for ("" clears it); shown by
        ``dockyard gpus`` and ``runs show``. Written only when it changes."""
        if run.record.reason != reason:
            self._store(run).update(run.id, reason=reason)

    def granted(self, run: AgentRun, gpus: Sequence[str]) -> None:
        self._store(run).update(run.id, gpus=list(gpus))

    def launched(self, run: AgentRun, *, container_id: str = "", pid: int | None = None, image: str = "") -> None:
        """The holder exists (recorded before it can do anything): from now on it is adoptable."""
        fields: dict[str, object] = {"image": image}
        if container_id:
            fields["container_id"] = container_id
        if pid is not None:
            fields["pid"] = pid
        self._store(run).update(run.id, **fields)

    def started(self, run: AgentRun) -> bool:
        return self._store(run).transition(run.id, RunStatus.RUNNING, started=time.time())

    def failed_to_start(self, run: AgentRun, reason: str) -> bool:
        return self._store(run).transition(run.id, RunStatus.FAILED, ended=time.time(), reason=reason)

    def canceled(self, run: AgentRun, reason: str = "canceled before it started") -> bool:
        return self._store(run).transition(run.id, RunStatus.CANCELED, ended=time.time(), reason=reason)

    def cancel_requested(self, run: AgentRun) -> bool:
        """Asked now, not when the backend last looked (one indexed read)."""
        try:
            return self._store(run).get(run.id).cancel_requested
        except DockyardError:
            return False

    def ingest_metrics(self, run: AgentRun) -> None:
        """Move new lines of the run's metrics file into the store (resumes at the stored offset)."""
        from .._runcontext import read_metric_lines

        path = run.record.folder.metrics
        if not path.exists():
            return
        offset = self._store(run).get(run.id).metrics_offset
        records, new_offset = read_metric_lines(path, offset)
        if records or new_offset != offset:
            self._store(run).add_metrics(run.id, records, new_offset)

    def finished(self, run: AgentRun, exit_code: int | None, reason: str = "") -> bool:
        """The run's true end: Completed, Failed (with the reason) or Canceled (if asked for)."""
        self.ingest_metrics(run)
        fresh = self._store(run).get(run.id)
        if fresh.cancel_requested:
            status, reason = RunStatus.CANCELED, reason or "canceled"
        elif exit_code == 0:
            status = RunStatus.COMPLETED
        else:
            status = RunStatus.FAILED
            reason = reason or f"the script exited with code {exit_code}"
        done = self._store(run).transition(run.id, status, ended=time.time(), exit_code=exit_code, reason=reason)
        if done:
            self.log(f"{run.id} {status} (exit code {exit_code})")
        return done


class ComputeBackend(Protocol):
    """Runs the runs of one kind of compute target. Implementations: ``local`` (this machine).

    Constructed by the agent as ``Backend(home=..., events=..., engine=...)``.
    """

    kind: ClassVar[str]

    def dispatch(self, queued: Sequence[AgentRun], running: Sequence[AgentRun]) -> None:
        """Start what may start now, among ``queued`` (every workspace, oldest first)."""
        ...

    def poll(self, run: AgentRun) -> None:
        """Follow a Running run: its metrics, a requested cancel, its true end."""
        ...

    def close(self) -> None:
        ...

    # Optional: ``idle()``, called on a pass in which the backend has no run (housekeeping).


# kind -> "module:class".
_BACKENDS = {"local": "dockyard.compute._local:LocalBackend", "ray": "dockyard.compute._ray:RayBackend"}


def backend_class(kind: str) -> type:
    """The backend class for a compute target kind.

    Raises:
        InputError: no backend serves that kind.
    """
    try:
        module, _, name = _BACKENDS[kind].partition(":")
    except KeyError:
        raise InputError(f"no compute backend runs targets of kind {kind!r}",
                         hint=f"known kinds: {', '.join(sorted(_BACKENDS))}") from None
    return getattr(import_module(module), name)
