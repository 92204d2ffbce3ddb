"""``dockyard.launch``: "start this run in this image on *this node's* engine, follow it, stop it".

Two launchers behind one small interface (:class:`Launcher`: launch / poll / wait / stop /
remove), taking a typed :class:`LaunchSpec` and returning a :class:`LaunchHandle`. A launcher never
imports the run store or the compute backends: it reports through callbacks, so the same code
runs on any node of a cluster. Imports only ``dockyard.dockerd`` and the errors.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    "BindMount": "._types",
    "LaunchHandle": "._types",
    "LaunchSpec": "._types",
    "Launcher": "._types",
    "Observation": "._types",
    "ContainerLauncher": "._container",
    "container_name": "._container",
    "ProcessLauncher": "._process",
    "pid_alive": "._process",
    "RUN_ID_VARIABLE": "._process",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._container import ContainerLauncher, container_name
    from ._process import ProcessLauncher, pid_alive
    from ._types import Launcher, LaunchHandle, LaunchSpec, Observation
