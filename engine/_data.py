"""Azure ML SDK v1's file datasets, mapped onto this machine: a folder or file of the host, mounted
read-only into the run (never copied into the snapshot or the image).

    ds = Dataset.File.from_files("/data/pets")
    ScriptRunConfig(..., arguments=["--data", ds.as_named_input("pets").as_mount()])
    # in the script: the argument is the path the data is at, and so is
    Run.get_context().input_datasets["pets"]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._azure_only import AzureNames, instance_getattr
from .errors import InputError

__all__ = ["Dataset", "DatasetConsumptionConfig", "FileDataset"]


class DatasetConsumptionConfig:
    """How a run uses a dataset: under ``name``, mounted (``as_mount``) or as files (``as_download``:
    here the same read-only mount, so nothing is copied), at ``path_on_compute`` if given."""

    def __init__(self, name: str | None, dataset: FileDataset, mode: str = "mount",
                 path_on_compute: str | None = None) -> None:
        self.name = name
        self.dataset = dataset
        self.mode = mode
        self.path_on_compute = path_on_compute

    def as_mount(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self.name, self.dataset, "mount", path_on_compute or self.path_on_compute)

    def as_download(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self.name, self.dataset, "download", path_on_compute or self.path_on_compute)

    def __repr__(self) -> str:
        return f"DatasetConsumptionConfig(name={self.name!r}, mode={self.mode!r}, path={self.dataset.path!r})"


class FileDataset:
    """Files of this machine (Azure ML's ``FileDataset``): one folder or one file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"FileDataset(path={self.path!r})"

    def as_named_input(self, name: str) -> DatasetConsumptionConfig:
        """Use it under ``name`` (the key of ``Run.get_context().input_datasets``).

        Raises:
            InputError: not a usable name.
        """
        if not isinstance(name, str) or not name.isidentifier():
            raise InputError(f"dataset name {name!r} is not valid", hint="use letters, digits and '_' (e.g. 'pets')")
        return DatasetConsumptionConfig(name, self)

    def as_mount(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(None, self, "mount", path_on_compute)

    def as_download(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(None, self, "download", path_on_compute)


class _FileFactory:
    @staticmethod
    def from_files(path: Any, validate: bool = True, **kwargs: Any) -> FileDataset:
        """A dataset of local files: a path (``str`` or path-like), or a list holding one.

        Azure's datastore paths (``(datastore, "folder")``) name cloud storage; here the data is
        on this machine, so give its path.

        Raises:
            InputError: not one local path, or (with ``validate``) it does not exist.
        """
        if isinstance(path, list) and len(path) == 1:
            path = path[0]
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"Dataset.File.from_files: {path!r} is not a local path",
                             hint="give the folder or file on this machine, e.g. Dataset.File.from_files('/data/pets')")
        resolved = Path(path).expanduser().absolute()
        if validate and not resolved.exists():
            raise InputError(f"Dataset.File.from_files: {resolved} does not exist", hint="check the path")
        return FileDataset(str(resolved))


class Dataset(metaclass=AzureNames):
    """Azure ML's ``Dataset`` entry point: ``Dataset.File.from_files(path)``."""

    __getattr__ = instance_getattr('Dataset')

    File = _FileFactory
