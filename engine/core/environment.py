"""``dockyard.core.environment`` (Azure ML's ``azureml.core.environment``)."""

from dockyard._environment import ContainerRegistry, DockerBuildContext, DockerSection, Environment, PythonSection

__all__ = ["ContainerRegistry", "DockerBuildContext", "DockerSection", "Environment", "PythonSection"]
