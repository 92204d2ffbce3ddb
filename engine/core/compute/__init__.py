"""``dockyard.core.compute`` (Azure ML's ``azureml.core.compute``): compute targets on this machine."""

from dockyard._workflow import AmlCompute, ComputeTarget, RayCompute

__all__ = ["AmlCompute", "ComputeTarget", "RayCompute"]
