"""``dockyard.core``: Azure ML SDK v1's ``azureml.core`` names, so porting is one word in the imports.

Imported lazily: a training script's ``from dockyard.core import Run`` loads only the standard
library, inside any image.
"""

from dockyard._lazy import lazy_exports

_EXPORTS = {
    "Workspace": "dockyard._workflow",
    "Experiment": "dockyard._workflow",
    "ScriptRunConfig": "dockyard._workflow",
    "ComputeTarget": "dockyard._workflow",
    "Environment": "dockyard._environment",
    "Run": "dockyard._run",
    "Dataset": "dockyard._data",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
