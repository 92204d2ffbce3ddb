"""Azure ML SDK v1 names that dockyard does not implement, each with the local way to do it.

A ported project that reaches one gets one clear :class:`NotSupportedHere` (also a
``NotImplementedError``) naming the alternative, instead of an ``AttributeError`` deep inside.
"""

from __future__ import annotations

from .errors import NotSupportedHere

__all__ = ["AZURE_ONLY", "AzureNames", "instance_getattr", "not_here"]

_MODEL = ("a model is a file: save it under outputs/ in the run (run.upload_file) and fetch it with "
          "run.download_file('outputs/…') or `dockyard runs show ID`")
_DATA = "data stays on this machine: Dataset.File.from_files(path).as_mount(), or `dockyard run --mount`"
_SERVE = "serving is out of dockyard's scope: run the model's server in a container of its own"

#: owner -> name -> what to do instead.
AZURE_ONLY: dict[str, dict[str, str]] = {
    "dockyard.core": {
        "Model": _MODEL,
        "Datastore": _DATA,
        "Webservice": _SERVE,
        "Image": "images are built from environments: env.build(ws) or `dockyard env build FILE`",
        "Keyvault": "there is no key vault: pass values through the environment's environment_variables",
        "ComputeInstance": "compute is this machine: ComputeTarget.create(ws, name, AmlCompute.provisioning_configuration(...))",
        "RunConfiguration": "give the same settings to ScriptRunConfig (environment=, compute_target=, "
                            "docker_runtime_config=)",
    },
    "Workspace": {
        "get_default_datastore": _DATA,
        "datastores": _DATA,
        "models": _MODEL,
        "webservices": _SERVE,
        "get_default_keyvault": "there is no key vault: use environment variables",
        "images": "built images: `dockyard env ls` / `dockyard cache ls`",
        "delete": "a workspace is a folder: remove $DOCKYARD_HOME/workspaces/NAME",
        "linked_services": "nothing to link on one machine",
        "private_endpoints": "nothing to connect on one machine",
    },
    "Experiment": {
        "archive": "experiments are names of runs: nothing to archive",
        "reactivate": "experiments are names of runs: nothing to reactivate",
        "delete": "remove the runs' folders under $DOCKYARD_HOME/workspaces/NAME/runs",
    },
    "Run": {
        "register_model": _MODEL,
        "submit_child": "child runs are not supported: submit another run with Experiment.submit",
        "get_children": "child runs are not supported: list runs with Experiment.get_runs()",
        "get_secret": "there is no key vault: pass values through the environment's environment_variables",
        "restore_snapshot": "the snapshot is the run's work folder: `dockyard runs show ID` names it",
        "get_snapshot_id": "the snapshot is the run's work folder: `dockyard runs show ID` names it",
    },
    "Environment": {
        "add_private_pip_wheel": "put the wheel's path in python.pip_requirements: it travels with the build",
        "get_image_building_details": "use env.build(ws).wait_for_completion(show_output=True)",
    },
    "Dataset": {
        "get_by_name": "name a dataset where it is used: Dataset.File.from_files(path).as_named_input(name)",
        "register": "datasets are not registered: Dataset.File.from_files(path) where it is used",
        "Tabular": "only file datasets: Dataset.File.from_files(path), then read the files in the script",
    },
}


def not_here(owner: str, name: str) -> AttributeError | NotSupportedHere:
    """The error for ``owner.name``: :class:`NotSupportedHere` for a known Azure name, else the
    ordinary ``AttributeError`` (a typo stays a typo)."""
    alternative = AZURE_ONLY.get(owner, {}).get(name)
    if alternative is None:
        return AttributeError(f"{owner!r} has no attribute {name!r}")
    return NotSupportedHere(f"{owner}.{name} is Azure ML's and dockyard does not have it", hint=alternative)


class AzureNames(type):
    """Metaclass: ``Cls.azure_only_name`` (a class-level use, e.g. ``Dataset.get_by_name``) raises
    the clear error too."""

    def __getattr__(cls, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        raise not_here(cls.__name__, name)


def instance_getattr(owner: str):  # type: ignore[no-untyped-def]
    """A ``__getattr__`` for instances of ``owner``: the clear error for Azure-only names."""

    def __getattr__(self: object, name: str) -> object:
        if name.startswith("_"):
            raise AttributeError(name)
        raise not_here(owner, name)

    return __getattr__
