"""``dockyard.core.conda_dependencies`` (Azure ML's ``azureml.core.conda_dependencies``)."""

from dockyard._conda import CondaDependencies

__all__ = ["CondaDependencies"]
