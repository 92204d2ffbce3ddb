"""Azure ML SDK v1's ``CondaDependencies``: a conda specification you build in code.

It *is* the mapping ``environment.python.conda_dependencies`` holds (``name``, ``channels``,
``dependencies`` with one ``{"pip": [...]}`` entry), so it hashes into the content key and saves
like one. An empty one (no dependencies) means "no conda spec": it changes no key and installs
nothing.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import SpecError

__all__ = ["CondaDependencies", "check_conda", "conda_spec", "read_conda_file"]

_PYTHON = re.compile(r"^python(?:\s*[=<>!~].*)?$")


def _name(package: str) -> str:
    """The package name of a conda or pip requirement (``numpy=1.26`` -> ``numpy``)."""
    return re.split(r"[\s=<>!~\[;@]", package.strip(), maxsplit=1)[0].lower()


class CondaDependencies(dict):  # type: ignore[type-arg]
    """A conda spec, with Azure ML's methods.

    Args:
        conda_dependencies_file_path: a conda YAML file to start from (Azure's argument).

    Raises:
        SpecError: the file is missing or not a conda specification.
    """

    def __init__(self, conda_dependencies_file_path: str | os.PathLike[str] | None = None,
                 _underlying_structure: dict[str, Any] | None = None, **spec: Any) -> None:
        if conda_dependencies_file_path is not None:
            spec = {**read_conda_file(Path(conda_dependencies_file_path)), **spec}
        elif _underlying_structure is not None:
            spec = {**_underlying_structure, **spec}
        super().__init__(spec)

    @classmethod
    def create(cls, pip_packages: Iterable[str] | None = None, conda_packages: Iterable[str] | None = None,
               python_version: str | None = None, pin_sdk_version: bool = True, pip_indexurl: str | None = None,
               **kwargs: Any) -> CondaDependencies:
        """A spec with these packages (Azure's ``azureml-defaults`` is not added: nothing here needs it).

        ``pip_indexurl`` becomes a ``--index-url`` line of the pip section.
        """
        spec = cls(name="project_environment", channels=["conda-forge"], dependencies=[])
        if python_version:
            spec.set_python_version(python_version)
        for package in conda_packages or ():
            spec.add_conda_package(package)
        if pip_indexurl:
            spec.set_pip_option(f"--index-url {pip_indexurl}")
        for package in pip_packages or ():
            spec.add_pip_package(package)
        return spec

    # -- the parts ------------------------------------------------------------------------------

    def _deps(self) -> list[Any]:
        return self.setdefault("dependencies", [])

    def _pip(self, create: bool = False) -> list[str] | None:
        entry = next((d for d in self.get("dependencies") or [] if isinstance(d, dict) and "pip" in d), None)
        if entry is None and create:
            entry = {"pip": []}
            self._deps().append(entry)
        return entry["pip"] if entry is not None else None

    @property
    def conda_packages(self) -> list[str]:
        return [d for d in self.get("dependencies") or [] if isinstance(d, str)]

    @property
    def pip_packages(self) -> list[str]:
        return [p for p in self._pip() or [] if not p.startswith("-")]

    @property
    def pip_options(self) -> list[str]:
        return [p for p in self._pip() or [] if p.startswith("-")]

    @property
    def conda_channels(self) -> list[str]:
        return list(self.get("channels") or [])

    @property
    def is_empty(self) -> bool:
        """No conda package and no pip package: nothing to install."""
        return not self.conda_packages and not self.pip_packages

    # -- Azure's methods ------------------------------------------------------------------------

    def add_channel(self, channel: str) -> None:
        channels = self.setdefault("channels", [])
        if channel not in channels:
            channels.append(channel)

    def remove_channel(self, channel: str) -> None:
        if channel in (self.get("channels") or []):
            self["channels"].remove(channel)

    def add_conda_package(self, package: str) -> None:
        """Add (or replace, by name) a conda package; conda packages come before the pip section."""
        deps = self._deps()
        deps[:] = [d for d in deps if not (isinstance(d, str) and _name(d) == _name(package))]
        deps.insert(len([d for d in deps if isinstance(d, str)]), package)

    def remove_conda_package(self, package: str) -> None:
        deps = self._deps()
        deps[:] = [d for d in deps if not (isinstance(d, str) and _name(d) == _name(package))]

    def add_pip_package(self, package: str) -> None:
        """Add (or replace, by name) a pip requirement."""
        pip = self._pip(create=True)
        assert pip is not None
        pip[:] = [p for p in pip if p.startswith("-") or _name(p) != _name(package)]
        pip.append(package)

    def remove_pip_package(self, package: str) -> None:
        pip = self._pip()
        if pip is not None:
            pip[:] = [p for p in pip if p.startswith("-") or _name(p) != _name(package)]

    def set_pip_option(self, option: str) -> None:
        """A pip option line (``--index-url URL``, ``--extra-index-url URL``), once."""
        pip = self._pip(create=True)
        assert pip is not None
        if option not in pip:
            pip.insert(len([p for p in pip if p.startswith("-")]), option)

    def set_python_version(self, version: str) -> None:
        self.add_conda_package(f"python={version}")

    def get_python_version(self) -> str | None:
        for package in self.conda_packages:
            if _PYTHON.match(package):
                found = re.search(r"[=<>~!]+\s*(.+)$", package)
                return found.group(1).strip() if found else None
        return None

    def serialize_to_string(self) -> str:
        """The spec as conda YAML (JSON is YAML; conda, mamba and micromamba all read it)."""
        return json.dumps(dict(self), indent=2) + "\n"

    def save(self, path: str | os.PathLike[str] | None = None) -> str:
        """Write the spec to ``path`` (default ``conda_dependencies.yml`` here); returns the path."""
        target = Path(path or "conda_dependencies.yml")
        target.write_text(self.serialize_to_string())
        return str(target)

    def save_to_file(self, base_directory: str | os.PathLike[str], conda_file_path: str | None = None) -> str:
        return self.save(Path(base_directory) / (conda_file_path or "conda_dependencies.yml"))

    def _is_pip_only(self) -> bool:
        """Only pip packages (and perhaps ``python``/``pip`` themselves): a venv installs it, no conda."""
        return all(_PYTHON.match(p) or _name(p) == "pip" for p in self.conda_packages)


def conda_spec(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The spec an environment really has: None for none, or one that installs nothing."""
    if value is None:
        return None
    spec = value if isinstance(value, CondaDependencies) else CondaDependencies(_underlying_structure=dict(value))
    return None if spec.is_empty else dict(spec)


def check_conda(spec: Any, fail: Any) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise fail(f"expected a conda spec mapping, got {type(spec).__name__}",
                   "a conda spec has name, channels and dependencies")
    unknown = set(spec) - {"name", "channels", "dependencies", "variables", "prefix"}
    if unknown:
        raise fail(f"unknown conda spec field(s): {', '.join(sorted(map(str, unknown)))}",
                   "a conda spec has name, channels, dependencies and variables")
    deps = spec.get("dependencies") or []
    if not isinstance(deps, list):
        raise fail("dependencies must be a list")
    for dep in deps:
        if isinstance(dep, Mapping):
            if set(dep) != {"pip"} or not isinstance(dep["pip"], list):
                raise fail("a dependency mapping must be {pip: [requirements...]}")
        elif not isinstance(dep, str):
            raise fail(f"dependency {dep!r} is not a string")
    channels = spec.get("channels") or []
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise fail("channels must be a list of strings")
    return {k: v for k, v in dict(spec).items() if v is not None}


def read_conda_file(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise SpecError("conda specification not found", path=str(path), hint="check the path") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise SpecError("malformed YAML in conda specification", path=str(path),
                        line=mark.line + 1 if mark else None) from exc
    spec = check_conda(data, lambda m, h="": SpecError(m, path=str(path), hint=h))
    return absolute_pip_paths(spec, path.resolve().parent, where=str(path))


def absolute_pip_paths(spec: dict[str, Any], base: Path, *, where: str | None) -> dict[str, Any]:
    """``spec`` with the local paths of its pip section made absolute (relative ones start at
    ``base``), so it means the same wherever it is read; ``-r`` files are inlined."""
    from ._requirements import absolute_pip

    deps = spec.get("dependencies")
    if not isinstance(deps, list) or not any(isinstance(d, dict) and d.get("pip") for d in deps):
        return spec
    out = dict(spec)
    out["dependencies"] = [
        {"pip": absolute_pip(d["pip"], base, where=where)} if isinstance(d, dict) and d.get("pip") else d
        for d in deps
    ]
    return out
