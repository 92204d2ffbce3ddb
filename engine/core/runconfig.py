"""``dockyard.core.runconfig`` (Azure ML's ``azureml.core.runconfig``): how a run's container runs."""

from dockyard._runtime import DockerConfiguration

__all__ = ["DockerConfiguration"]
