"""``dockyard.gpu``: "which GPUs exist, who holds them, which set to give".

Discovery through NVML (or declared virtual GPUs), the pure placement and queue policy, and the
machine-wide leases. Imports only the SQLite base and the errors.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    "Gpu": "._discovery",
    "GpuDiscovery": "._discovery",
    "discover_gpus": "._discovery",
    "inventory": "._discovery",
    "check_fits": "._fit",
    "Lease": "._leases",
    "LeaseConflict": "._leases",
    "LeaseStore": "._leases",
    "Active": "._sched",
    "GpuRequest": "._sched",
    "Plan": "._sched",
    "Policy": "._sched",
    "Reservation": "._sched",
    "RunQueue": "._sched",
    "Topology": "._sched",
    "Waiting": "._sched",
    "place": "._sched",
    "placement_score": "._sched",
    "plan": "._sched",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._discovery import Gpu, GpuDiscovery, discover_gpus, inventory
    from ._fit import check_fits
    from ._leases import Lease, LeaseConflict, LeaseStore
    from ._sched import (
        Active,
        GpuRequest,
        Plan,
        Policy,
        Reservation,
        RunQueue,
        Topology,
        Waiting,
        place,
        placement_score,
        plan,
    )
