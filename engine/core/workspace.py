"""``dockyard.core.workspace`` (Azure ML's ``azureml.core.workspace``)."""

from dockyard._workflow import Workspace

__all__ = ["Workspace"]
