"""``dockyard.core.dataset`` (Azure ML's ``azureml.core.dataset``): files of this machine, mounted into runs."""

from dockyard._data import Dataset

__all__ = ["Dataset"]
