"""``dockyard.core.runconfig`` (Azure ML's ``azureml.core.runconfig``): how a run's container runs,
and how a distributed run spans nodes."""

from dockyard._runtime import DockerConfiguration, MpiConfiguration, PyTorchConfiguration

__all__ = ["DockerConfiguration", "MpiConfiguration", "PyTorchConfiguration"]
