"""``dockyard.core.environment`` (Azure ML's ``azureml.core.environment``)."""

from dockyard._environment import ContainerRegistry, DockerSection, Environment, PythonSection

__all__ = ["ContainerRegistry", "DockerSection", "Environment", "PythonSection"]
