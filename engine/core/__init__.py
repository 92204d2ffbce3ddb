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
_lazy_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name):  # type: ignore[no-untyped-def]
    try:
        return _lazy_getattr(name)
    except AttributeError:
        # An Azure ML name dockyard does not have (Model, Datastore, …): one clear error naming the
        # local way. Imported only then: the in-run path stays standard library only.
        from dockyard._azure_only import not_here

        raise not_here("dockyard.core", name) from None
