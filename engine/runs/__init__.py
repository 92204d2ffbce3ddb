"""``dockyard.runs``: "what is stored about a run".

The run store of a workspace (runs, metrics, compute targets in SQLite), content-addressed source
snapshots, and the run-folder layout. Imports only the SQLite base and the errors.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    "FINAL": "._store",
    "LOCAL_KIND": "._store",
    "ComputeRecord": "._store",
    "LauncherKind": "._store",
    "RunRecord": "._store",
    "RunStatus": "._store",
    "RunStore": "._store",
    "new_run_id": "._store",
    "Snapshot": "._snapshot",
    "SnapshotStore": "._snapshot",
    "CONTAINER_LIB": "._layout",
    "CONTAINER_META": "._layout",
    "CONTAINER_WORK": "._layout",
    "LOG_NAME": "._layout",
    "RunFolder": "._layout",
    "DATASETS_ROOT": "._runtime",
    "DEFAULT_SHM_BYTES": "._runtime",
    "RunMount": "._runtime",
    "RunRuntime": "._runtime",
    "Distribution": "._runtime",
    "Ulimit": "._runtime",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._layout import CONTAINER_LIB, CONTAINER_META, CONTAINER_WORK, LOG_NAME, RunFolder
    from ._runtime import DATASETS_ROOT, DEFAULT_SHM_BYTES, Distribution, RunMount, RunRuntime, Ulimit
    from ._snapshot import Snapshot, SnapshotStore
    from ._store import FINAL, LOCAL_KIND, ComputeRecord, LauncherKind, RunRecord, RunStatus, RunStore, new_run_id
