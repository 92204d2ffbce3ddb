"""``dockyard.core.compute_target`` (Azure ML's ``azureml.core.compute_target``)."""

from dockyard.errors import ComputeTargetException

__all__ = ["ComputeTargetException"]
