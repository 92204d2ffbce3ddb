"""``dockyard.core.conda_dependencies`` (Azure ML's ``CondaDependencies``), as a plain conda spec dict."""

from __future__ import annotations

from typing import Iterable

__all__ = ["CondaDependencies"]


class CondaDependencies(dict):  # type: ignore[type-arg]
    """A conda spec (``name``, ``channels``, ``dependencies`` with a ``{"pip": [...]}`` entry).

    It *is* the dict ``environment.python.conda_dependencies`` holds, so it hashes and saves like one.
    """

    @classmethod
    def create(cls, pip_packages: Iterable[str] = (), conda_packages: Iterable[str] = (),
               python_version: str | None = None, pin_sdk_version: bool = True) -> CondaDependencies:
        spec = cls(name="project_environment", channels=["conda-forge"], dependencies=[])
        if python_version:
            spec.add_conda_package(f"python={python_version}")
        for package in conda_packages:
            spec.add_conda_package(package)
        for package in pip_packages:
            spec.add_pip_package(package)
        return spec

    def add_channel(self, channel: str) -> None:
        channels = self.setdefault("channels", [])
        if channel not in channels:
            channels.append(channel)

    def add_conda_package(self, package: str) -> None:
        deps = self.setdefault("dependencies", [])
        if package not in deps:
            deps.insert(len([d for d in deps if isinstance(d, str)]), package)

    def add_pip_package(self, package: str) -> None:
        deps = self.setdefault("dependencies", [])
        pip = next((d for d in deps if isinstance(d, dict) and "pip" in d), None)
        if pip is None:
            pip = {"pip": []}
            deps.append(pip)
        if package not in pip["pip"]:
            pip["pip"].append(package)
