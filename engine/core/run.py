"""``dockyard.core.run`` (Azure ML's ``azureml.core.run``): the ``Run`` class, standard library only."""

from dockyard._run import Run

__all__ = ["Run"]
