"""``dockyard.core.experiment`` (Azure ML's ``azureml.core.experiment``)."""

from dockyard._workflow import Experiment

__all__ = ["Experiment"]
