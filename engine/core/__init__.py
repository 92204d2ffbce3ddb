"""``dockyard.core``: Azure ML SDK v1's ``azureml.core`` names, so porting is one word in the imports.

Imported lazily: a training script's ``from dockyard.core import Run`` loads only the standard
library, inside any image.
"""

from importlib import import_module

_EXPORTS = {
    "Workspace": "dockyard._workflow",
    "Experiment": "dockyard._workflow",
    "ScriptRunConfig": "dockyard._workflow",
    "ComputeTarget": "dockyard._workflow",
    "Environment": "dockyard._environment",
    "Run": "dockyard._run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):  # type: ignore[no-untyped-def]
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError("module 'dockyard.core' has no attribute {!r}".format(name)) from None
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
