"""``dockyard.compute``: "which queued run starts where, now".

The machine-wide agent (one per dockyard home, serving every workspace under it) and the compute
backends it drives, chosen by each compute target's kind (``local``: this machine's engine and
GPUs). Backends write into the run store only through :class:`RunEvents`. May import every room
below it (build, runs, gpu, launch, dockerd); nothing but the facade and the CLI imports it.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    "AgentStatus": "._control",
    "agent_status": "._control",
    "ensure_agent": "._control",
    "stop_agent": "._control",
    "wake_agent": "._control",
    "Agent": "._agent",
    "AgentRun": "._backend",
    "ComputeBackend": "._backend",
    "RunEvents": "._backend",
    "backend_class": "._backend",
    "LocalBackend": "._local",
    "ClusterReport": "._ray",
    "RayBackend": "._ray",
    "check_cluster": "._ray",
    "LOCAL_COMPUTE": "._targets",
    "default_max_nodes": "._targets",
    "FrontDoor": "._frontdoor",
    "Reply": "._frontdoor",
    "Request": "._frontdoor",
    "GpuStatus": "._gpuview",
    "QueuedGpuRun": "._gpuview",
    "gpu_status": "._gpuview",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._agent import Agent
    from ._backend import AgentRun, ComputeBackend, RunEvents, backend_class
    from ._control import AgentStatus, agent_status, ensure_agent, stop_agent, wake_agent
    from ._frontdoor import FrontDoor, Reply, Request
    from ._gpuview import GpuStatus, QueuedGpuRun, gpu_status
    from ._local import LocalBackend
    from ._ray import ClusterReport, RayBackend, check_cluster
    from ._targets import LOCAL_COMPUTE, default_max_nodes
