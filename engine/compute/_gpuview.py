"""What ``dockyard gpus`` shows: every GPU with the run holding it, and the one machine-wide queue.

Holders come from the lease store (written under the lease transaction, released only when the
holder is gone); the queue is every workspace's queued GPU runs, in the order the agent plans them
(priority, then submit time), each with the reason the agent last recorded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .._home import workspace_folders
from ..gpu import GpuDiscovery, LeaseStore, inventory
from ..runs import RunStore

__all__ = ["GpuStatus", "QueuedGpuRun", "gpu_status"]


@dataclass(frozen=True)
class QueuedGpuRun:
    run: str
    workspace: str
    gpus: int
    priority: int
    reason: str


@dataclass(frozen=True)
class GpuStatus:
    """The machine's GPUs, who holds each (run id, or None), and the runs waiting for them."""

    discovery: GpuDiscovery
    holders: dict[str, str]  # GPU UUID -> run id
    queue: tuple[QueuedGpuRun, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name, "memory_mib": g.memory_mib,
                      "virtual": g.virtual, "holder": self.holders.get(g.uuid)} for g in self.discovery.gpus],
            "queue": [{"run": q.run, "gpus": q.gpus, "reason": q.reason, "workspace": q.workspace,
                       "priority": q.priority} for q in self.queue],
        }


def gpu_status(home: Path) -> GpuStatus:
    """Read the GPUs, their leases and every workspace's GPU queue under ``home``.

    Raises:
        InputError: a malformed ``DOCKYARD_GPUS`` or ``DOCKYARD_GPU_TOPOLOGY``.
    """
    found = inventory()
    leases = LeaseStore(Path(home))
    try:
        held = leases.held()
    finally:
        leases.close()
    waiting = []
    for folder in workspace_folders(Path(home)):
        store = RunStore(folder)
        try:
            for r in store.queued():
                if r.gpu_count:
                    priority = int(r.gpu_request.get("priority") or 0)
                    waiting.append(((-priority, r.created, r.id), QueuedGpuRun(
                        r.id, folder.name, r.gpu_count, priority, r.reason or "waiting for the agent")))
        finally:
            store.close()
    return GpuStatus(found, held, tuple(q for _, q in sorted(waiting, key=lambda pair: pair[0])))
