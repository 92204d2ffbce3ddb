"""``dockyard.core.script_run_config`` (Azure ML's ``azureml.core.script_run_config``)."""

from dockyard._workflow import ScriptRunConfig

__all__ = ["ScriptRunConfig"]
